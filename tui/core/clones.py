"""Deploying clones from a template, and removing domains without breaking the clones of others.

Plan, then execute (like virt-manager's cloner): `plan_clone()` validates everything before a
byte is written (names, file collisions, the template and its seal, free space) and returns the
names, files, UUIDs, MACs, XML and space needed, and every per-domain resource the clone XML
makes unique, copies, renews or shares (tui.core.clonexml); `execute_clone()` defines every
clone first (so an XML error surfaces before any copy), then copies the template's NVRAM for
each clone and makes the disks: a qcow2 overlay per disk for a thin clone (absolute backing
path and backing format recorded in the overlay), a sparse `qemu-img convert` copy for a full
one. Whatever fails, or an interrupt, undefines what it defined and deletes the files it made.

`plan_remove()` refuses to remove a domain whose images other domains build on (thin clones of
a template) and lists them; with storage it deletes only the domain's own top images, never a
backing file.
"""

from __future__ import annotations

import os
import random
import uuid as uuidlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tui.core import bases, clonexml, cloudinit, domxml, ops
from tui.core.clonexml import FileCopy, Rewrite
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor, validate_name
from tui.core.identity import (
    AUTO,
    CLOUD_INIT,
    DEFAULT_HOSTNAME,
    Customisation,
    Customiser,
    Identity,
    IdentityError,
    check_hostname,
    customise_all,
    hostname_default,
    require_tool,
)
from tui.core.models import DiskInfo, DiskKind, VirtdeckMeta
from tui.core.progress import Progress, no_progress
from tui.core.storage import Chain, Resolver, files_for
from tui.core.storage.qemuimg import QemuImg
from tui.core.templates import (
    foreign_disks,
    now_iso,
    own_images,
    template_xml,
)

# Keep the usual prefixes when clone XML is written back (libvirt matches by URI anyway).
domxml.ET.register_namespace("libosinfo", "http://libosinfo.org/xmlns/libvirt/domain/1.0")
domxml.ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")

#: What a fresh qcow2 overlay takes on disk (header, L1 table, refcounts), rounded up.
OVERLAY_BYTES = 1024 * 1024
_EXT = {"qcow2": ".qcow2", "raw": ".img"}


@dataclass(frozen=True)
class CloneDisk:
    target: str
    base: str  # the template's image (absolute)
    base_format: str
    path: str  # the clone's own file
    format: str
    bytes_needed: int


@dataclass(frozen=True)
class CloneItem:
    name: str
    uuid: str
    macs: tuple[str, ...]
    disks: tuple[CloneDisk, ...]
    xml: str
    rewrites: tuple[Rewrite, ...] = ()  # per-domain resources made unique, copied, shared...
    copies: tuple[FileCopy, ...] = ()  # files copied for it (the template's NVRAM)
    customise: Customisation | None = None  # its hostname, SSH keys, first-boot commands
    seed: cloudinit.Seed | None = None  # its cloud-init seed (written at seed_path, a CD-ROM)
    seed_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rewrites"] = [r.to_json() for r in self.rewrites]
        data["copies"] = [c.to_json() for c in self.copies]
        data["customise"] = self.customise.to_json() if self.customise else None
        # what the seed says, never its keys or the operator's user-data
        data["seed"] = None if self.seed is None else {"path": self.seed_path,
                                                       "says": self.seed.line()}  # fmt: skip
        data.pop("seed_path")
        return data


