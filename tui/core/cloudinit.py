"""cloud-init NoCloud seeds: one small ISO 9660 image per clone, labelled `cidata`.

A seed holds three files cloud-init's NoCloud datasource reads from a CD-ROM labelled
`cidata` (Joliet and Rock Ridge, so the lower-case names survive every reader):

- `meta-data`: a unique `instance-id` (cloud-init runs its per-instance modules, new SSH host
  keys included, once per instance id) and `local-hostname`;
- `user-data`: `#cloud-config` with the clone's identity (tui.core.identity: SSH keys, the
  hostname, first-boot commands as `runcmd`); with the operator's own file (`--user-data`,
  read bounded) both go as a MIME multi-part message, cloud-init's documented way to combine
  them;
- `network-config` (version 2) when the clone gets a static address (`--ip`), matched by the
  clone's MAC.

YAML is written as JSON (a subset of YAML 1.2 that cloud-init's loader reads), so no YAML
library is needed and nothing an operator typed can inject a key. The image is built in
memory with pycdlib (no genisoimage/xorriso on the host); it carries SSH keys and the
operator's user-data, so it is written 0600 and never logged.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from tui.core import private
from tui.core.identity import IdentityError, SshKey

LABEL = "cidata"
#: An operator's user-data is a cloud-config or a script: kilobytes. More is refused unread.
MAX_USER_DATA_BYTES = 1 << 20


@dataclass(frozen=True)
class Network:
    """A static IPv4/IPv6 configuration for the clone's first NIC."""

    address: str  # "10.0.0.10/24"
    gateway: str | None = None
    dns: tuple[str, ...] = ()

    def line(self) -> str:
        parts = [f"address {self.address}"]
        if self.gateway:
            parts.append(f"gateway {self.gateway}")
        if self.dns:
            parts.append(f"dns {', '.join(self.dns)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Seed:
    """What one clone's seed says; `files()` gives the three NoCloud files."""

    hostname: str
    instance_id: str = field(default_factory=lambda: f"virtdeck-{uuidlib.uuid4()}")
    ssh_keys: tuple[SshKey, ...] = ()
    first_boot: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    user_data: str | None = None  # the operator's own (--user-data), already checked
    network: Network | None = None
    mac: str | None = None  # the NIC the network config is for

    def meta_data(self) -> str:
        return _yaml({"instance-id": self.instance_id, "local-hostname": self.hostname})

    def cloud_config(self) -> str:
        config: dict[str, Any] = {
            "hostname": self.hostname.split(".")[0],
            "preserve_hostname": False,
        }
        if "." in self.hostname:
            config["fqdn"] = self.hostname
        root_keys = [k.key for k in self.ssh_keys if k.user == "root"]
        if root_keys:
            # cc_ssh gives root the same keys as the default user when root may log in.
            config["disable_root"] = False
            config["ssh_authorized_keys"] = root_keys
        users: list[Any] = ["default"]
        for user in dict.fromkeys(k.user for k in self.ssh_keys if k.user != "root"):
            users.append(
                {
                    "name": user,
                    "shell": "/bin/bash",
                    "sudo": "ALL=(ALL) NOPASSWD:ALL",
                    "ssh_authorized_keys": [k.key for k in self.ssh_keys if k.user == user],
                }
            )
        if len(users) > 1:
            config["users"] = users
        if self.packages:
            config["packages"] = list(self.packages)
        if self.first_boot:
            config["runcmd"] = [["sh", "-c", c] for c in self.first_boot]
        return "#cloud-config\n" + _yaml(config)

    def user_data_text(self) -> str:
        own = self.cloud_config()
        if self.user_data is None:
            return own
        message = MIMEMultipart()
        message.attach(MIMEText(own, "cloud-config"))
        subtype = "cloud-config" if self.user_data.startswith("#cloud-config") else "x-shellscript"
        message.attach(MIMEText(self.user_data, subtype))
        return message.as_string()

    def network_config(self) -> str | None:
        if self.network is None:
            return None
        nic: dict[str, Any] = {"addresses": [self.network.address]}
        if self.mac:
            nic["match"] = {"macaddress": self.mac}
        else:
            nic["match"] = {"name": "e*"}
        if self.network.gateway:
            default = "::/0" if ":" in self.network.gateway else "0.0.0.0/0"
            nic["routes"] = [{"to": default, "via": self.network.gateway}]
        if self.network.dns:
            nic["nameservers"] = {"addresses": list(self.network.dns)}
        return _yaml({"version": 2, "ethernets": {"nic0": nic}})

    def files(self) -> dict[str, str]:
        out = {"meta-data": self.meta_data(), "user-data": self.user_data_text()}
        network = self.network_config()
        if network is not None:
            out["network-config"] = network
        return out

    def line(self) -> str:
        """The plan's one line: what the seed says, never its keys or user-data."""
        parts = [f"cloud-init seed: hostname {self.hostname}"]
        parts.extend(k.line() for k in self.ssh_keys)
        parts.extend(f"first boot: {c}" for c in self.first_boot)
        if self.user_data is not None:
            parts.append("the operator's user-data")
        if self.network is not None:
            parts.append(self.network.line())
        return "; ".join(parts)


def _yaml(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=True) + "\n"


def iso_bytes(seed: Seed) -> bytes:
    """The seed as an ISO 9660 image labelled `cidata` (Joliet + Rock Ridge)."""
    import pycdlib  # a few ms to import: only when a seed is made

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    for number, (name, text) in enumerate(sorted(seed.files().items())):
        data = text.encode("utf-8")
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/SEED{number}.;1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def read_iso(data: bytes) -> dict[str, str]:
    """The files of a seed image, by their Rock Ridge names (tests, `virtdeck` checks)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        found = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dir():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            found[name] = out.getvalue().decode("utf-8")
        return found
    finally:
        iso.close()


def volume_label(data: bytes) -> str:
    """The ISO 9660 volume identifier of an image (the primary descriptor at 32 KiB)."""
    return data[0x8000 + 40 : 0x8000 + 72].decode("ascii", "replace").rstrip()


def write_seed(path: str | Path, data: bytes) -> None:
    """A new seed file on this machine, 0600, never over an existing one (it holds keys)."""
    fd = private.open_private(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


# -- what the operator asks for --------------------------------------------------------------


def read_user_data(path: str | Path) -> str:
    """The operator's own user-data file, checked: a cloud-config or a script, at most 1 MiB."""
    try:
        raw = private.read_bounded(path, MAX_USER_DATA_BYTES)
    except FileNotFoundError:
        raise IdentityError(f"--user-data {path}: no such file") from None
    except IsADirectoryError:
        raise IdentityError(f"--user-data {path}: is a directory") from None
    except ValueError as err:
        raise IdentityError(f"--user-data {path}: {err}") from None
    except OSError as err:
        raise IdentityError(f"--user-data {path}: cannot read it: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError(f"--user-data {path}: not a UTF-8 text file") from None
    if not (text.startswith("#cloud-config") or text.startswith("#!")):
        raise IdentityError(
            f"--user-data {path}: starts neither with '#cloud-config' nor with '#!' "
            "(cloud-init would ignore it)"
        )
    return text


def addresses(spec: str, count: int) -> tuple[str, ...]:
    """`--ip 10.0.0.10/24` for one clone, `10.0.0.10/24+` for `count` consecutive ones; each
    a host address inside its network (not the network or broadcast address)."""
    consecutive = spec.endswith("+")
    text = spec[:-1] if consecutive else spec
    if "/" not in text:
        raise IdentityError(f"--ip {spec!r}: give an address with its prefix, e.g. 10.0.0.10/24")
    try:
        first = ipaddress.ip_interface(text)
    except ValueError:
        raise IdentityError(f"--ip {spec!r} is not an address/prefix (e.g. 10.0.0.10/24)") from None
    if count > 1 and not consecutive:
        raise IdentityError(
            f"--ip {spec!r} gives one address to {count} clones: end it with '+' for "
            "consecutive addresses (e.g. 10.0.0.10/24+)"
        )
    net = first.network
    out = []
    for i in range(count):
        addr = first.ip + i
        if addr not in net or (
            net.num_addresses > 2 and addr in (net.network_address, net.broadcast_address)
        ):
            raise IdentityError(
                f"--ip {spec!r}: {count} consecutive addresses do not fit in {net} "
                f"(clone {i + 1} would get {addr})"
            )
        out.append(f"{addr}/{net.prefixlen}")
    return tuple(out)


def check_gateway(gateway: str | None, addrs: Sequence[str]) -> str | None:
    if gateway is None:
        return None
    try:
        gw = ipaddress.ip_address(gateway)
    except ValueError:
        raise IdentityError(f"--gateway {gateway!r} is not an IP address") from None
    for a in addrs:
        if gw not in ipaddress.ip_interface(a).network:
            raise IdentityError(
                f"--gateway {gateway} is outside {ipaddress.ip_interface(a).network}"
            )
    return str(gw)


def check_dns(servers: Sequence[str]) -> tuple[str, ...]:
    out = []
    for s in servers:
        for part in s.split(","):
            try:
                out.append(str(ipaddress.ip_address(part.strip())))
            except ValueError:
                raise IdentityError(f"--dns {part!r} is not an IP address") from None
    return tuple(out)
