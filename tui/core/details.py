"""What an operator needs to reach one domain: its addresses, consoles and graphics.

`read_details(hv, name)` builds a frozen `DomainDetails` from the live XML and the three
address sources libvirt offers (`virDomainInterfaceAddresses`):

- "lease": the DHCP leases of a libvirt network (only for interfaces on such a network),
- "agent": the QEMU guest agent inside the guest (needs qemu-guest-agent and its channel),
- "arp":   the host's ARP table (only guests on a host bridge or network the host talks to).

Each source is tried on its own; a failure becomes a reason next to the source, never an
exception, so the details view always shows what could be read and why the rest could not.
`addresses(hv, dom_name)` is the cheap path `ls --json` uses: running domains only, lease and
agent, the agent only when its channel is connected (libvirt reports that in the live XML), so
a guest without an agent costs nothing and a silent one never stalls the listing.

`console_command` and `ssh_command` build the argument lists the CLI and the dashboard run.
"""

from __future__ import annotations

import getpass
import ipaddress
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import libvirt

from tui.core import audit, domxml
from tui.core.errors import ConnectError, OperationError, StateError, VirtdeckError
from tui.core.hypervisor import Hypervisor, is_local_uri
from tui.core.models import DiskInfo, DomainState

LEASE, AGENT, ARP = "lease", "agent", "arp"
_SOURCES = {
    LEASE: libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
    AGENT: libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
    ARP: libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
}
_EMPTY_WHY = {
    LEASE: "no lease (only interfaces on a libvirt network get DHCP leases from it)",
    AGENT: "the guest agent reported no address for this domain's interfaces",
    ARP: "no entry in the host's ARP table for these MAC addresses",
}
AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class Address:
    """One IP address of a guest interface and where it was learnt ("lease", "agent", "arp")."""

    address: str
    prefix: int | None
    family: str  # "ipv4" | "ipv6"
    source: str

    @property
    def usable(self) -> bool:
        """Worth connecting to: not loopback, not link-local."""
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            return False
        return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix}" if self.prefix is not None else self.address


@dataclass(frozen=True)
class SourceStatus:
    """How one address source answered: `ok`, else `reason` says why it gave nothing."""

    source: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Interface:
    """A NIC from the XML (MAC, type, network/bridge, model, host device) and its addresses.

    A guest-side interface the agent reported with a MAC none of the NICs has (a VPN, a
    bridge inside the guest) is kept with type "guest"."""

    mac: str | None
    type: str
    source: str | None
    model: str | None = None
    target: str | None = None  # the host-side device (vnet0) while running
    guest_name: str | None = None  # the name inside the guest (eth0), from the agent
    addresses: tuple[Address, ...] = ()


@dataclass(frozen=True)
class Graphics:
    """A VNC or SPICE display: where it listens and how to reach it from the operator's desk."""

    type: str
    listen: str | None
    port: int | None
    tls_port: int | None = None
    socket: str | None = None
    autoport: bool = False
    tunnel: str | None = None  # the `ssh -L ...` line
    reason: str = ""  # why there is no tunnel line


@dataclass(frozen=True)
class CharDevice:
    """A <serial> or <console> device; only a pty one can be attached with `virsh console`."""

    kind: str  # "serial" | "console"
    type: str  # pty, file, tcp, unix...
    target: str | None
    path: str | None

    @property
    def attachable(self) -> bool:
        return self.type == "pty"