@dataclass(frozen=True)
class ClonePlan(ops.PlanDefaults):
    host: str
    template: str
    template_defined: bool
    sealed: bool
    mode: str  # "thin" or "full"
    start: bool
    items: tuple[CloneItem, ...]
    bytes_needed: int
    bytes_free: int | None  # on the emptiest target filesystem
    notes: tuple[str, ...] = ()  # storage set-up on another host (pools defined)
    edit_of: int | None = None  # the version an edit VM ('template update') will become

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.items)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(d.path for i in self.items for d in i.disks)

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(i.seed_path for i in self.items if i.seed_path)

    @property
    def copies(self) -> tuple[FileCopy, ...]:
        return tuple(c for i in self.items for c in i.copies)

    @property
    def warnings(self) -> tuple[Rewrite, ...]:
        """What every clone shares although it is per-domain (once, not per clone)."""
        found = (r for i in self.items for r in i.rewrites if r.kind == "shared-warning")
        return tuple(dict.fromkeys(found))

    @property
    def title(self) -> str:
        if self.edit_of is not None:
            name, version = self.names[0], self.edit_of
            return f"Make '{name}' to edit into version {version} of '{self.template}'?"
        return f"Deploy {len(self.items)} {self.mode} clone(s) of '{self.template}'?"

    @property
    def confirm_label(self) -> str:
        return "Make" if self.edit_of is not None else "Deploy"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        names = execute_clone(hv, self, progress)
        if self.edit_of is not None:
            return (
                f"made {names[0]} on '{self.template}': edit it, then seal it into version "
                f"{self.edit_of} ('virtdeck template seal {names[0]}')"
            )
        return f"deployed {', '.join(names)} ({self.mode}) from '{self.template}'"

    def summary(self) -> list[str]:
        lines = []
        explained: set[str] = set()  # a reason is given once, at its first clone
        for item in self.items:
            lines.append(f"{item.name}  uuid {item.uuid}  mac {', '.join(item.macs) or '-'}")
            if item.customise is not None:
                why = item.customise.hostname_why
                lines.append(
                    f"  identity: {item.customise.line()}"
                    + (f" ({why})" if why and "identity" not in explained else "")
                )
                explained.add("identity")
            if item.seed is not None:
                lines.append(f"  identity: {item.seed.line()}")
                lines.append(f"  seed: {item.seed_path} (its CD-ROM, read by cloud-init at boot)")
            for d in item.disks:
                how = f"overlay on {d.base}" if self.mode == "thin" else f"copy of {d.base}"
                lines.append(f"  {d.target}: {d.path} ({how})")
            for r in item.rewrites:
                if r.kind != "shared-warning":
                    why = "" if r.element in explained else f" ({r.why})"
                    explained.add(r.element)
                    lines.append(f"  {r.line()}{why}")
        lines.append(f"space needed: {_size(self.bytes_needed)}"
                     + (f" of {_size(self.bytes_free)} free" if self.bytes_free is not None
                        else ""))  # fmt: skip
        lines.extend(self.notes)
        if self.start:
            lines.append("start every clone afterwards")
        if self.edit_of is not None:
            lines.append(f"sealing it ('virtdeck template seal') makes version {self.edit_of}")
        elif not self.sealed:
            lines.append(f"warning: '{self.template}' is not sealed; clones share its identity")
        lines.extend(f"warning: {r.line()}: {r.why}" for r in self.warnings)
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "template": self.template,
            "template_defined": self.template_defined,
            "sealed": self.sealed,
            "mode": self.mode,
            "start": self.start,
            "items": [i.to_json() for i in self.items],
            "bytes_needed": self.bytes_needed,
            "bytes_free": self.bytes_free,
            "notes": list(self.notes),
            "warnings": [r.to_json() for r in self.warnings],
            "customised": [i.name for i in self.items if i.customise is not None],
            "seeded": [i.name for i in self.items if i.seed is not None],
        }


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _all_macs(hv: Hypervisor) -> set[str]:
    return {i.mac.lower() for d in hv.domains() for i in d.interfaces if i.mac}


def _new_mac(taken: set[str], rng: random.Random) -> str:
    # 52:54:00 is QEMU/KVM's locally administered prefix, what libvirt itself picks from.
    while True:
        mac = "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            taken.add(mac)
            return mac


def _chain_allocation(chain: Chain) -> int:
    """What an image and its backing chain occupy on the host, plus room for new metadata: an
    upper bound of what a sparse, flattened copy needs, read in-process (no subprocess)."""
    return sum(i.actual_bytes or 0 for i in chain.links) + _METADATA_MARGIN


_METADATA_MARGIN = 1024**2


def _target_dir(base: str, directory: str | Path | None) -> str:
    return os.path.abspath(str(directory)) if directory is not None else os.path.dirname(base)


def _check_disks(template: str, disks: tuple[DiskInfo, ...]) -> list[DiskInfo]:
    """The template's image disks; refuses a writable disk that is not an image file (a block
    device or a network disk would be shared by every clone, or taken for a local file)."""
    for disk in foreign_disks(disks):
        raise InvalidInputError(
            f"disk {disk.target} of '{template}' is a {disk.described}: virtdeck clones image "
            "files only (every clone would write to the same device); detach it from the "
            "template first"
        )
    bases = own_images(disks)
    if not bases:
        raise InvalidInputError(f"template '{template}' has no disk image to clone")
    return bases


