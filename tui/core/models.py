"""Frozen data the core hands to its two faces (TUI and CLI).

Nothing here holds a libvirt handle: a widget or a JSON dump can keep these as long as it likes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any


class DomainState(enum.Enum):
    """libvirt's virDomainState, named as operators say it."""

    NOSTATE = "no state"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutting down"
    SHUTOFF = "shut off"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @classmethod
    def from_libvirt(cls, code: int) -> DomainState:
        order = list(cls)
        return order[code] if 0 <= code < len(order) else cls.NOSTATE

    @property
    def active(self) -> bool:
        return self not in (DomainState.SHUTOFF, DomainState.NOSTATE, DomainState.CRASHED)


class DiskKind(enum.Enum):
    """What a disk's <source> is (the `type` attribute of <disk>), as virtdeck treats it.

    Only FILE disks are image files virtdeck may create, copy, overlay, chmod, commit or
    delete (see tui.core.storage); the others are shown, never written.
    """

    FILE = "file"
    VOLUME = "volume"  # a storage-pool volume named by pool and volume
    BLOCK = "block"  # a host block device (/dev/...)
    NETWORK = "network"  # nbd, iscsi, rbd, gluster, http... (the name is not a local path)
    DIR = "dir"  # a host directory exported as a FAT disk
    EMPTY = "empty"  # a removable drive without media
    # A source whose name holds a control character (a newline: libvirt writes it raw in the
    # attribute, and an XML parser reads it as a space, i.e. as another file's name): shown,
    # never taken for an image (every operation refuses or keeps it).
    UNSAFE = "unsafe"

    @classmethod
    def from_xml(cls, disk_type: str | None, has_source: bool) -> DiskKind:
        if not has_source:
            return cls.EMPTY
        try:
            return cls(disk_type or "file")
        except ValueError:
            return cls.NETWORK  # unknown types (nvme, vhostuser...): never a local file


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a domain, from its XML, with host-side sizes when libvirt reports them.

    `source` is what the XML names (a file or device path, `nbd://host/export`,
    `pool/volume`); `path` is set only for FILE disks: it is an image file path on the
    disk's hypervisor, never on this machine unless that hypervisor is this machine.
    """

    target: str
    path: str | None
    format: str | None
    device: str = "disk"
    readonly: bool = False
    backing_path: str | None = None
    allocation_bytes: int | None = None
    capacity_bytes: int | None = None
    kind: DiskKind = DiskKind.FILE
    source: str | None = None
    shareable: bool = False

    @property
    def removable(self) -> bool:
        return self.device in ("cdrom", "floppy")

    @property
    def is_image(self) -> bool:
        """A writable disk image file this domain owns (what clones copy and snapshots cover)."""
        return (
            self.kind == DiskKind.FILE
            and self.device == "disk"
            and bool(self.path)
            and not self.readonly
            and not self.shareable
        )

    @property
    def described(self) -> str:
        """How an operator would name it: 'block device /dev/sdb', 'network disk nbd://h/x'."""
        what = {
            DiskKind.FILE: "file",
            DiskKind.VOLUME: "pool volume",
            DiskKind.BLOCK: "block device",
            DiskKind.NETWORK: "network disk",
            DiskKind.DIR: "host directory",
            DiskKind.EMPTY: "empty drive",
            DiskKind.UNSAFE: "disk whose name holds a control character,",
        }[self.kind]
        if self.removable and self.kind != DiskKind.EMPTY:
            what = f"{self.device} {what}"
        return f"{what} {self.source}" if self.source else what


@dataclass(frozen=True)
class InterfaceInfo:
    mac: str | None
    type: str
    source: str | None


@dataclass(frozen=True)
class VirtdeckMeta:
    """What virtdeck recorded in the domain's <metadata> (see tui.core.domxml)."""

    role: str | None = None  # "template" or "clone"
    created: str | None = None
    source: str | None = None  # template: the VM it was made from; clone: its template
    operations: tuple[str, ...] = ()
    sealed: bool = False
    mode: str | None = None  # clone: "thin" or "full"
    xml_backup: str | None = None
    complete: bool = True  # clone: False until its disks are whole (a crash mid-copy)
    host: str | None = None  # template: the hypervisor it was made on (tui.core.templates.host_key)
    # template: what sealing added to virt-sysprep (tui.core.sealing); None: not recorded
    # (made before virtdeck recorded it, or not sealed)
    sealing: tuple[str, ...] | None = None
    # template versions (tui.core.versions): the family's first template, this one's number;
    # None: a template made by 'template create' (version 1 of its own family)
    family: str | None = None
    version: int | None = None
    # template: a content digest of each disk's base, layer by layer (lowest first), as
    # ((disk target, ("sha256:…", …)), …); None: not recorded (tui.core.baseid)
    base_identity: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    # clone: the cloud-init seed image virtdeck made for it (its CD-ROM; rm --storage
    # deletes it, the one removable medium virtdeck ever deletes)
    seed: str | None = None
    # template: how its clones get their identity by default ("cloud-init": a seed each;
    # None: virt-customize), and, when imported, the sha256 of the image it came from
    identity: str | None = None
    imported: str | None = None
    address: str | None = None  # clone: the static address its seed gives (--ip), checked


@dataclass(frozen=True)
class DomainInfo:
    """One domain row: identity, state, size and disks; `host` is the URI it lives on."""

    host: str
    name: str
    uuid: str
    state: DomainState
    vcpus: int
    memory_bytes: int
    max_memory_bytes: int
    persistent: bool = True
    cpu_percent: float | None = None
    disks: tuple[DiskInfo, ...] = ()
    interfaces: tuple[InterfaceInfo, ...] = ()
    meta: VirtdeckMeta = field(default_factory=VirtdeckMeta)

    @property
    def is_template(self) -> bool:
        return self.meta.role == "template"

    @property
    def disk_allocation_bytes(self) -> int | None:
        sizes = [d.allocation_bytes for d in self.disks if d.allocation_bytes is not None]
        return sum(sizes) if sizes else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["template"] = self.is_template
        data["disk_allocation_bytes"] = self.disk_allocation_bytes
        for disk in data["disks"]:
            disk["kind"] = disk["kind"].value
        return data


@dataclass(frozen=True)
class HostInfo:
    """The header line: which hypervisor, which versions."""

    uri: str
    hostname: str
    driver: str
    libvirt_version: str
    hypervisor_version: str | None
    demo: bool = False


class EventKind(enum.Enum):
    LIFECYCLE = "lifecycle"
    CONNECTION_LOST = "connection lost"
    RECONNECTED = "reconnected"


@dataclass(frozen=True)
class DomainEvent:
    """A libvirt event, already translated; `name` is empty for connection events."""

    host: str
    kind: EventKind
    name: str = ""
    uuid: str = ""
    detail: str = ""


def version_string(code: int) -> str:
    """libvirt packs versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{code // 1_000_000}.{code // 1000 % 1000}.{code % 1000}"


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[Any, ...]:
    """Names as people sort them: 'vm5' < 'vm6' < 'vm50' (digit runs compare as numbers;
    re.split puts text at the even places and numbers at the odd ones, so the parts always
    compare like with like)."""
    parts = _DIGITS.split(text.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))