@dataclass(frozen=True)
class DomainDetails:
    host: str
    name: str
    uuid: str
    state: DomainState
    interfaces: tuple[Interface, ...] = ()
    sources: tuple[SourceStatus, ...] = ()
    graphics: tuple[Graphics, ...] = ()
    consoles: tuple[CharDevice, ...] = ()
    disks: tuple[DiskInfo, ...] = ()
    agent_channel: str | None = None  # None: no channel; else its state ("connected"...)
    operations: tuple[audit.Record, ...] = ()  # its last operations (the audit trail), oldest first

    @property
    def addresses(self) -> tuple[Address, ...]:
        return tuple(a for i in self.interfaces for a in i.addresses)

    @property
    def first_address(self) -> Address | None:
        """What `ssh` connects to: the first usable IPv4 address in NIC order (agent before
        lease before ARP), else the first usable IPv6 one."""
        order = {AGENT: 0, LEASE: 1, ARP: 2}
        for family in ("ipv4", "ipv6"):
            for iface in self.interfaces:
                found = sorted(
                    (a for a in iface.addresses if a.family == family and a.usable),
                    key=lambda a: order.get(a.source, 9),
                )
                if found:
                    return found[0]
        return None

    @property
    def console(self) -> CharDevice | None:
        """The device `virsh console` attaches to (the first console, else the first serial)."""
        for kind in ("console", "serial"):
            for dev in self.consoles:
                if dev.kind == kind and dev.attachable:
                    return dev
        return None

    def console_refusal(self) -> str | None:
        """Why `virsh console` cannot attach now, or None when it can."""
        if not self.consoles:
            return f"'{self.name}' has no serial console (add a <serial type='pty'> device)"
        if self.console is None:
            kinds = ", ".join(f"{d.kind} type {d.type}" for d in self.consoles)
            return f"'{self.name}' has no pty console to attach to ({kinds})"
        if not self.state.active:
            return f"'{self.name}' is not running ({self.state.value}): start it first"
        return None

    def ssh_refusal(self) -> str | None:
        if self.first_address is not None:
            return None
        if not self.state.active:
            return f"'{self.name}' is not running ({self.state.value}), so it has no address"
        why = "; ".join(f"{s.source}: {s.reason}" for s in self.sources if not s.ok)
        return f"no address known for '{self.name}'" + (f" ({why})" if why else "")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        for disk, info in zip(data["disks"], self.disks, strict=True):
            disk["kind"] = info.kind.value
            disk["described"] = info.described
        data["first_address"] = self.first_address.address if self.first_address else None
        data["console"] = self.console is not None
        return data


# -- reading --------------------------------------------------------------------------------


RECENT_OPERATIONS = 5  # how many of a domain's last operations the details show


def read_details(hv: Hypervisor, name: str) -> DomainDetails:
    """Everything the details view shows; libvirt calls only (no guest traffic)."""
    dom = hv.lookup(name)
    what = f"reading '{name}'"
    xml = str(hv.call(dom.XMLDesc, 0, what=what))
    state = DomainState.from_libvirt(hv.call(dom.state, what=what)[0])
    root = domxml.parse(xml)
    nics = _interfaces(root)
    agent = agent_channel_state(root)
    if state.active:
        found, sources = _query(hv, dom, (AGENT, LEASE, ARP), agent)
        nics = _merge(nics, found)
    else:
        sources = tuple(
            SourceStatus(s, False, f"'{name}' is not running") for s in (AGENT, LEASE, ARP)
        )
    return DomainDetails(
        host=hv.uri,
        name=str(dom.name()),
        uuid=str(dom.UUIDString()),
        state=state,
        interfaces=nics,
        sources=sources,
        graphics=tuple(_graphics(root, hv, state.active)),
        consoles=char_devices(root),
        disks=domxml.disks(root),
        agent_channel=agent,
        operations=tuple(audit.recent(name, hv.uri, RECENT_OPERATIONS)),
    )


def addresses(hv: Hypervisor, name: str) -> tuple[tuple[Address, ...], tuple[SourceStatus, ...]]:
    """The cheap path for listings: running domains only, lease and agent."""
    dom = hv.lookup(name)
    what = f"reading '{name}'"
    state = DomainState.from_libvirt(hv.call(dom.state, what=what)[0])
    if not state.active:
        return (), (
            SourceStatus(LEASE, False, "not running"),
            SourceStatus(AGENT, False, "not running"),
        )
    root = domxml.parse(str(hv.call(dom.XMLDesc, 0, what=what)))
    found, sources = _query(hv, dom, (AGENT, LEASE), agent_channel_state(root))
    nics = _merge(_interfaces(root), found)
    return tuple(a for i in nics for a in i.addresses), sources