#: More clones than this in one go is a typo, not a plan (and would take minutes to refuse).
MAX_COUNT = 1000


def clone_names(name: str, count: int) -> list[str]:
    if not 1 <= count <= MAX_COUNT:
        raise InvalidInputError(f"--count must be from 1 to {MAX_COUNT} (got {count})")
    if count == 1:
        return [validate_name(name)]
    return [validate_name(f"{name}-{i}") for i in range(1, count + 1)]


def plan_clone(
    hv: Hypervisor,
    template: str,
    name: str,
    *,
    full: bool = False,
    count: int = 1,
    start: bool = False,
    directory: str | Path | None = None,
    allow_unsealed: bool = False,
    backup_dir: Path | None = None,
    qemu: QemuImg | None = None,
    rng: random.Random | None = None,
    identity: Identity | None = None,
) -> ClonePlan:
    """Validate and describe the clones; nothing is written. `identity`: what each clone gets
    of its own (tui.core.identity); by default nothing."""
    files = files_for(hv, "clone", qemu_img=qemu)
    rng = rng or random.SystemRandom()
    names = clone_names(name, count)
    troot, meta, defined = _clonable(hv, template, backup_dir, allow_unsealed)
    for n in names:
        if hv.exists(n):
            raise InvalidInputError(f"a domain named '{n}' already exists; choose another name")
    if directory is not None and not files.is_dir(str(directory)):
        raise InvalidInputError(f"--dir {directory} is not a directory")
    tdisks = domxml.disks(troot)
    bases = _check_disks(template, tdisks)
    wanted = identity or Identity()
    seeded = wanted.method == CLOUD_INIT or (wanted.method == AUTO and meta.identity == CLOUD_INIT)
    if not seeded and (wanted.ip or wanted.gateway or wanted.dns or wanted.user_data):
        raise IdentityError(
            "--ip, --gateway, --dns and --user-data go in a cloud-init seed: add --identity "
            f"cloud-init ('{template}' does not give its clones seeds by default)"
        )
    not_customisable = "" if seeded else _not_customisable(hv, template, tdisks)
    if wanted.explicit and not_customisable:
        raise IdentityError(not_customisable)
    network = _seed_network(wanted, len(names), clonexml.interface_count(troot))
    if network:
        _refuse_taken_addresses(hv, network)
    chains = _base_chains(Resolver(hv, qemu_img=qemu, ssh=True), template, bases)
    measured = _full_sizes(files, bases, chains, directory, len(names)) if full else {}
    hostname, hostname_why, kept = _hostname_choice(wanted, seeded, meta, bases, not_customisable)
    if not seeded and (hostname is not None or wanted.explicit):
        require_tool()
    nvram = clonexml.nvram_path(troot)
    shared = _Shared(
        template=template, troot=troot, meta=meta, bases=bases, full=full, measured=measured,
        directory=directory, seeded=seeded, wanted=wanted, hostname=hostname,
        hostname_why=hostname_why, network=network,
        nvram_bytes=files.file_size(nvram) if nvram else None,
    )  # fmt: skip
    claims = _Claims(files)
    taken_macs = _all_macs(hv)
    items: list[CloneItem] = []
    for n in names:
        items.append(_plan_item(shared, claims, n, len(items), taken_macs, rng))
    free = {dev: files.free_bytes(d) for dev, d in claims.dirs.items()}
    for dev, need in claims.needed.items():
        if need > free[dev]:
            raise InvalidInputError(
                f"not enough space in {claims.dirs[dev]}: the clones need {_size(need)}, "
                f"{_size(free[dev])} is free (choose --dir elsewhere, or thin clones)"
            )
    return ClonePlan(
        host=hv.uri,
        template=template,
        template_defined=defined,
        sealed=meta.sealed,
        mode="full" if full else "thin",
        start=start,
        items=tuple(items),
        bytes_needed=sum(claims.needed.values()),
        bytes_free=min(free.values()) if free else None,
        notes=tuple(files.pool_notes([d.path for i in items for d in i.disks]))
        + kept
        + tuple(n for n in (files.free_note(d) for d in claims.dirs.values()) if n),
    )


