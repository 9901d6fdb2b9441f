"""Snapshot trees and quick rollback: internal and external snapshots, create, revert, delete.

The core builds the tree (frozen SnapshotNode values) and every change is a plan first
(`plan_create`, `plan_revert`, `plan_rollback`, `plan_delete`: pure reads, validated, with the
lines a confirmation should show), then an execution that reports progress and undoes what it
did when it fails.

Who does the work:
- internal snapshots (qcow2 only): libvirt, running or shut off;
- external snapshots are created by libvirt (it makes the overlays, and the memory file of a
  running guest). Reverting and deleting them is libvirt's job only where it says it can: the
  `<externalSnapshot/>` guest feature of the capabilities XML, advertised since libvirt 9.9.
  Older libvirt (Debian 12 has 9.0) refuses to revert external snapshots, so virtdeck does it:
  a fresh overlay on the snapshot's image, the domain XML switched to it, the snapshot metadata
  redefined as current, the memory state restored from the snapshot's memory file if it has one;
  and deletes them by committing the snapshot's overlay into its image (block commit while
  running, `qemu-img commit` when shut off) and fixing the XML.

Files are never removed while anything still needs them: the domain's disks, another snapshot's
image chain, or any image (another domain's disk, a thin clone) whose backing chain holds them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import libvirt

from tui.core import domxml
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor, libvirt_message, validate_name
from tui.core.models import DomainState
from tui.core.progress import Progress, no_progress
from tui.core.qemuimg import QemuImg

INTERNAL = "internal"
EXTERNAL = "external"
DISK_ONLY = "disk-only"

_COMMIT_TIMEOUT = 600.0


# -- the tree ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotFile:
    """A file an external snapshot made: an overlay (role 'disk vda') or its memory state."""

    path: str
    role: str
    size_bytes: int | None  # allocated on the host; None when the file is gone or remote


@dataclass(frozen=True)
class SnapshotDisk:
    """One disk as the snapshot saw it.

    `image` is the file that holds the disk as it was at snapshot time (for an internal
    snapshot, the qcow2 that contains it); `overlay` is the external overlay that took the
    writes after it (None for internal snapshots).
    """

    target: str
    snapshot: str  # internal | external | no
    image: str | None
    image_format: str | None
    overlay: str | None = None


@dataclass(frozen=True)
class SnapshotNode:
    name: str
    parent: str | None
    children: tuple[str, ...]
    created: dt.datetime
    state: str  # the domain's state when it was taken ("disk-snapshot" for disk-only)
    kind: str  # internal | external | disk-only
    current: bool
    description: str
    files: tuple[SnapshotFile, ...] = ()
    disks: tuple[SnapshotDisk, ...] = ()
    memory_file: str | None = None

    @property
    def external(self) -> bool:
        return self.kind != INTERNAL

    def disk(self, target: str) -> SnapshotDisk | None:
        return next((d for d in self.disks if d.target == target), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parent": self.parent,
            "children": list(self.children),
            "created": self.created.isoformat(),
            "state": self.state,
            "kind": self.kind,
            "current": self.current,
            "description": self.description,
            "files": [
                {"path": f.path, "role": f.role, "size_bytes": f.size_bytes} for f in self.files
            ],
        }


@dataclass(frozen=True)
class SnapshotTree:
    """A domain's snapshots, depth first: roots and siblings in creation order."""

    domain: str
    nodes: tuple[SnapshotNode, ...] = ()

    @property
    def current(self) -> SnapshotNode | None:
        return next((n for n in self.nodes if n.current), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def find(self, name: str) -> SnapshotNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    def get(self, name: str) -> SnapshotNode:
        node = self.find(name)
        if node is None:
            raise NotFoundError(
                f"'{self.domain}' has no snapshot named '{name}' "
                f"('virtdeck snapshot ls {self.domain}' lists them)"
            )
        return node

    def roots(self) -> list[SnapshotNode]:
        return [n for n in self.nodes if n.parent is None]

    def walk(self) -> Iterator[tuple[SnapshotNode, int]]:
        """(node, depth) in display order."""
        depth: dict[str, int] = {}
        for node in self.nodes:
            d = depth[node.parent] + 1 if node.parent in depth else 0
            depth[node.name] = d
            yield node, d

    def descendants(self, name: str) -> list[str]:
        """Every descendant of `name`, deepest first (the order they can be deleted in)."""
        out: list[str] = []

        def visit(n: str) -> None:
            for child in self.get(n).children:
                visit(child)
                out.append(child)

        visit(name)
        return out

    def kinds(self) -> set[str]:
        return {INTERNAL if n.kind == INTERNAL else EXTERNAL for n in self.nodes}

    def render(self, mark_current: bool = True) -> str:
        """The tree drawn the way `virsh snapshot-list --tree` draws it, the current marked."""
        lines: list[str] = []

        def draw(node: SnapshotNode, last: str | None, root: bool, indent: str) -> None:
            label = node.name + (" (current)" if mark_current and node.current else "")
            lines.append(f"{indent}{'' if root else '+- '}{label}")
            if not root:
                indent += (" " if node.name == last else "|") + " "
            if node.children:
                lines.append(f"{indent}  |")
            for child in node.children:
                draw(self.get(child), node.children[-1], False, indent + "  ")
            if not node.children and node.name == last:
                lines.append(indent)

        for root in self.roots():
            draw(root, root.name, True, "")
            lines.append("")
        return "\n".join(lines) + "\n" if lines else ""


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def parse_snapshot_xml(xml: str, *, current: bool = False) -> SnapshotNode:
    """A node (without children) from libvirt's snapshot XML."""
    root = ET.fromstring(xml)
    name = root.findtext("name") or "?"
    state = (root.findtext("state") or "nostate").strip()
    created_ts = int(root.findtext("creationTime") or 0)
    parent = root.findtext("parent/name")
    memory = root.find("memory")
    mem_kind = memory.get("snapshot", "no") if memory is not None else "no"
    mem_file = memory.get("file") if memory is not None and mem_kind == "external" else None

    dom_disks: dict[str, tuple[str | None, str | None]] = {}
    dom = root.find("domain")
    if dom is not None:
        for d in domxml.disks(dom):
            dom_disks[d.target] = (d.path, d.format)

    disks: list[SnapshotDisk] = []
    seen: set[str] = set()
    for elem in root.findall("disks/disk"):
        target = elem.get("name", "?")
        seen.add(target)
        kind = elem.get("snapshot", "no")
        src = elem.find("source")
        overlay = src.get("file") if src is not None and kind == "external" else None
        image, fmt = dom_disks.get(target, (None, None))
        disks.append(SnapshotDisk(target, kind, image, fmt, overlay))
    for target, (image, fmt) in dom_disks.items():
        if target not in seen:
            disks.append(SnapshotDisk(target, "no", image, fmt))

    kinds = {d.snapshot for d in disks} | {mem_kind}
    if INTERNAL in kinds:
        kind = INTERNAL
    elif EXTERNAL in kinds:
        # With memory state it reverts to a running guest; without, only the disks come back.
        kind = EXTERNAL if mem_file else DISK_ONLY
    else:
        kind = INTERNAL
    files: list[SnapshotFile] = []
    for sd in disks:
        if sd.overlay:
            files.append(SnapshotFile(sd.overlay, f"disk {sd.target}", _file_size(sd.overlay)))
    if mem_file:
        files.append(SnapshotFile(mem_file, "memory", _file_size(mem_file)))
    return SnapshotNode(
        name=name,
        parent=parent,
        children=(),
        created=dt.datetime.fromtimestamp(created_ts, dt.UTC),
        state=state,
        kind=kind,
        current=current,
        description=(root.findtext("description") or "").strip(),
        files=tuple(files),
        disks=tuple(disks),
        memory_file=mem_file,
    )


def build_tree(domain: str, nodes: Iterable[SnapshotNode]) -> SnapshotTree:
    """Link parents and children and order the nodes depth first (pure: tests feed it XML)."""
    by_name = {n.name: n for n in nodes}
    kids: dict[str | None, list[SnapshotNode]] = {}
    for n in by_name.values():
        parent = n.parent if n.parent in by_name else None
        kids.setdefault(parent, []).append(n)
    for lst in kids.values():
        lst.sort(key=lambda n: (n.created, n.name))
    ordered: list[SnapshotNode] = []

    def visit(n: SnapshotNode) -> None:
        children = kids.get(n.name, [])
        parent = n.parent if n.parent in by_name else None
        ordered.append(replace(n, parent=parent, children=tuple(c.name for c in children)))
        for c in children:
            visit(c)

    for root in kids.get(None, []):
        visit(root)
    return SnapshotTree(domain, tuple(ordered))


def _lv(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call libvirt; its error becomes one OperationError/StateError line."""
    try:
        return fn(*args)
    except libvirt.libvirtError as err:
        code = err.get_error_code()
        msg = f"{what}: {libvirt_message(err)}"
        if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise NotFoundError(msg) from None
        if code == libvirt.VIR_ERR_OPERATION_INVALID:
            raise StateError(msg) from None
        raise OperationError(msg) from None


def snapshot_tree(hv: Hypervisor, domain: str) -> SnapshotTree:
    """The domain's snapshot tree: one listAllSnapshots, then each snapshot's XML."""
    dom = hv.lookup(domain)
    snaps = _lv(f"listing snapshots of '{domain}'", dom.listAllSnapshots, 0)
    nodes = []
    for snap in snaps:
        try:
            xml = snap.getXMLDesc(0)
            current = bool(snap.isCurrent(0))
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                continue  # deleted between the list and now
            raise OperationError(
                f"reading snapshot of '{domain}': {libvirt_message(err)}"
            ) from None
        nodes.append(parse_snapshot_xml(xml, current=current))
    return build_tree(domain, nodes)


def libvirt_handles_external(hv: Hypervisor) -> bool:
    """True when libvirt reverts and deletes external snapshots itself.

    Advertised as <externalSnapshot/> among the guest features of the capabilities XML
    (libvirt 9.9 and newer); decided at run time, never from the distribution.
    """
    try:
        caps = ET.fromstring(hv.conn.getCapabilities())
    except (libvirt.libvirtError, ET.ParseError):
        return False
    return caps.find("./guest/features/externalSnapshot") is not None


# -- helpers over the domain ------------------------------------------------------------------


@dataclass(frozen=True)
class _Disk:
    target: str
    path: str | None
    format: str | None
    device: str
    readonly: bool

    @property
    def snapshottable(self) -> bool:
        return self.device == "disk" and not self.readonly


def _domain_disks(xml: str) -> list[_Disk]:
    return [
        _Disk(d.target, d.path, d.format, d.device, d.readonly)
        for d in domxml.disks(domxml.parse(xml))
    ]


def _state(hv: Hypervisor, domain: str) -> DomainState:
    dom = hv.lookup(domain)
    return DomainState.from_libvirt(_lv(domain, dom.state)[0])


def validate_snapshot_name(name: str) -> str:
    return validate_name(name, "snapshot name", " (it becomes part of file names)")


class _Files:
    """Backing-chain edges of the images around one domain, read with `qemu-img info -U`.

    Enough to answer "who still needs this file?": the domain's disks, its snapshots' images,
    every other domain's disks, and any image lying in the same directories (thin clones,
    overlays of other tools) whose backing chain holds it.
    """

    def __init__(self, qemu_img: QemuImg) -> None:
        self.qemu_img = qemu_img
        self.backing: dict[str, str | None] = {}
        self.format: dict[str, str] = {}

    def add(self, path: str | None) -> None:
        if not path or path in self.backing or not os.path.isfile(path):
            return
        try:
            chain = self.qemu_img.info(path, backing_chain=True)
        except (VirtdeckError, ValueError):
            return
        for entry in chain:
            name = os.path.abspath(entry.get("filename", ""))
            back = entry.get("full-backing-filename") or entry.get("backing-filename")
            if back and not os.path.isabs(back):
                back = os.path.join(os.path.dirname(name), back)
            self.backing.setdefault(name, os.path.abspath(back) if back else None)
            self.format.setdefault(name, entry.get("format", "raw"))

    def add_dir(self, directory: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                self.add(entry.path)

    def chain(self, path: str | None) -> list[str]:
        out: list[str] = []
        while path and path not in out:
            out.append(path)
            path = self.backing.get(path)
        return out

    def users(self, path: str) -> set[str]:
        return {f for f, b in self.backing.items() if b == path}


def _scan(hv: Hypervisor, qemu_img: QemuImg, domain: str, tree: SnapshotTree) -> _Files:
    files = _Files(qemu_img)
    dirs: set[str] = set()
    for node in tree.nodes:
        for d in node.disks:
            for p in (d.image, d.overlay):
                if p:
                    files.add(p)
                    dirs.add(os.path.dirname(p))
    for path in _other_domain_paths(hv, domain) + _own_paths(hv, domain):
        files.add(path)
    for path in _own_paths(hv, domain):
        dirs.add(os.path.dirname(path))
    for directory in sorted(dirs):
        files.add_dir(directory)
    return files


def _own_paths(hv: Hypervisor, domain: str) -> list[str]:
    return [d.path for d in _domain_disks(hv.xml(domain)) if d.path and d.snapshottable]


def _other_domain_paths(hv: Hypervisor, domain: str) -> list[str]:
    out: list[str] = []
    for dom in _lv("listing domains", hv.conn.listAllDomains, 0):
        try:
            if dom.name() == domain:
                continue
            xmls = [dom.XMLDesc(0)]
            if dom.isActive() and dom.isPersistent():
                xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError:
            continue  # gone while listing
        for xml in xmls:
            out += [d.path for d in _domain_disks(xml) if d.path]
    return out


def _unneeded(
    files: _Files, before: Iterable[str], keep: Iterable[str], going: Iterable[str] = ()
) -> list[str]:
    """Files in the chains of `before` that nothing in `keep` (nor any other image) needs."""
    needed: set[str] = set()
    for root in keep:
        needed.update(files.chain(root))
    gone = set(going)
    cand = {p for b in before for p in files.chain(b)} - needed - gone
    cand = {p for p in cand if os.path.isfile(p)}
    changed = True
    while changed:
        changed = False
        for c in sorted(cand):
            if any(u not in cand and u not in gone for u in files.users(c)):
                cand.discard(c)
                changed = True
    return sorted(cand)


def _snapshot_xml(hv: Hypervisor, domain: str, name: str) -> str:
    dom = hv.lookup(domain)
    snap = _lv(f"snapshot '{name}' of '{domain}'", dom.snapshotLookupByName, name, 0)
    return str(_lv(name, snap.getXMLDesc, libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE))


def _redefine(hv: Hypervisor, domain: str, xml: str, *, current: bool) -> None:
    dom = hv.lookup(domain)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    if current:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    _lv(f"updating snapshot metadata of '{domain}'", dom.snapshotCreateXML, xml, flags)


def _set_snapshot_disks(
    xml: str, *, overlays: dict[str, str] | None = None, images: dict[str, tuple[str, str]] | None
) -> str:
    """Snapshot XML with some overlay records (<disks>) or images (<domain> disks) replaced."""
    root = ET.fromstring(xml)
    for elem in root.findall("disks/disk"):
        target = elem.get("name", "")
        if overlays and target in overlays:
            src = elem.find("source")
            if src is not None:
                src.set("file", overlays[target])
    dom = root.find("domain")
    if images and dom is not None:
        _switch_disks(dom, images)
    return ET.tostring(root, encoding="unicode")


def _switch_disks(dom: ET.Element, sources: dict[str, tuple[str, str]]) -> None:
    """Point the domain XML's disks (by target) at other files; libvirt re-reads the chains."""
    for disk in domxml.disk_elements(dom):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sources:
            continue
        path, fmt = sources[dev]
        src = disk.find("source")
        if src is None:
            src = ET.SubElement(disk, "source")
        for attr in list(src.attrib):
            if attr not in ("file",):
                del src.attrib[attr]
        src.set("file", path)
        drv = disk.find("driver")
        if drv is not None:
            drv.set("type", fmt)
        for bs in disk.findall("backingStore"):
            disk.remove(bs)


def _remover(path: str, progress: Progress) -> Callable[[], None]:
    def undo() -> None:
        _remove([path], progress)

    return undo


def _remove(paths: Iterable[str], progress: Progress) -> list[str]:
    removed = []
    for p in paths:
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError as err:
            progress(f"could not remove {p}: {err.strerror}", None)
    return removed


# -- create -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatePlan:
    host: str
    domain: str
    name: str
    kind: str
    description: str
    running: bool
    quiesce: bool
    overlays: tuple[tuple[str, str, str], ...]  # (target, disk now, new overlay)
    memory_file: str | None
    xml: str
    flags: int
    notes: tuple[str, ...] = ()

    def summary(self) -> list[str]:
        lines = [f"{self.kind} snapshot '{self.name}' of '{self.domain}'"]
        for target, disk, overlay in self.overlays:
            lines.append(f"{target}: {disk} becomes read-only; new writes go to {overlay}")
        if self.memory_file:
            lines.append(f"memory state saved to {self.memory_file}")
        return lines + list(self.notes)


def plan_create(
    hv: Hypervisor,
    domain: str,
    name: str,
    *,
    external: bool = False,
    disk_only: bool = False,
    description: str = "",
    quiesce: bool = False,
) -> CreatePlan:
    validate_snapshot_name(name)
    tree = snapshot_tree(hv, domain)
    if tree.find(name):
        raise InvalidInputError(
            f"'{domain}' already has a snapshot named '{name}': pick another name"
        )
    state = _state(hv, domain)
    running = state.active
    if disk_only and not external:
        raise InvalidInputError(
            "--disk-only goes with --external (an internal snapshot of a running guest "
            "always saves its memory)"
        )
    if quiesce and not external:
        raise InvalidInputError("--quiesce goes with --external --disk-only")
    if quiesce and not disk_only:
        raise InvalidInputError(
            "--quiesce goes with --disk-only (libvirt freezes the guest file systems for "
            "disk-only snapshots)"
        )
    if quiesce and state != DomainState.RUNNING:
        raise StateError(
            f"--quiesce needs '{domain}' running with the QEMU guest agent; it is {state.value}"
        )
    kinds = tree.kinds()
    if external and INTERNAL in kinds:
        raise InvalidInputError(
            f"'{domain}' has internal snapshots; an external one on top would leave them "
            "impossible to revert: take an internal snapshot, or delete the internal ones first"
        )
    if not external and EXTERNAL in kinds:
        raise InvalidInputError(
            f"'{domain}' has external snapshots, so its disks are overlays an internal snapshot "
            "cannot mix with: add --external"
        )
    disks = _domain_disks(hv.xml(domain))
    targets = [d for d in disks if d.snapshottable]
    if not targets:
        raise InvalidInputError(f"'{domain}' has no writable disk to snapshot")
    for d in targets:
        if not d.path:
            raise InvalidInputError(
                f"disk {d.target} of '{domain}' is not a file; virtdeck snapshots file disks only"
            )
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    notes: list[str] = []
    overlays: list[tuple[str, str, str]] = []
    memory_file = None
    flags = 0
    if not external:
        raw = [d for d in targets if d.format != "qcow2"]
        if raw:
            d = raw[0]
            raise InvalidInputError(
                f"internal snapshots need qcow2 disks; {d.target} of '{domain}' is "
                f"{d.format or 'of unknown format'} ({d.path}): use --external"
            )
        kind = INTERNAL
        if running:
            notes.append(f"'{domain}' pauses while its memory and disks are saved")
        disks_el = ET.SubElement(root, "disks")
        for d in disks:
            ET.SubElement(
                disks_el, "disk", name=d.target, snapshot=INTERNAL if d.snapshottable else "no"
            )
    else:
        # libvirt takes external snapshots of a shut-off domain as disk-only ones (state
        # "disk-snapshot"): there is no memory to save.
        disk_only = disk_only or not running
        kind = DISK_ONLY if disk_only else EXTERNAL
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        if disk_only:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        first_dir = os.path.dirname(str(targets[0].path))
        if running and not disk_only:
            memory_file = os.path.join(first_dir, f"{domain}.{name}.mem")
            ET.SubElement(root, "memory", snapshot="external", file=memory_file)
            notes.append(f"'{domain}' pauses while its memory is saved")
        else:
            ET.SubElement(root, "memory", snapshot="no")
        disks_el = ET.SubElement(root, "disks")
        for d in disks:
            if not d.snapshottable:
                ET.SubElement(disks_el, "disk", name=d.target, snapshot="no")
                continue
            overlay = os.path.join(
                os.path.dirname(str(d.path)), f"{domain}.{name}.{d.target}.qcow2"
            )
            overlays.append((d.target, str(d.path), overlay))
            el = ET.SubElement(disks_el, "disk", name=d.target, snapshot=EXTERNAL)
            ET.SubElement(el, "driver", type="qcow2")
            ET.SubElement(el, "source", file=overlay)
        for path in [o for _, _, o in overlays] + ([memory_file] if memory_file else []):
            if os.path.exists(path):
                raise InvalidInputError(
                    f"{path} already exists; virtdeck never overwrites a file: pick another "
                    "snapshot name"
                )
    return CreatePlan(
        host=hv.uri,
        domain=domain,
        name=name,
        kind=kind,
        description=description,
        running=running,
        quiesce=quiesce,
        overlays=tuple(overlays),
        memory_file=memory_file,
        xml=ET.tostring(root, encoding="unicode"),
        flags=flags,
        notes=tuple(notes),
    )


def create(hv: Hypervisor, plan: CreatePlan, progress: Progress = no_progress) -> SnapshotNode:
    dom = hv.lookup(plan.domain)
    progress(f"taking {plan.kind} snapshot '{plan.name}' of '{plan.domain}'", None)
    made = [o for _, _, o in plan.overlays] + ([plan.memory_file] if plan.memory_file else [])
    try:
        _lv(
            f"snapshot '{plan.name}' of '{plan.domain}'",
            dom.snapshotCreateXML,
            plan.xml,
            plan.flags,
        )
    except VirtdeckError:
        # ATOMIC: libvirt put the disks back; remove what it may have left, unless in use.
        in_use = set(_own_paths(hv, plan.domain))
        _remove([p for p in made if p not in in_use], progress)
        raise
    finally:
        hv.invalidate(dom.UUIDString())
    progress(f"snapshot '{plan.name}' taken", 1.0)
    return snapshot_tree(hv, plan.domain).get(plan.name)


# -- revert -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSwitch:
    target: str
    image: str  # the snapshot's image (read-only from now on)
    image_format: str
    overlay: str  # the fresh overlay the disk will run on


@dataclass(frozen=True)
class RevertPlan:
    host: str
    domain: str
    snapshot: str
    kind: str
    method: str  # "libvirt" or "virtdeck"
    state_now: str
    result_state: str
    stop_first: bool = False
    switches: tuple[DiskSwitch, ...] = ()
    discard: tuple[str, ...] = ()
    restore_memory: str | None = None
    start_after: bool = False
    lost: tuple[str, ...] = ()
    domain_xml: str = ""  # virtdeck method: the definition to switch to

    def summary(self) -> list[str]:
        lines = [
            f"revert '{self.domain}' to {self.kind} snapshot '{self.snapshot}' "
            f"(by {self.method}); it ends {self.result_state}"
        ]
        lines += [f"lost: {x}" for x in self.lost]
        for s in self.switches:
            lines.append(f"{s.target}: new overlay {s.overlay} on {s.image}")
        return lines


def _lost_lines(
    domain: str, state: DomainState, tree: SnapshotTree, discard: Iterable[str]
) -> list[str]:
    cur = tree.current
    since = f"snapshot '{cur.name}' was taken" if cur else "the disks were created"
    lines = [f"every change to the disks of '{domain}' since {since} (or its last revert)"]
    if state.active:
        lines.insert(0, f"the running state of '{domain}' (it is {state.value} now)")
    lines += [f"file {p}" for p in discard]
    return lines


def plan_rollback(hv: Hypervisor, domain: str, *, qemu_img: QemuImg | None = None) -> RevertPlan:
    tree = snapshot_tree(hv, domain)
    if tree.current is None:
        raise NotFoundError(
            f"'{domain}' has no current snapshot to roll back to: take one with "
            f"'virtdeck snapshot create {domain} NAME'"
        )
    return plan_revert(hv, domain, tree.current.name, qemu_img=qemu_img, tree=tree)


def plan_revert(
    hv: Hypervisor,
    domain: str,
    name: str,
    *,
    qemu_img: QemuImg | None = None,
    tree: SnapshotTree | None = None,
    by_virtdeck: bool = False,
) -> RevertPlan:
    """`by_virtdeck`: revert an external snapshot with virtdeck's own steps even where libvirt
    could (tests use it to exercise that path on any libvirt)."""
    tree = tree or snapshot_tree(hv, domain)
    node = tree.get(name)
    state = _state(hv, domain)
    disks = {d.target: d for d in _domain_disks(hv.xml(domain))}
    result = "running" if node.state in ("running", "paused") else "shut off"
    if node.state == "paused":
        result = "paused"
    if node.kind == INTERNAL:
        for d in node.disks:
            if d.snapshot != INTERNAL:
                continue
            now = disks.get(d.target)
            if now is None or now.path != d.image:
                raise StateError(
                    f"internal snapshot '{name}' lives in {d.image}, but disk {d.target} of "
                    f"'{domain}' is now {now.path if now else 'gone'} (an external snapshot "
                    "was taken since): revert to that external snapshot first"
                )
        return RevertPlan(
            host=hv.uri,
            domain=domain,
            snapshot=name,
            kind=node.kind,
            method="libvirt",
            state_now=state.value,
            result_state=result,
            lost=tuple(_lost_lines(domain, state, tree, ())),
        )
    qemu_img = qemu_img or QemuImg()
    if (
        not by_virtdeck
        and libvirt_handles_external(hv)
        and not _used_elsewhere(hv, domain, tree, _revert_discards(tree, disks), qemu_img)
    ):
        # Without a memory state libvirt leaves the domain shut off unless asked to run it;
        # boot it afresh as virtdeck's own path does.
        start_after = node.state not in ("running", "paused") and state.active
        return RevertPlan(
            host=hv.uri,
            domain=domain,
            snapshot=name,
            kind=node.kind,
            method="libvirt",
            state_now=state.value,
            result_state="running (booted afresh from the snapshot's disks)"
            if start_after
            else result,
            start_after=start_after,
            lost=tuple(_lost_lines(domain, state, tree, ())),
        )
    return _plan_revert_external(hv, domain, node, tree, state, qemu_img)


def _revert_discards(tree: SnapshotTree, disks: dict[str, _Disk]) -> list[str]:
    """Files libvirt (>= 9.9) removes when it reverts: those holding the changes since the
    current external snapshot (its overlays, or the overlays of the last revert to it)."""
    cur = tree.current
    if cur is None:
        return []
    out: list[str] = []
    for d in cur.disks:
        if d.snapshot == EXTERNAL:
            now = disks.get(d.target)
            out += [p for p in (d.overlay, now.path if now else None) if p]
    return out


def _used_elsewhere(
    hv: Hypervisor, domain: str, tree: SnapshotTree, paths: Iterable[str], qemu_img: QemuImg
) -> list[str]:
    """Images outside the domain's own disks and snapshots that sit on `paths`, and other
    domains' disks whose chains hold them. libvirt knows only the domain's own files when it
    removes an overlay or commits into an image; where others need them, virtdeck does the
    work itself and keeps what they need."""
    wanted = {p for p in paths if p}
    if not wanted:
        return []
    files = _scan(hv, qemu_img, domain, tree)
    own: set[str] = set()
    for p in _own_paths(hv, domain) + [
        x for n in tree.nodes for d in n.disks for x in (d.image, d.overlay) if x
    ]:
        own.update(files.chain(p))
    out = {p for p in _other_domain_paths(hv, domain) if wanted & set(files.chain(p))}
    for p in wanted:
        out |= files.users(p) - own
    return sorted(out)


def _plan_revert_external(
    hv: Hypervisor,
    domain: str,
    node: SnapshotNode,
    tree: SnapshotTree,
    state: DomainState,
    qemu_img: QemuImg,
) -> RevertPlan:
    snap_xml = ET.fromstring(_snapshot_xml(hv, domain, node.name))
    snap_dom = snap_xml.find("domain")
    if snap_dom is None:
        raise OperationError(
            f"snapshot '{node.name}' of '{domain}' has no saved domain definition; "
            "virtdeck cannot revert it"
        )
    current = {d.target: d for d in _domain_disks(hv.xml(domain))}
    switches: list[DiskSwitch] = []
    for d in node.disks:
        if d.snapshot != EXTERNAL:
            continue
        if d.target not in current:
            raise StateError(
                f"disk {d.target} of snapshot '{node.name}' is no longer attached to '{domain}': "
                "attach it again before reverting"
            )
        if not d.image or not os.path.isfile(d.image):
            raise NotFoundError(
                f"the image of snapshot '{node.name}' for {d.target} ({d.image}) is missing; "
                "this snapshot cannot be reverted"
            )
        n = 1
        while True:
            overlay = os.path.join(
                os.path.dirname(d.image), f"{domain}.{node.name}.{d.target}.r{n}.qcow2"
            )
            if not os.path.exists(overlay):
                break
            n += 1
        switches.append(DiskSwitch(d.target, d.image, d.image_format or "raw", overlay))
    if not switches:
        raise InvalidInputError(f"snapshot '{node.name}' of '{domain}' covers no disk")

    files = _scan(hv, qemu_img, domain, tree)
    before = [d.path for d in current.values() if d.path and d.snapshottable]
    before += [p for n in tree.nodes for d in n.disks for p in (d.image, d.overlay) if p]
    switched = {s.target for s in switches}
    keep = [s.image for s in switches]
    keep += [d.path for t, d in current.items() if d.path and t not in switched]
    keep += [d.image for n in tree.nodes for d in n.disks if d.image]
    keep += _other_domain_paths(hv, domain)
    discard = _unneeded(files, before, keep)

    new_dom = ET.fromstring(ET.tostring(snap_dom))
    _switch_disks(new_dom, {s.target: (s.overlay, "qcow2") for s in switches})
    for src in new_dom.iter("source"):
        src.attrib.pop("index", None)
    memory = node.memory_file if node.memory_file and os.path.isfile(node.memory_file) else None
    if node.state not in ("running", "paused"):
        memory = None
    start_after = memory is None and state.active
    result = (
        "running"
        if memory and node.state == "running"
        else "paused"
        if memory
        else ("running (booted afresh from the snapshot's disks)" if start_after else "shut off")
    )
    return RevertPlan(
        host=hv.uri,
        domain=domain,
        snapshot=node.name,
        kind=node.kind,
        method="virtdeck",
        state_now=state.value,
        result_state=result,
        stop_first=state.active,
        switches=tuple(switches),
        discard=tuple(discard),
        restore_memory=memory,
        start_after=start_after,
        lost=tuple(_lost_lines(domain, state, tree, discard)),
        domain_xml=ET.tostring(new_dom, encoding="unicode"),
    )


def _lookup_snapshot(dom: Any, domain: str, name: str) -> Any:
    return _lv(f"snapshot '{name}' of '{domain}'", dom.snapshotLookupByName, name, 0)


def revert(
    hv: Hypervisor,
    plan: RevertPlan,
    progress: Progress = no_progress,
    *,
    qemu_img: QemuImg | None = None,
) -> None:
    dom = hv.lookup(plan.domain)
    try:
        if plan.method == "libvirt":
            snap = _lookup_snapshot(dom, plan.domain, plan.snapshot)
            progress(f"reverting '{plan.domain}' to '{plan.snapshot}'", None)
            _libvirt_revert(dom, plan, snap)
        else:
            _revert_external(hv, plan, progress, qemu_img or QemuImg())
    finally:
        hv.invalidate(dom.UUIDString())
    progress(f"'{plan.domain}' is back at '{plan.snapshot}'", 1.0)


_REVERT_TRIES = 3


def _libvirt_revert(dom: Any, plan: RevertPlan, snap: Any) -> None:
    """libvirt >= 9.9 reverts an external snapshot onto a new overlay named `<stem>.<unix
    seconds>` and refuses when that file exists ("external snapshot file for disk ... already
    exists"): two reverts within one second collide. It checks before changing anything, so
    wait for the next second and try again (a bounded number of times)."""
    what = f"reverting '{plan.domain}' to '{plan.snapshot}'"
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING if plan.start_after else 0
    for attempt in range(1, _REVERT_TRIES + 1):
        try:
            _lv(what, dom.revertToSnapshot, snap, flags)
            return
        except OperationError as err:
            collided = "external snapshot file" in str(err) and "already exists" in str(err)
            if plan.kind == INTERNAL or not collided or attempt == _REVERT_TRIES:
                raise
        time.sleep(1.05 - time.time() % 1.0)


def _revert_external(hv: Hypervisor, plan: RevertPlan, progress: Progress, qimg: QemuImg) -> None:
    dom = hv.lookup(plan.domain)
    old_xml = str(
        _lv(
            plan.domain,
            dom.XMLDesc,
            libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE,
        )
    )
    old_snap = _snapshot_xml(hv, plan.domain, plan.snapshot)
    tree = snapshot_tree(hv, plan.domain)
    old_current = tree.current.name if tree.current else None
    old_current_xml = (
        _snapshot_xml(hv, plan.domain, old_current)
        if old_current and old_current != plan.snapshot
        else None
    )
    undo: list[tuple[str, Callable[[], None]]] = []
    stopped = False
    try:
        for i, s in enumerate(plan.switches):
            progress(
                f"new overlay for {s.target} on {os.path.basename(s.image)}", i / len(plan.switches)
            )
            if os.path.exists(s.overlay):
                raise InvalidInputError(f"{s.overlay} appeared meanwhile; retry the revert")
            qimg.create_overlay(s.overlay, s.image, s.image_format)
            undo.append((f"remove {s.overlay}", _remover(s.overlay, progress)))
        if plan.stop_first and DomainState.from_libvirt(dom.state()[0]).active:
            progress(f"forcing '{plan.domain}' off", None)
            _lv(f"forcing '{plan.domain}' off", dom.destroy)
            stopped = True
        progress(f"switching the disks of '{plan.domain}' to the new overlays", None)
        _lv(f"redefining '{plan.domain}'", hv.conn.defineXML, plan.domain_xml)
        undo.append(("restore the domain XML", lambda: hv.conn.defineXML(old_xml) and None))
        new_snap = _set_snapshot_disks(
            old_snap, overlays={s.target: s.overlay for s in plan.switches}, images=None
        )
        _redefine(hv, plan.domain, new_snap, current=True)

        def undo_meta() -> None:
            _redefine(hv, plan.domain, old_snap, current=old_current == plan.snapshot)
            if old_current_xml:
                _redefine(hv, plan.domain, old_current_xml, current=True)

        undo.append(("restore the snapshot metadata", undo_meta))
    except BaseException as err:
        failed = []
        for what, fn in reversed(undo):
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep undoing, report below
                failed.append(what)
        if failed:
            raise OperationError(
                f"revert of '{plan.domain}' failed ({err}) and undo could not "
                f"{', '.join(failed)}: check 'virsh dumpxml {plan.domain}'"
            ) from None
        if isinstance(err, VirtdeckError) and stopped:
            raise type(err)(
                f"{err} (nothing was changed; '{plan.domain}' was left shut off)"
            ) from None
        raise
    # Committed: the disks run on the fresh overlays and the snapshot is current.
    if plan.restore_memory:
        progress(f"restoring the memory state of '{plan.snapshot}'", None)
        flags = (
            libvirt.VIR_DOMAIN_SAVE_RUNNING
            if plan.result_state == "running"
            else libvirt.VIR_DOMAIN_SAVE_PAUSED
        )
        try:
            _lv(
                f"restoring the memory of '{plan.snapshot}'",
                hv.conn.restoreFlags,
                plan.restore_memory,
                plan.domain_xml,
                flags,
            )
        except VirtdeckError as err:
            raise OperationError(
                f"'{plan.domain}' was reverted to '{plan.snapshot}' on disk, but {err}; "
                f"start it with 'virtdeck start {plan.domain}'"
            ) from None
    elif plan.start_after:
        progress(f"starting '{plan.domain}'", None)
        _lv(f"starting '{plan.domain}'", dom.create)
    _collect(hv, plan.domain, plan.discard, qimg, progress)


def _collect(
    hv: Hypervisor, domain: str, paths: Iterable[str], qimg: QemuImg, progress: Progress
) -> list[str]:
    """Remove files planned as unneeded, checking again that nothing uses them now."""
    paths = list(paths)
    if not paths:
        return []
    tree = snapshot_tree(hv, domain)
    files = _scan(hv, qimg, domain, tree)
    keep = _own_paths(hv, domain) + _other_domain_paths(hv, domain)
    keep += [d.image for n in tree.nodes for d in n.disks if d.image]
    still = set(_unneeded(files, paths, keep))
    gone = [p for p in paths if p in still]
    for p in gone:
        progress(f"removing {p}", None)
    return _remove(gone, progress)


# -- delete -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletePlan:
    host: str
    domain: str
    snapshot: str
    names: tuple[str, ...]  # in deletion order: descendants first
    kind: str
    method: str
    children: bool
    lost: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> list[str]:
        what = ", ".join(f"'{n}'" for n in self.names)
        lines = [f"delete {self.kind} snapshot(s) {what} of '{self.domain}' (by {self.method})"]
        return lines + [f"lost: {x}" for x in self.lost] + list(self.notes)


def plan_delete(
    hv: Hypervisor,
    domain: str,
    name: str,
    *,
    children: bool = False,
    qemu_img: QemuImg | None = None,
    by_virtdeck: bool = False,
) -> DeletePlan:
    tree = snapshot_tree(hv, domain)
    node = tree.get(name)
    names = (tree.descendants(name) if children else []) + [name]
    kinds = {INTERNAL if tree.get(n).kind == INTERNAL else EXTERNAL for n in names}
    if len(kinds) > 1:
        raise InvalidInputError(
            f"the snapshots under '{name}' mix internal and external ones, which libvirt cannot "
            "delete in one go: delete the external ones first, one by one"
        )
    lost = [f"the chance to revert to '{n}'" for n in names]
    notes: list[str] = []
    if not children and node.children:
        parent = f"'{node.parent}'" if node.parent else "the root"
        notes.append(f"its children ({', '.join(node.children)}) move up to {parent}")
    qemu_img = qemu_img or QemuImg()
    native = node.kind == INTERNAL or (not by_virtdeck and libvirt_handles_external(hv))
    if native and node.kind != INTERNAL:
        # libvirt commits each overlay into its image and removes the overlay.
        touched = [
            p for n in names for d in tree.get(n).disks if d.snapshot == EXTERNAL
            for p in (d.image, d.overlay) if p
        ]  # fmt: skip
        users = _used_elsewhere(hv, domain, tree, touched, qemu_img)
        if users:
            native = False
            notes.append(
                f"done by virtdeck, not libvirt: other images sit on its files ({', '.join(users)})"
            )
    if native:
        method = "libvirt"
    else:
        method = "virtdeck"
        # Validate the first step now so refusals come before any change.
        _plan_delete_one(hv, domain, tree.get(names[0]), tree, qemu_img)
    return DeletePlan(
        host=hv.uri,
        domain=domain,
        snapshot=name,
        names=tuple(names),
        kind=node.kind,
        method=method,
        children=children,
        lost=tuple(lost),
        notes=tuple(notes),
    )


def delete(
    hv: Hypervisor,
    plan: DeletePlan,
    progress: Progress = no_progress,
    *,
    qemu_img: QemuImg | None = None,
) -> None:
    dom = hv.lookup(plan.domain)
    try:
        if plan.method == "libvirt" and plan.kind != INTERNAL:
            # libvirt (11.3) refuses DELETE_CHILDREN for external snapshots ("deletion of
            # external disk snapshots with children not supported"): one by one, descendants
            # first.
            for i, name in enumerate(plan.names):
                progress(f"deleting '{name}' of '{plan.domain}'", i / len(plan.names))
                snap = _lookup_snapshot(dom, plan.domain, name)
                _lv(f"deleting snapshot '{name}' of '{plan.domain}'", snap.delete, 0)
        elif plan.method == "libvirt":
            snap = _lookup_snapshot(dom, plan.domain, plan.snapshot)
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN if plan.children else 0
            progress(f"deleting '{plan.snapshot}' of '{plan.domain}'", None)
            _lv(f"deleting snapshot '{plan.snapshot}' of '{plan.domain}'", snap.delete, flags)
        else:
            qimg = qemu_img or QemuImg()
            for i, name in enumerate(plan.names):
                progress(f"deleting '{name}' of '{plan.domain}'", i / len(plan.names))
                tree = snapshot_tree(hv, plan.domain)
                step = _plan_delete_one(hv, plan.domain, tree.get(name), tree, qimg)
                _delete_one(hv, step, qimg, progress)
    finally:
        hv.invalidate(dom.UUIDString())
    progress(f"deleted {', '.join(plan.names)}", 1.0)


@dataclass(frozen=True)
class _Commit:
    target: str
    overlay: str  # merged into image, then removed
    image: str
    image_format: str
    active: bool  # the overlay is the disk's top image
    users: tuple[str, ...]  # images backed by the overlay, to rebase onto image


@dataclass(frozen=True)
class _DeleteStep:
    domain: str
    name: str
    running: bool
    commits: tuple[_Commit, ...]
    kept: tuple[str, ...]  # why some files stay
    before: tuple[str, ...]
    keep: tuple[str, ...]
    memory_file: str | None


def _plan_delete_one(
    hv: Hypervisor, domain: str, node: SnapshotNode, tree: SnapshotTree, qimg: QemuImg
) -> _DeleteStep:
    state = _state(hv, domain)
    files = _scan(hv, qimg, domain, tree)
    current = {d.target: d for d in _domain_disks(hv.xml(domain))}
    others = _other_domain_paths(hv, domain)
    other_files: set[str] = set()
    for p in others:
        other_files.update(files.chain(p))
    rest = [n for n in tree.nodes if n.name != node.name]
    commits: list[_Commit] = []
    kept: list[str] = []
    for d in node.disks:
        if d.snapshot != EXTERNAL or not d.overlay or not os.path.isfile(d.overlay):
            continue
        ov, img = d.overlay, d.image
        top = current[d.target].path if d.target in current else None
        active_chain = files.chain(top)
        needed = ov in active_chain or any(
            ov in files.chain(o.image) for n in rest for o in n.disks if o.target == d.target
        )
        if not needed or not img:
            continue  # nothing sits on the overlay: it is simply collected
        img_users = files.users(img) - {ov}
        if img_users or img in other_files:
            who = sorted(img_users) or ["another domain"]
            kept.append(f"{ov} stays: {img} also backs {', '.join(who)}")
            continue
        if not os.access(img, os.W_OK):
            kept.append(f"{ov} stays: {img} is read-only")
            continue
        is_top = ov == top
        if state.active and ov in active_chain and not is_top:
            raise StateError(
                f"deleting '{node.name}' means committing {ov} below the top of the running "
                f"'{domain}': shut it down first, or delete the newer snapshots first"
            )
        commits.append(
            _Commit(
                d.target,
                ov,
                img,
                files.format.get(img, d.image_format or "raw"),
                is_top,
                tuple(sorted(files.users(ov))),
            )
        )
    before = [p for d in node.disks for p in (d.image, d.overlay) if p]
    keep = [d.path for d in current.values() if d.path and d.snapshottable]
    keep += [x.image for n in rest for x in n.disks if x.image]
    return _DeleteStep(
        domain=domain,
        name=node.name,
        running=state.active,
        commits=tuple(commits),
        kept=tuple(kept),
        before=tuple(before),
        keep=tuple(keep),
        memory_file=node.memory_file,
    )


def _delete_one(hv: Hypervisor, step: _DeleteStep, qimg: QemuImg, progress: Progress) -> None:
    dom = hv.lookup(step.domain)
    for note in step.kept:
        progress(note, None)
    new_sources: dict[str, tuple[str, str]] = {}
    moved_images: dict[str, tuple[str, str]] = {}  # old image -> (new image, format)
    touched = False
    try:
        for c in step.commits:
            progress(
                f"merging {os.path.basename(c.overlay)} into {os.path.basename(c.image)}", None
            )
            touched = True  # from here on the snapshot's image no longer holds its state
            if c.active and step.running:
                _block_commit(hv, dom, c, progress)
            else:
                qimg.commit(c.overlay)
                for user in c.users:
                    qimg.rebase_unsafe(user, c.image, c.image_format)
                if c.active:
                    new_sources[c.target] = (c.image, c.image_format)
            moved_images[c.overlay] = (c.image, c.image_format)
        if new_sources or step.running and step.commits:
            xml = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
            root = domxml.parse(xml)
            fix = dict(new_sources)
            for d in domxml.disks(root):
                for c in step.commits:
                    if c.active and d.target == c.target and d.path == c.overlay:
                        fix[d.target] = (c.image, c.image_format)
            if fix:
                _switch_disks(root, fix)
                _lv(f"redefining '{step.domain}'", hv.conn.defineXML, domxml.to_string(root))
        # Snapshots whose image was a merged overlay now find that state in the image below.
        if moved_images:
            for n in snapshot_tree(hv, step.domain).nodes:
                if n.name == step.name:
                    continue
                images = {
                    d.target: moved_images[d.image]
                    for d in n.disks
                    if d.image and d.image in moved_images
                }
                if images:
                    xml = _snapshot_xml(hv, step.domain, n.name)
                    _redefine(
                        hv, step.domain, _set_snapshot_disks(xml, images=images), current=n.current
                    )
    except VirtdeckError as err:
        if not touched:
            raise
        # Every disk still shows its latest writes (the overlays are only removed at the end),
        # but the snapshot's image changed: drop the snapshot so nobody reverts to it.
        with contextlib.suppress(libvirt.libvirtError):
            dom.snapshotLookupByName(step.name, 0).delete(
                libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
            )
        raise OperationError(
            f"deleting '{step.name}' of '{step.domain}' failed half-way ({err}); no data was "
            f"lost, but '{step.name}' could no longer be reverted to and was removed: check "
            f"'virsh dumpxml {step.domain}'"
        ) from None
    snap = _lv(f"snapshot '{step.name}'", dom.snapshotLookupByName, step.name, 0)
    _lv(
        f"deleting snapshot '{step.name}' of '{step.domain}'",
        snap.delete,
        libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY,
    )
    merged = [c.overlay for c in step.commits]
    _remove(merged, progress)
    if step.memory_file:
        _remove([step.memory_file], progress)
    _collect(hv, step.domain, _unneeded_paths(step), qimg, progress)


def _unneeded_paths(step: _DeleteStep) -> list[str]:
    return [p for p in step.before if p not in step.keep]


def _block_commit(hv: Hypervisor, dom: Any, c: _Commit, progress: Progress) -> None:
    """Active block commit of the top overlay into its backing image, then pivot."""
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    _lv(f"block commit of {c.target}", dom.blockCommit, c.target, c.image, None, 0, flags)
    deadline = time.monotonic() + _COMMIT_TIMEOUT
    while True:
        info = _lv(f"block job of {c.target}", dom.blockJobInfo, c.target, 0) or {}
        end, cur = int(info.get("end", 0)), int(info.get("cur", 0))
        if end:
            progress(f"committing {c.target}", cur / end)
        if info and cur == end:
            try:
                dom.blockJobAbort(c.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                break
            except libvirt.libvirtError:
                pass  # not ready yet
        if time.monotonic() > deadline:
            with contextlib.suppress(libvirt.libvirtError):
                dom.blockJobAbort(c.target, 0)
            raise OperationError(
                f"block commit of {c.target} did not finish in {_COMMIT_TIMEOUT:.0f} s; aborted, "
                "the snapshot is kept"
            )
        time.sleep(0.1)
    while _lv(f"block job of {c.target}", dom.blockJobInfo, c.target, 0):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