def _query(
    hv: Hypervisor, dom: Any, which: tuple[str, ...], agent: str | None
) -> tuple[dict[str, list[tuple[str, str | None, Address]]], tuple[SourceStatus, ...]]:
    """Ask each source; returns MAC -> [(source, guest name, address)] and each source's status."""
    found: dict[str, list[tuple[str, str | None, Address]]] = {}
    statuses = []
    for source in which:
        if source == AGENT and agent != "connected":
            why = (
                f"no guest agent channel ({AGENT_CHANNEL})"
                if agent is None
                else f"the guest agent is not connected (channel {agent}; is qemu-guest-agent "
                "running in the guest?)"
            )
            statuses.append(SourceStatus(source, False, why))
            continue
        try:
            reply = hv.call(dom.interfaceAddresses, _SOURCES[source], 0)
        except ConnectError:
            raise
        except VirtdeckError as err:
            statuses.append(SourceStatus(source, False, str(err)))
            continue
        count = 0
        for guest_name, info in (reply or {}).items():
            mac = (info.get("hwaddr") or "").lower()
            for a in info.get("addrs") or ():
                family = "ipv6" if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV6 else "ipv4"
                addr = Address(str(a.get("addr")), a.get("prefix"), family, source)
                found.setdefault(mac, []).append((source, guest_name, addr))
                count += addr.usable
        statuses.append(
            SourceStatus(source, True) if count else SourceStatus(source, False, _EMPTY_WHY[source])
        )
    return found, tuple(statuses)


def _merge(
    nics: tuple[Interface, ...], found: dict[str, list[tuple[str, str | None, Address]]]
) -> tuple[Interface, ...]:
    out = []
    for nic in nics:
        hits = found.pop((nic.mac or "").lower(), [])
        guest = next((g for s, g, _a in hits if s == AGENT), None)
        out.append(
            Interface(
                nic.mac, nic.type, nic.source, nic.model, nic.target, guest,
                _unique(a for _s, _g, a in hits),
            )
        )  # fmt: skip
    for mac, hits in found.items():
        addrs = _unique(a for _s, _g, a in hits if a.usable)
        if addrs:  # the guest's loopback is not an interface of the domain
            out.append(
                Interface(mac or None, "guest", None, guest_name=hits[0][1], addresses=addrs)
            )
    return tuple(out)


def _unique(addrs: Any) -> tuple[Address, ...]:
    seen: dict[tuple[str, str], Address] = {}
    for a in addrs:
        seen.setdefault((a.address, a.source), a)
    return tuple(seen.values())


# -- XML ------------------------------------------------------------------------------------


def _interfaces(root: ET.Element) -> tuple[Interface, ...]:
    out = []
    for elem, info in zip(
        root.findall("./devices/interface"), domxml.interfaces(root), strict=True
    ):
        model = elem.find("model")
        target = elem.find("target")
        out.append(
            Interface(
                mac=info.mac,
                type=info.type,
                source=info.source,
                model=model.get("type") if model is not None else None,
                target=target.get("dev") if target is not None else None,
            )
        )
    return tuple(out)


def agent_channel_state(root: ET.Element) -> str | None:
    """None without the agent channel; else the state libvirt reports ("connected",
    "disconnected"; "defined" while shut off, as inactive XML has no state)."""
    for chan in root.findall("./devices/channel"):
        target = chan.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return target.get("state") or "defined"
    return None


def char_devices(root: ET.Element) -> tuple[CharDevice, ...]:
    """Serial ports and consoles. libvirt shows the first serial port a second time as a
    `<console>` with a serial target; that copy is left out (it is one device)."""
    out = []
    serial_ports = {t.get("port") for t in root.findall("./devices/serial/target") if t.get("port")}
    for kind in ("console", "serial"):
        for elem in root.findall(f"./devices/{kind}"):
            target = elem.find("target")
            source = elem.find("source")
            if (
                kind == "console"
                and target is not None
                and target.get("type", "serial") == "serial"
                and (target.get("port") or "0") in serial_ports
            ):
                continue
            tgt = None
            if target is not None:
                tgt = target.get("type") or "serial"
                if target.get("port") is not None:
                    tgt += f" {target.get('port')}"
            out.append(
                CharDevice(
                    kind=kind,
                    type=elem.get("type", "pty"),
                    target=tgt,
                    path=(source.get("path") if source is not None else None) or elem.get("tty"),
                )
            )
    return tuple(out)


def _int(value: str | None) -> int | None:
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is not None and n > 0 else None