def _clonable(
    hv: Hypervisor, template: str, backup_dir: Path | None, allow_unsealed: bool
) -> tuple[Any, VirtdeckMeta, bool]:
    """The template's parsed XML, its metadata and whether it is defined; refused while it
    runs, or unsealed unless allowed."""
    xml, defined = template_xml(hv, template, backup_dir)
    if defined and hv.domain(template).state.active:
        raise StateError(
            f"template '{template}' is running (started outside virtdeck?): it is writing to "
            f"the base its clones would read; shut it down first"
        )
    troot = domxml.parse(xml)
    meta = domxml.read_meta(troot)
    if not meta.sealed and not allow_unsealed:
        raise StateError(
            f"template '{template}' is not sealed (no virt-sysprep): its clones would share "
            "its SSH host keys and machine-id; allow it with --allow-unsealed"
        )
    return troot, meta, defined


def _base_chains(resolver: Resolver, template: str, bases: list[DiskInfo]) -> dict[str, Chain]:
    chains: dict[str, Chain] = {}
    for disk in bases:
        assert disk.path is not None
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target} of template '{template}': {chain.problem}")
        chains[disk.path] = chain
    return chains


def _full_sizes(
    files: Any,
    bases: list[DiskInfo],
    chains: dict[str, Chain],
    directory: str | Path | None,
    count: int,
) -> dict[str, int]:
    """What a full copy of each base takes. The chain's real allocation bounds the copy's
    size; only where that bound does not clearly fit is `qemu-img measure` (exact, but a
    subprocess per disk) worth running."""
    measured: dict[str, int] = {}
    for disk in bases:
        assert disk.path is not None
        measured[disk.path] = _chain_allocation(chains[disk.path])
    bound_by_dev: dict[int, tuple[str, int]] = {}
    for disk in bases:
        assert disk.path is not None
        where = _target_dir(os.path.abspath(disk.path), directory)
        dev = files.device(where)
        total = bound_by_dev.get(dev, (where, 0))[1] + measured[disk.path] * count
        bound_by_dev[dev] = (where, total)
    if any(total > files.free_bytes(where) for where, total in bound_by_dev.values()):
        for disk in bases:
            assert disk.path is not None
            measured[disk.path] = files.measure(disk.path, disk.format or "qcow2")
    return measured


def _hostname_choice(
    wanted: Identity,
    seeded: bool,
    meta: VirtdeckMeta,
    bases: list[DiskInfo],
    not_customisable: str,
) -> tuple[str | None, str, tuple[str, ...]]:
    """The clones' hostname pattern (None: left alone), why it is set by default, and the
    note that says why it is not."""
    hostname = wanted.hostname
    if seeded:
        if hostname is None and not wanted.hostname_by_default:
            raise IdentityError(
                "--keep-hostname: a cloud-init seed always names the clone's host (cloud-init "
                "would take the instance id otherwise); give --hostname-template instead"
            )
        return hostname or DEFAULT_HOSTNAME, "", ()
    if hostname is None and wanted.hostname_by_default:
        first = bases[0]
        assert first.path is not None
        applies, why = hostname_default(
            meta.sealed, (first.path, first.format or "qcow2"), not not_customisable
        )
        if applies:
            return DEFAULT_HOSTNAME, why, ()
        return None, "", (why,) if why else ()
    return hostname, "", ()


@dataclass(frozen=True)
class _Shared:
    """What every clone of one plan is made from (plan_clone's findings)."""

    template: str
    troot: Any
    meta: VirtdeckMeta
    bases: list[DiskInfo]
    full: bool
    measured: dict[str, int]
    directory: str | Path | None
    seeded: bool
    wanted: Identity
    hostname: str | None
    hostname_why: str
    network: tuple[Any, ...] | None
    nvram_bytes: int | None


@dataclass
class _Claims:
    """The files the clones of one plan will make, and the bytes they need per device (with
    a directory on each device to read its free space from)."""

    files: Any
    taken: set[str] = field(default_factory=set)
    needed: dict[int, int] = field(default_factory=dict)
    dirs: dict[int, str] = field(default_factory=dict)

    def take(self, path: str, taken: str, need: int, *, names_dir: bool | None = True) -> None:
        """Claim `path` (`taken`: the error when it exists or another clone has it) and the
        bytes it needs; `names_dir`: this directory is the device's to read free space from
        (None: only if the device has none yet; False: never)."""
        if self.files.lexists(path) or path in self.taken:
            raise InvalidInputError(taken)
        self.taken.add(path)
        dev = self.files.device(os.path.dirname(path))
        self.needed[dev] = self.needed.get(dev, 0) + need
        if names_dir:
            self.dirs[dev] = os.path.dirname(path)
        elif names_dir is None:
            self.dirs.setdefault(dev, os.path.dirname(path))


