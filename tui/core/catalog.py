"""The templates of a hypervisor and the domains that use their images: template listing
(defined ones and those kept only as XML backups, keyed by host), their base images with sizes
from the storage resolver (unknown stays unknown), their thin and full clones, and who uses an
image (asked of the storage graph)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tui.core import domxml, private
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskInfo, DomainInfo, VirtdeckMeta
from tui.core.paths import template_backup_dir
from tui.core.sealing import FirstBoot, first_boot
from tui.core.storage import (
    ImageUser,
    Owner,
    Resolver,
    StorageGraph,
)
from tui.core.units import total

#: runner(argv, on_line) -> exit status; calls on_line for every line of output (stdout+stderr).
LineRunner = Callable[[Sequence[str], Callable[[str], None]], int]


# -- images and the domains that use them ---------------------------------------------------


def own_images(disks: Iterable[DiskInfo]) -> list[DiskInfo]:
    """The writable image files a domain owns (CD-ROMs, read-only and shareable disks, block
    devices and network disks are not images virtdeck copies, seals or deletes)."""
    return [d for d in disks if d.is_image]


def foreign_disks(disks: Iterable[DiskInfo]) -> list[DiskInfo]:
    """Writable disks that are not image files (block, network, pool volume, directory)."""
    return [
        d
        for d in disks
        if d.device == "disk" and not d.readonly and not d.shareable and not d.is_image
    ]


def backup_owners(backup_dir: Path | None = None, hv: Hypervisor | None = None) -> list[Owner]:
    """Templates known only from their XML backups (of `hv`), as owners of images."""
    return [
        Owner(b.name, domxml.disks(b.root), defined=False) for b in backup_templates(backup_dir, hv)
    ]


def storage_graph(
    hv: Hypervisor, backup_dir: Path | None = None, resolver: Resolver | None = None
) -> StorageGraph:
    """Every domain of `hv` and every template backup, with their chains."""
    return StorageGraph.read(
        hv,
        resolver=resolver or Resolver(hv, ssh=True),
        extra_owners=backup_owners(backup_dir, hv),
    )


def image_users(
    hv: Hypervisor,
    images: Iterable[str],
    *,
    exclude: str | None = None,
    backup_dir: Path | None = None,
) -> list[ImageUser]:
    """Every domain other than `exclude` (name) whose disks are, or build on, one of `images`."""
    images = list(images)
    if not images:
        return []
    return storage_graph(hv, backup_dir).users(images, exclude=exclude)


# -- the templates of a hypervisor -----------------------------------------------------------


@dataclass(frozen=True)
class BaseImage:
    """A template's base image; sizes and mode nobody could read are None, with the reason."""

    path: str
    format: str | None
    target: str
    virtual_bytes: int | None
    actual_bytes: int | None
    read_only: bool | None
    problem: str | None = None


