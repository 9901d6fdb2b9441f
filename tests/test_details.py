"""Details of a domain (addresses, graphics, consoles, disks), the show/console/ssh commands,
`ls --json` addresses and the details screen, on libvirt's test driver.

The test driver answers every address source for interfaces on a network (it makes up
192.168.122.x addresses; nothing is sent anywhere) and keeps the ports written in the XML.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import libvirt
import pytest

from tui import cli
from tui.app import VirtdeckApp
from tui.cli import details as cli_details
from tui.core.details import (
    AGENT,
    ARP,
    LEASE,
    Address,
    DomainDetails,
    Interface,
    console_command,
    read_details,
    ssh_command,
)
from tui.core.errors import StateError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskKind, DomainState
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml
from tui.screens import terminal
from tui.screens.details import DetailsScreen, render
from tui.widgets.domains import DomainsTable

SERIAL = "<serial type='pty'><target port='0'/></serial>"
DEVICES = (
    SERIAL,
    "<console type='pty'><target type='serial' port='0'/></console>",
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
    "<graphics type='vnc' port='5905' autoport='no' listen='127.0.0.1'/>",
    "<graphics type='spice' port='5930' tlsPort='5931' autoport='no'>"
    "<listen type='address' address='0.0.0.0'/></graphics>",
    "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb'/></disk>",
    "<disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>",
)
SPECS = [
    DomainSpec("web", "running", disks=(DiskSpec("/var/tmp/vd-web.qcow2"),),
               macs=("52:54:00:aa:00:01",), devices_xml=DEVICES),
    DomainSpec("off", "shutoff", macs=("52:54:00:aa:00:02",), devices_xml=(SERIAL,)),
    DomainSpec("bare", "running"),
    DomainSpec("file-serial", "running", macs=("52:54:00:aa:00:03",),
               devices_xml=("<serial type='file'><source path='/tmp/x.log'/>"
                            "<target port='0'/></serial>",)),
]  # fmt: skip


@pytest.fixture
def uri(tmp_path: Path) -> str:
    path = tmp_path / "node.xml"
    path.write_text(node_xml(SPECS))
    return f"test://{path}"


@pytest.fixture
def hv(uri: str) -> Iterator[Hypervisor]:
    hv = Hypervisor.open(uri)
    yield hv
    hv.close()


# -- the details value ----------------------------------------------------------------------


def test_running_domain_has_addresses_with_their_source(hv: Hypervisor) -> None:
    d = read_details(hv, "web")
    assert d.state is DomainState.RUNNING
    (nic,) = d.interfaces
    assert nic.mac == "52:54:00:aa:00:01" and nic.type == "network" and nic.source == "default"
    sources = {a.source for a in nic.addresses}
    assert sources == {LEASE, ARP}
    assert all(a.address.startswith("192.168.122.") and a.prefix == 24 for a in nic.addresses)
    status = {s.source: s for s in d.sources}
    assert status[LEASE].ok and status[ARP].ok
    # the channel exists but libvirt reports it not connected (the test driver has no agent)
    assert not status[AGENT].ok and "not connected" in status[AGENT].reason
    assert d.first_address is not None and d.first_address.source == LEASE


def test_graphics_give_the_ssh_tunnel_line(hv: Hypervisor) -> None:
    d = read_details(hv, "web")
    vnc, spice = d.graphics
    target = f"{getpass.getuser()}@{socket.gethostname()}"
    assert (vnc.type, vnc.listen, vnc.port) == ("vnc", "127.0.0.1", 5905)
    assert vnc.tunnel == f"ssh -N -L 5905:127.0.0.1:5905 {target}"
    # listening on every address: the forward goes to the host's loopback
    assert (spice.port, spice.tls_port, spice.listen) == (5930, 5931, "0.0.0.0")
    assert spice.tunnel == f"ssh -N -L 5930:127.0.0.1:5930 {target}"


def test_consoles_and_disks_by_kind(hv: Hypervisor) -> None:
    d = read_details(hv, "web")
    # the <console> duplicating serial port 0 is one device
    assert [(c.kind, c.type) for c in d.consoles] == [("serial", "pty")]
    assert d.console_refusal() is None
    assert console_command(d) == ["virsh", "-c", hv.uri, "console", "web"]
    kinds = {disk.target: disk.kind for disk in d.disks}
    assert kinds == {"vda": DiskKind.FILE, "vdb": DiskKind.BLOCK, "hdc": DiskKind.EMPTY}
    assert [disk.path for disk in d.disks] == ["/var/tmp/vd-web.qcow2", None, None]


def test_shut_off_domain_says_why_there_is_nothing(hv: Hypervisor) -> None:
    d = read_details(hv, "off")
    assert d.addresses == ()
    assert all(not s.ok and "not running" in s.reason for s in d.sources)
    with pytest.raises(StateError, match="'off' is not running"):
        console_command(d)
    with pytest.raises(StateError, match="'off' is not running"):
        ssh_command(d)


def test_console_refusals_name_the_missing_device(hv: Hypervisor) -> None:
    with pytest.raises(StateError, match="'bare' has no serial console"):
        console_command(read_details(hv, "bare"))
    with pytest.raises(StateError, match=r"no pty console.*serial type file"):
        console_command(read_details(hv, "file-serial"))


def test_no_interface_no_ssh(hv: Hypervisor) -> None:
    d = read_details(hv, "bare")
    with pytest.raises(StateError, match="no address known for 'bare'"):
        ssh_command(d)


def _details(*interfaces: Interface, host: str = "qemu:///system") -> DomainDetails:
    return DomainDetails(host, "vm", "u", DomainState.RUNNING, interfaces=interfaces)


def test_first_address_prefers_ipv4_then_agent_and_skips_link_local() -> None:
    nic1 = Interface("52:54:00:00:00:01", "network", "default", addresses=(
        Address("fe80::1", 64, "ipv6", AGENT),
        Address("2001:db8::5", 64, "ipv6", AGENT),
    ))  # fmt: skip
    nic2 = Interface("52:54:00:00:00:02", "bridge", "br0", addresses=(
        Address("10.1.0.9", 24, "ipv4", LEASE),
        Address("10.1.0.7", 24, "ipv4", AGENT),
    ))  # fmt: skip
    assert _details(nic1, nic2).first_address == Address("10.1.0.7", 24, "ipv4", AGENT)
    assert _details(nic1).first_address == Address("2001:db8::5", 64, "ipv6", AGENT)
    only_local = Interface("m", "user", None, addresses=(Address("fe80::1", 64, "ipv6", AGENT),))
    assert _details(only_local).first_address is None


def test_ssh_goes_through_a_remote_hypervisor(uri: str) -> None:
    conn = libvirt.open(uri)
    try:
        remote = Hypervisor("qemu+ssh://admin@kvm2:2222/system", conn)
        d = read_details(remote, "web")
        assert d.graphics[0].tunnel == "ssh -N -L 5905:127.0.0.1:5905 -p 2222 admin@kvm2"
        argv = ssh_command(d, "ops")
        assert argv[:3] == ["ssh", "-J", "admin@kvm2:2222"]
        assert argv[3].startswith("ops@192.168.122.")
    finally:
        conn.close()


# -- commands -------------------------------------------------------------------------------


def test_show_json_and_text(uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-c", uri, "show", "web", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "running" and data["console"] is True
    assert data["first_address"].startswith("192.168.122.")
    assert {a["source"] for a in data["interfaces"][0]["addresses"]} == {"lease", "arp"}
    assert data["disks"][1]["kind"] == "block"
    assert data["disks"][1]["described"] == "block device /dev/sdz"
    assert cli.main(["-c", uri, "show", "web"]) == 0
    out = capsys.readouterr().out
    assert "ssh -N -L 5905:127.0.0.1:5905" in out and "block device /dev/sdz" in out


def test_ls_json_carries_addresses_of_running_domains(
    uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-c", uri, "ls", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    web = rows["web"]
    assert {a["source"] for a in web["addresses"]} == {"lease"}  # ls asks lease and agent only
    assert "not connected" in web["address_errors"]["agent"]
    assert rows["off"]["addresses"] == [] and rows["bare"]["addresses"] == []


def test_console_and_ssh_commands_run_or_refuse(
    uri: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []

    def record(argv: Sequence[str]) -> int:
        ran.append(list(argv))
        return 0

    monkeypatch.setattr(cli_details, "runner", record)
    assert cli.main(["-c", uri, "console", "web"]) == 0
    assert cli.main(["-c", uri, "ssh", "web", "-l", "debian"]) == 0
    assert ran[0] == ["virsh", "-c", uri, "console", "web"]
    assert ran[1][0] == "ssh" and ran[1][1].startswith("debian@192.168.122.")
    capsys.readouterr()
    assert cli.main(["-c", uri, "console", "off"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'off' is not running" in err
    assert cli.main(["-c", uri, "console", "bare"]) == 1
    assert "has no serial console" in capsys.readouterr().err
    assert cli.main(["-c", uri, "ssh", "nope"]) == 1
    assert "no domain named 'nope'" in capsys.readouterr().err
    assert len(ran) == 2


# -- the dashboard --------------------------------------------------------------------------


async def _open(app: VirtdeckApp, pilot: object, name: str) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()  # type: ignore[attr-defined]
    assert app.screen.query_one(DomainsTable).select_name(name)
    await pilot.pause()  # type: ignore[attr-defined]


async def test_details_screen_shows_addresses_and_returns(hv: Hypervisor) -> None:
    app = VirtdeckApp([hv], poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        await _open(app, pilot, "web")
        await pilot.press("i")
        await pilot.pause()
        assert isinstance(app.screen, DetailsScreen)
        await app.screen.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen.details is not None
        assert app.screen.details.first_address is not None
        shown = _screen_text(app)
        assert "52:54:00:aa:00:01" in shown and "192.168.122." in shown and "lease" in shown
        assert "ssh -N -L 5905:127.0.0.1:5905" in shown and "/dev/sdz" in shown
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, DetailsScreen)
        assert app.screen.query_one(DomainsTable).selected() is not None


def _screen_text(app: VirtdeckApp) -> str:
    from rich.console import Console

    screen = app.screen
    assert isinstance(screen, DetailsScreen) and screen.details is not None
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(render(screen.details))
    return console.export_text()


@contextlib.contextmanager
def _suspend() -> Iterator[None]:
    yield  # the headless test driver cannot hand its terminal over; tmux tests do it for real


async def _until(app: VirtdeckApp, pilot: object, done: Callable[[], bool]) -> None:
    """Let workers and the messages they post run until `done()`; fails loudly after 30 s
    (tests.waiting: a deadline, not a count of turns, which a loaded machine used up in
    moments while a pane's refresh was still queued)."""
    deadline = time.monotonic() + 30
    while True:
        await app.workers.wait_for_complete()
        await pilot.pause(0.02)  # type: ignore[attr-defined]
        if done():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{getattr(done, '__name__', done)} still false after 30 s")


async def test_ssh_and_console_keys_hand_over_or_refuse(
    hv: Hypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []

    def record(argv: Sequence[str]) -> int:
        ran.append(list(argv))
        return 0

    monkeypatch.setattr(terminal, "runner", record)
    app = VirtdeckApp([hv], poll_interval=3600)
    monkeypatch.setattr(app, "suspend", _suspend)
    async with app.run_test(size=(140, 45)) as pilot:
        await _open(app, pilot, "web")
        await pilot.press("S")
        await _until(app, pilot, lambda: len(ran) == 1)  # worker -> message -> hand-over
        await pilot.press("C")
        await _until(app, pilot, lambda: len(ran) == 2)
        assert ran[0][0] == "ssh" and ran[0][1].startswith("root@192.168.122.")
        assert ran[1] == ["virsh", "-c", hv.uri, "console", "web"]
        await _open(app, pilot, "bare")

        def messages() -> list[str]:
            return [n.message for n in app._notifications]

        await pilot.press("C")  # one at a time: a second attach key cancels the first's worker
        await _until(app, pilot, lambda: len([m for m in messages() if "'bare'" in m]) >= 1)
        await pilot.press("S")
        await _until(app, pilot, lambda: len([m for m in messages() if "'bare'" in m]) >= 2)
        assert any("'bare' has no serial console" in m for m in messages())
        assert any("no address known for 'bare'" in m for m in messages())
        assert len(ran) == 2


async def test_palette_offers_details_console_and_ssh(hv: Hypervisor) -> None:
    app = VirtdeckApp([hv], poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        await _open(app, pilot, "web")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Details: web", "Console: web", "SSH: web"} <= set(titles)


async def test_ssh_key_refuses_in_the_demo(hv: Hypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's addresses (192.168.122.x) are the test driver's invention: never ssh there."""
    from tui.core.details import DEMO_SSH_REFUSAL

    ran: list[list[str]] = []
    monkeypatch.setattr(terminal, "runner", lambda argv: ran.append(list(argv)) or 0)
    monkeypatch.setattr(hv, "demo", True)
    app = VirtdeckApp([hv], poll_interval=3600)
    monkeypatch.setattr(app, "suspend", _suspend)
    async with app.run_test(size=(140, 45)) as pilot:
        await _open(app, pilot, "web")
        await pilot.press("S")
        await _until(app, pilot, lambda: any(DEMO_SSH_REFUSAL in n.message
                                             for n in app._notifications))  # fmt: skip
        await pilot.press("C")  # the console is the test driver's own: still handed over
        await _until(app, pilot, lambda: len(ran) == 1)
    assert ran[0][0] == "virsh"


async def test_an_empty_hypervisor_says_what_to_do(tmp_path: Path) -> None:
    from textual.geometry import Region
    from textual.widgets import Static, Tree

    from tui.widgets.snapshots_pane import NO_DOMAINS, NO_DOMAINS_HINT, SnapshotsPane

    path = tmp_path / "empty.xml"
    path.write_text(node_xml([]))
    hv = Hypervisor.open(f"test://{path}")
    app = VirtdeckApp([hv], poll_interval=3600)
    try:
        async with app.run_test(size=(140, 45)) as pilot:
            pane = app.screen.query_one(SnapshotsPane)
            tree = pane.query_one("#snap-tree", Tree)
            details = pane.query_one("#snap-details", Static)
            await _until(app, pilot, lambda: str(tree.root.label) == NO_DOMAINS)
            await _until(app, pilot, lambda: str(details.render()) == NO_DOMAINS_HINT)
            # Seen whole at the size operators use: a Tree line is cut at the tree's width
            # (the hint once sat in the label and ended at "virt-ma"); the details area wraps.
            assert len(NO_DOMAINS) + 4 <= tree.size.width, (NO_DOMAINS, tree.size)
            shown = " ".join(
                "".join(seg.text for seg in strip).strip()
                for strip in details.render_lines(Region(0, 0, *details.size))
            )
            assert "T makes it a template" in shown and "'virtdeck --demo'" in shown, shown
    finally:
        hv.close()