def _plan_item(
    s: _Shared, claims: _Claims, n: str, index: int, taken_macs: set[str], rng: random.Random
) -> CloneItem:
    """One clone: its disks, UUID, MACs, XML, file copies, seed or customisation."""
    disks = []
    for i, disk in enumerate(s.bases):
        assert disk.path is not None
        base = os.path.abspath(disk.path)
        base_fmt = disk.format or "qcow2"
        fmt = base_fmt if s.full else "qcow2"
        where = _target_dir(base, s.directory)
        stem = n if i == 0 else f"{n}-{disk.target}"
        path = os.path.join(os.path.abspath(where), stem + _EXT.get(fmt, "." + fmt))
        need = s.measured[disk.path] if s.full else OVERLAY_BYTES
        claims.take(path, f"{path} already exists; choose another name or --dir", need)
        disks.append(CloneDisk(disk.target, base, base_fmt, path, fmt, need))
    uuid = str(uuidlib.uuid4())
    macs = tuple(_new_mac(taken_macs, rng) for _ in range(clonexml.interface_count(s.troot)))
    seed_path = None
    if s.seeded:
        seed_path = os.path.join(os.path.dirname(disks[0].path), f"{n}-seed.iso")
        claims.take(seed_path, f"{seed_path} already exists; choose another name", SEED_BYTES,
                    names_dir=False)  # fmt: skip
    ident = clonexml.CloneIdentity(
        name=n,
        uuid=uuid,
        macs=macs,
        disks=tuple((d.target, d.path, d.format) for d in disks),
        meta=VirtdeckMeta(
            role="clone",
            created=now_iso(),
            source=s.template,
            mode="full" if s.full else "thin",
            complete=False,
            seed=seed_path,
            address=s.network[index].address if s.network else None,
        ),
        old_names=(s.template, s.meta.source or ""),
        nvram_present=s.nvram_bytes is not None,
    )
    out = clonexml.clone_xml(s.troot, ident)
    hostname = (
        None if s.hostname is None else check_hostname(s.hostname.format(name=n, n=index + 1), n)
    )
    seed = None
    if seed_path is not None:
        assert hostname is not None
        seed = cloudinit.Seed(
            hostname,
            ssh_keys=s.wanted.ssh_keys,
            first_boot=s.wanted.first_boot,
            user_data=s.wanted.user_data,
            network=s.network[index] if s.network else None,
            mac=macs[0] if macs else None,
        )
        out = replace(out, xml=with_seed_cdrom(out.xml, seed_path))
    copies = []
    for c in out.copies:
        taken = f"{c.destination} ({c.what} of '{n}') already exists; choose another name"
        claims.take(c.destination, taken, s.nvram_bytes or 0, names_dir=None)
        copies.append(replace(c, bytes=s.nvram_bytes or 0))
    custom = None
    if not s.seeded and (hostname is not None or s.wanted.ssh_keys or s.wanted.first_boot):
        custom = Customisation(
            images=tuple((d.path, d.format) for d in disks),
            hostname=hostname,
            ssh_keys=s.wanted.ssh_keys,
            first_boot=s.wanted.first_boot,
            hostname_why=s.hostname_why,
        )
    return CloneItem(n, uuid, macs, tuple(disks), out.xml, out.rewrites, tuple(copies), custom,
                     seed, seed_path)  # fmt: skip


#: What a seed image takes (a few files in a small ISO 9660 image: about 360 KiB), rounded up.
SEED_BYTES = 1024 * 1024


def _seed_network(wanted: Identity, count: int, nics: int) -> tuple[cloudinit.Network, ...] | None:
    """Each clone's static address (--ip, --gateway, --dns), checked; None without --ip."""
    if wanted.ip is None:
        return None
    if nics == 0:
        raise IdentityError("--ip: the template has no network interface to give it to")
    addrs = cloudinit.addresses(wanted.ip, count)
    gateway = cloudinit.check_gateway(wanted.gateway, addrs)
    dns = cloudinit.check_dns(wanted.dns)
    return tuple(cloudinit.Network(a, gateway, dns) for a in addrs)