@dataclass(frozen=True)
class Template:
    host: str
    name: str
    defined: bool
    xml_backup: str | None
    source: str | None  # the VM it was made from
    created: str | None
    sealed: bool
    sealed_operations: tuple[str, ...]
    base_images: tuple[BaseImage, ...]
    thin_clones: tuple[str, ...]
    full_clones: tuple[str, ...]
    incomplete_clones: tuple[str, ...] = ()  # interrupted before their disks were whole
    sealing: tuple[str, ...] | None = None  # what sealing added (tui.core.sealing); None: unknown
    family: str | None = None  # the first template of its versions (tui.core.versions)
    version: int = 1
    # sha256 of each disk's base layers, lowest first (tui.core.baseid); None: not recorded
    base_identity: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    identity: str | None = None  # "cloud-init": its clones get seeds by default (imported)
    imported: str | None = None  # the sha256 of the cloud image it was imported from

    @property
    def shares(self) -> tuple[str, ...]:
        """What its clones share (a warning): nothing when cloud-init gives each its own
        (a cloud image ships no machine-id and no host keys; cloud-init makes them per
        instance id), else what sealing left."""
        if self.identity == "cloud-init" or not self.sealed:
            return ()
        return tuple(self.first_boot.shared)

    @property
    def first_boot(self) -> FirstBoot:
        """What each clone makes of its own at first boot, and what the clones share."""
        return first_boot(self.sealed, self.sealed_operations, self.sealing)

    @property
    def virtual_bytes(self) -> int | None:
        return total(b.virtual_bytes for b in self.base_images)

    @property
    def actual_bytes(self) -> int | None:
        return total(b.actual_bytes for b in self.base_images)

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(b.problem for b in self.base_images if b.problem)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["virtual_bytes"] = self.virtual_bytes
        data["actual_bytes"] = self.actual_bytes
        data["problems"] = list(self.problems)
        data["sealed_operations"] = list(self.sealed_operations)
        data["thin_clones"] = list(self.thin_clones)
        data["full_clones"] = list(self.full_clones)
        data["incomplete_clones"] = list(self.incomplete_clones)
        data["sealing"] = None if self.sealing is None else list(self.sealing)
        data["first_boot"] = self.first_boot.to_json()
        data["base_identity"] = (
            None if self.base_identity is None else {d: list(ls) for d, ls in self.base_identity}
        )
        return data


@dataclass(frozen=True)
class BackupTemplate:
    name: str
    path: Path
    root: Any  # ET.Element of the backed-up domain XML


def host_key(hv: Hypervisor) -> str:
    """Which hypervisor a template backup belongs to: a system daemon by its host name (so
    qemu:///system and qemu+ssh://that-host/system are one), any other by its URI."""
    found = _host_keys.get(hv.uri)
    if found is not None:
        return found
    if urlsplit(hv.uri).path.rstrip("/") != "/system":
        return hv.uri
    try:
        found = _host_keys[hv.uri] = f"system@{hv.call(hv.conn.getHostname)}"
    except VirtdeckError:
        return hv.uri  # not cached: asked again once the host answers
    return found


_host_keys: dict[str, str] = {}  # a URI's host name does not change while virtdeck runs


MAX_BACKUP_BYTES = 4 << 20  # a domain's XML is a few KiB


def backup_templates(
    backup_dir: Path | None = None, hv: Hypervisor | None = None
) -> list[BackupTemplate]:
    """The template XML backups in the backup directory (defined or not); with `hv`, only
    those of that hypervisor (a backup from before hosts were recorded belongs to the
    hypervisors of this machine)."""
    key = host_key(hv) if hv is not None else None
    directory = Path(backup_dir) if backup_dir is not None else template_backup_dir()
    out = []
    for path in sorted(directory.glob("*.xml")):
        try:
            # Bounded: a FIFO or a huge file named *.xml in the directory is skipped unread.
            root = domxml.parse(private.read_bounded(path, MAX_BACKUP_BYTES).decode())
        except (OSError, ValueError, domxml.ET.ParseError):
            continue
        name = root.findtext("name")
        meta = domxml.read_meta(root)
        if not name or meta.role != "template":
            continue
        if hv is not None and (meta.host != key if meta.host else not hv.local):
            continue
        out.append(BackupTemplate(name, path, root))
    return out


def template_xml(hv: Hypervisor, name: str, backup_dir: Path | None = None) -> tuple[str, bool]:
    """(inactive XML, defined) of the template `name`: the domain, else its XML backup."""
    if hv.exists(name):
        xml = hv.xml(name, inactive=True)
        if domxml.read_meta(domxml.parse(xml)).role != "template":
            raise InvalidInputError(
                f"'{name}' is not a template; make one with 'virtdeck template create {name}'"
            )
        return xml, True
    for backup in backup_templates(backup_dir, hv):
        if backup.name == name:
            return domxml.to_string(backup.root), False
    raise NotFoundError(
        f"no template named '{name}' on {hv.uri} or in "
        f"{backup_dir or template_backup_dir()} ('virtdeck template ls' lists them)"
    )