def _graphics(root: ET.Element, hv: Hypervisor, active: bool) -> list[Graphics]:
    out = []
    for elem in root.findall("./devices/graphics"):
        gtype = elem.get("type", "?")
        if gtype not in ("vnc", "spice"):
            out.append(
                Graphics(
                    gtype, None, None, reason=f"{gtype} display is not reachable over the network"
                )
            )
            continue
        listen_elem = elem.find("listen")
        socket = None
        listen = elem.get("listen")
        if listen_elem is not None:
            if listen_elem.get("type") == "socket":
                socket = listen_elem.get("socket")
            elif listen_elem.get("type") == "none":
                out.append(Graphics(gtype, None, None, reason="listens nowhere (listen type none)"))
                continue
            listen = listen_elem.get("address") or listen
        autoport = elem.get("autoport") == "yes"
        port = _int(elem.get("port"))
        tls_port = _int(elem.get("tlsPort"))
        g = Graphics(gtype, listen, port, tls_port, socket, autoport)
        out.append(_with_tunnel(g, hv, active))
    return out


def _with_tunnel(g: Graphics, hv: Hypervisor, active: bool) -> Graphics:
    if g.socket:
        # OpenSSH forwards a local TCP port to a remote unix socket.
        return replace(g, tunnel=f"ssh -N -L 5900:{g.socket} {ssh_target(hv)}")
    port = g.port or g.tls_port
    if port is None:
        why = (
            "the port is assigned when the domain starts"
            if g.autoport and not active
            else "no port"
        )
        return replace(g, reason=why)
    remote = _forward_host(g.listen)
    return replace(g, tunnel=f"ssh -N -L {port}:{remote}:{port} {ssh_target(hv)}")


def _forward_host(listen: str | None) -> str:
    """Where sshd on the hypervisor connects for the forward: the listen address, with the
    wildcards meaning 'this host' (loopback reaches them)."""
    if not listen or listen in ("0.0.0.0", "::"):
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(listen).version == 6:
            return f"[{listen}]"
    except ValueError:
        pass  # a host name
    return listen


def ssh_target(hv: Hypervisor) -> str:
    """`[-p PORT] [user@]host` of the hypervisor itself, as the operator's ssh reaches it: from
    the URI (`qemu+ssh://root@kvm2:2222/system`), or for a local URI this machine's user and
    the hypervisor's host name."""
    parts = urlsplit(hv.uri)
    if not is_local_uri(hv.uri) and parts.hostname:
        host = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
        return f"-p {parts.port} {host}" if parts.port else host
    hostname = str(hv.call(hv.conn.getHostname, what="reading the host name"))
    return f"{getpass.getuser()}@{hostname}"


# -- commands -------------------------------------------------------------------------------


def console_command(details: DomainDetails) -> list[str]:
    """`virsh -c URI console NAME` (Ctrl-] returns); StateError when it cannot attach."""
    why = details.console_refusal()
    if why:
        raise StateError(why)
    return ["virsh", "-c", details.host, "console", details.name]


DEMO_SSH_REFUSAL = (
    "ssh is off in the demo: its addresses are invented by libvirt's test driver "
    "(no guest answers there)"
)


def refuse_demo_ssh(hv: Hypervisor) -> None:
    """StateError in the demo: the test driver's 192.168.122.x are nobody's (never send
    traffic to an address no guest of ours holds)."""
    if hv.demo:
        raise StateError(DEMO_SSH_REFUSAL)


def ssh_command(details: DomainDetails, user: str = "root") -> list[str]:
    """`ssh user@first-address`; through the hypervisor (`-J`) when it is another host, since
    guest addresses are usually reachable only from there. StateError without an address."""
    why = details.ssh_refusal()
    address = details.first_address
    if why or address is None:
        raise StateError(why or f"no address known for '{details.name}'")
    argv = ["ssh"]
    parts = urlsplit(details.host)
    if not is_local_uri(details.host) and parts.hostname:
        jump = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
        argv += ["-J", f"{jump}:{parts.port}" if parts.port else jump]
    argv.append(f"{user}@{address.address}" if user else address.address)
    return argv


def run_attached(argv: Sequence[str]) -> int:
    """Run a program on this terminal (virsh console, ssh) and return its exit status."""
    try:
        return subprocess.call(list(argv))
    except OSError as err:
        raise OperationError(f"cannot run {argv[0]}: {err.strerror}") from None