def _refuse_taken_addresses(hv: Hypervisor, network: tuple[cloudinit.Network, ...]) -> None:
    """An address virtdeck already gave a clone on this host (its metadata) is not given
    twice (two guests answering for one address)."""
    import ipaddress

    taken = {}
    for d in hv.domains():
        if d.meta.address:
            taken[ipaddress.ip_interface(d.meta.address).ip] = d.name
    for net in network:
        ip = ipaddress.ip_interface(net.address).ip
        if ip in taken:
            raise IdentityError(
                f"--ip: {ip} is already given to '{taken[ip]}' on {hv.uri}; choose other addresses"
            )


def with_seed_cdrom(xml: str, path: str) -> str:
    """The clone's XML with its seed as a read-only CD-ROM: SATA on a q35 machine, IDE
    otherwise, on the first free target name."""
    root = domxml.parse(xml)
    os_type = root.find("os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    used = {t.get("dev") for t in root.findall("devices/disk/target")}
    if "q35" in machine:
        bus, names = "sata", [f"sd{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    else:
        bus, names = "ide", ["hdc", "hdd", "hda", "hdb"]
    free = [d for d in names if d not in used]
    if not free:
        raise IdentityError(f"no free {bus} slot for the cloud-init seed's CD-ROM")
    devices = root.find("devices")
    if devices is None:
        devices = domxml.ET.SubElement(root, "devices")
    disk = domxml.ET.SubElement(devices, "disk", type="file", device="cdrom")
    domxml.ET.SubElement(disk, "driver", name="qemu", type="raw")
    domxml.ET.SubElement(disk, "source", file=path)
    domxml.ET.SubElement(disk, "target", dev=free[0], bus=bus)
    domxml.ET.SubElement(disk, "readonly")
    return domxml.to_string(root)


def _not_customisable(hv: Hypervisor, template: str, disks: tuple[DiskInfo, ...]) -> str:
    """Why virt-customize cannot write this template's clones ("" when it can: this
    machine's files, image disks only)."""
    if not hv.local:
        return (
            f"cannot give clones on {hv.uri} their own identity: virt-customize writes the "
            "clone's disk on this machine and that host is not proved to be this one; make "
            "the clones there, or drop --hostname-template/--ssh-key/--first-boot"
        )
    for d in own_images(disks):
        if d.kind != DiskKind.FILE:
            return (
                f"disk {d.target} of '{template}' is a {d.described}: virt-customize writes "
                "image files only; drop --hostname-template/--ssh-key/--first-boot"
            )
    return ""


def execute_clone(
    hv: Hypervisor,
    plan: ClonePlan,
    progress: Progress = no_progress,
    *,
    qemu: QemuImg | None = None,
    customiser: Customiser | None = None,
) -> list[str]:
    """Define every clone, then make its disks, then customise them (virt-customize, in
    parallel); undo all of it on any failure or interrupt.

    Starting (when asked) comes last: a clone that fails to start stays defined and is named in
    the error, since its disks and definition are complete.

    Under the lock of the template's image family (tui.core.bases) from the re-check to the
    last step: a removal of the template waits, then sees the new clones; a clone that waited
    for a removal finds the base gone and refuses.
    """
    sources = [d.base for i in plan.items for d in i.disks] + [
        c.source for i in plan.items for c in i.copies
    ]
    with bases.family_lock(hv, sources):
        resolver = Resolver(hv, ssh=True)
        for base in dict.fromkeys(d.base for i in plan.items for d in i.disks):
            chain = resolver.chain(base)
            if not chain.complete:
                raise NotFoundError(
                    f"the base {base} of '{plan.template}' is no longer whole ({chain.problem}); "
                    "nothing was made"
                )
        return _execute_clone(hv, plan, progress, qemu=qemu, customiser=customiser)


def _execute_clone(
    hv: Hypervisor,
    plan: ClonePlan,
    progress: Progress,
    *,
    qemu: QemuImg | None,
    customiser: Customiser | None,
) -> list[str]:
    files = files_for(hv, "clone", qemu_img=qemu)
    _still_free(hv, files, plan)
    total = sum(d.bytes_needed for i in plan.items for d in i.disks) or 1
    done, progress = 0, ops.cancellable(progress)
    title = f"deploying {len(plan.items)} {plan.mode} clone(s) of '{plan.template}'"
    try:
        made = [d.path for i in plan.items for d in i.disks]
        made += [c.destination for i in plan.items for c in i.copies]
        made += list(plan.seeds)
        dirs = {os.path.dirname(p) for p in made}
        with ops.running(
            hv, title, domains=[plan.template, *(i.name for i in plan.items)], dirs=dirs
        ) as undo:
            for item in plan.items:
                progress(f"defining '{item.name}'", None)
                # NVRAM is kept by the undefine: the copy below has its own undo, and libvirt's
                # removal would also take a file someone else put at that path meanwhile.
                undo.push(f"undefine '{item.name}'", "undefine", uuid=item.uuid,
                          name=item.name, keep_nvram=True)  # fmt: skip
                hv.define(item.xml, what=f"defining clone '{item.name}' failed")
            for item in plan.items:
                for c in item.copies:
                    progress(f"{item.name}: copying {c.what} {c.source}", None)
                    with undo.step(f"remove {c.destination}", "delete_file", path=c.destination):
                        files.copy_file(c.source, c.destination)
            for item in plan.items:
                for d in item.disks:
                    if files.lexists(d.path):
                        raise InvalidInputError(f"{d.path} appeared meanwhile; nothing was kept")
                    with undo.step(f"remove {d.path}", "delete_file", path=d.path):
                        _make_disk(files, plan.mode, item.name, d, progress, done, total)
                    done += d.bytes_needed
                if item.seed is not None and item.seed_path is not None:
                    progress(f"{item.name}: cloud-init seed {item.seed_path}", None)
                    with undo.step(f"remove {item.seed_path}", "delete_file",
                                   path=item.seed_path):  # fmt: skip
                        files.write_new(item.seed_path, cloudinit.iso_bytes(item.seed))
                # Only now is it a clone: until its disks are whole (and customised) it is
                # marked incomplete (template ls and usage never count a partial copy).
                if item.customise is None:
                    _mark_complete(hv, item.name)
            work = [(i.name, i.customise) for i in plan.items if i.customise is not None]
            if work:
                customise_all(work, progress, customiser=customiser)
                for name, _ in work:
                    _mark_complete(hv, name)
            progress(f"{len(plan.items)} {plan.mode} clone(s) of '{plan.template}' made", 1.0)
            not_started: tuple[str, VirtdeckError] | None = None
            for item in plan.items if plan.start else ():
                # An interrupt here still unwinds everything (the undefines force off what
                # runs); a clone that fails to start is complete, so it stays, named below.
                progress(f"starting '{item.name}'", None)
                try:
                    hv.start(item.name)
                except VirtdeckError as err:
                    not_started = (item.name, err)
                    break
            undo.commit()
    finally:
        hv.invalidate()
    if not_started is not None:
        raise OperationError(
            f"clone '{not_started[0]}' was made but did not start: {not_started[1]}"
        )
    return list(plan.names)


def _still_free(hv: Hypervisor, files: Any, plan: ClonePlan) -> None:
    """The names and files the plan makes are still nobody's (checked again when acting)."""
    for item in plan.items:
        if hv.exists(item.name):
            raise InvalidInputError(f"a domain named '{item.name}' already exists; plan again")
        own = [d.path for d in item.disks] + [c.destination for c in item.copies]
        for path in own + ([item.seed_path] if item.seed_path else []):
            if files.lexists(path):
                raise InvalidInputError(f"{path} already exists; plan again")


def _make_disk(
    files: Any, mode: str, name: str, d: CloneDisk, progress: Progress, done: int, total: int
) -> None:
    """A clone's disk: an overlay on its base (thin) or a copy of it (full)."""
    if mode == "thin":
        progress(f"{name}: overlay {d.path} on {d.base}", done / total)
        files.create_overlay(d.path, d.base, d.base_format)
        return
    start, share = done / total, d.bytes_needed / total

    def scaled(msg: str, frac: float | None) -> None:
        progress(msg, None if frac is None else start + frac * share)

    files.copy(d.base, d.path, src_fmt=d.base_format, dst_fmt=d.format, progress=scaled,
               label=f"{name}: copying {os.path.basename(d.base)}")  # fmt: skip


def _mark_complete(hv: Hypervisor, name: str) -> None:
    hv.update_meta(name, f"marking clone '{name}' complete", complete=True)


# `rm` lives in tui.core.removal; its names stay importable from here.
from tui.core.removal import RemovePlan, execute_remove, plan_remove  # noqa: E402,F401