def _base_image(disk: DiskInfo, graph: StorageGraph) -> BaseImage:
    assert disk.path is not None
    chain = graph.chain(disk.path, disk.format)
    top = chain.top
    return BaseImage(
        disk.path,
        disk.format,
        disk.target,
        top.virtual_bytes,
        top.actual_bytes,
        top.read_only,
        chain.problem,
    )


def list_templates(
    hv: Hypervisor,
    backup_dir: Path | None = None,
    *,
    include_backups: bool = True,
    domains: list[DomainInfo] | None = None,
    resolver: Resolver | None = None,
) -> list[Template]:
    """Defined templates, plus undefined ones from their XML backups, with their clones.

    A thin clone is a domain whose metadata names the template with mode "thin", or any domain
    whose backing chain reaches one of its base images (clones made by hand count too).
    """
    domains = hv.domains() if domains is None else domains
    found: list[tuple[str, bool, str | None, VirtdeckMeta, tuple[DiskInfo, ...]]] = []
    names = {d.name for d in domains}
    for d in domains:
        if d.is_template:
            found.append((d.name, True, d.meta.xml_backup, d.meta, d.disks))
    if include_backups:
        for backup in backup_templates(backup_dir, hv):
            if backup.name not in names:
                meta = domxml.read_meta(backup.root)
                found.append(
                    (backup.name, False, str(backup.path), meta, domxml.disks(backup.root))
                )
    # One graph of every domain's chains (read in-process, cached), shared by all templates.
    graph = StorageGraph(
        resolver or Resolver(hv), [Owner(d.name, d.disks) for d in domains if not d.is_template]
    )
    # A clone of version 2 of a template (tui.core.versions) also builds on version 1's base:
    # it counts as a clone of the version nearest to it in its chain only.
    bases = {graph.canonical(d.path) for *_, disks in found for d in own_images(disks) if d.path}
    nearest: dict[str, set[str]] = {}
    for oc in graph.chains:
        hit = next((p for p in oc.chain.paths[1:] if p in bases), None)
        if hit is not None:
            nearest.setdefault(oc.owner, set()).add(hit)
    out = []
    for name, defined, backup_path, meta, disks in found:
        images = tuple(_base_image(disk, graph) for disk in own_images(disks))
        mine = {graph.canonical(b.path) for b in images}
        users = {
            u.name
            for u in graph.users([b.path for b in images])
            if u.how == "backing" and nearest.get(u.name, set()) & mine
        }
        thin, full, incomplete = _clones_of(name, domains, users)
        out.append(
            Template(
                host=hv.uri,
                name=name,
                defined=defined,
                xml_backup=backup_path,
                source=meta.source,
                created=meta.created,
                sealed=meta.sealed,
                sealed_operations=meta.operations,
                base_images=images,
                thin_clones=tuple(thin),
                full_clones=tuple(full),
                incomplete_clones=tuple(incomplete),
                sealing=meta.sealing,
                family=meta.family,
                version=meta.version or 1,
                base_identity=meta.base_identity,
                identity=meta.identity,
                imported=meta.imported,
            )
        )
    out.sort(key=lambda t: t.name)
    return out


def _clones_of(
    name: str, domains: list[DomainInfo], users: set[str]
) -> tuple[list[str], list[str], list[str]]:
    """A template's thin clones (its metadata says so, or `users`: their chains reach its
    base), full clones and clones not finished yet."""
    thin, full, incomplete = [], [], []
    for d in domains:
        if d.is_template:
            continue
        ours = d.meta.role == "clone" and d.meta.source == name
        if ours and not d.meta.complete:
            incomplete.append(d.name)
        elif d.name in users or (ours and d.meta.mode == "thin"):
            thin.append(d.name)
        elif ours:
            full.append(d.name)
    return thin, full, incomplete


def get_template(hv: Hypervisor, name: str, backup_dir: Path | None = None) -> Template:
    for t in list_templates(hv, backup_dir):
        if t.name == name:
            return t
    raise NotFoundError(f"no template named '{name}' ('virtdeck template ls' lists them)")
