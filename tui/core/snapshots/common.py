"""What snapshot create, revert and delete share: the domain's disks and state, snapshot XML
rewriting, and which files an operation leaves unneeded (asked of the storage graph).

Files are never removed while anything still needs them: the domain's disks, another
snapshot's image chain, or any image (another domain's disk, a template backup's base, a thin
clone, an overlay lying beside them) whose backing chain holds them.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable

import libvirt

from tui.core import domxml, ops
from tui.core.catalog import backup_owners
from tui.core.errors import InvalidInputError
from tui.core.hypervisor import Hypervisor, validate_name
from tui.core.models import DiskInfo, DiskKind, DomainState
from tui.core.progress import Progress
from tui.core.snapshots.tree import SnapshotTree, snapshot_tree
from tui.core.storage import Files, Resolver, StorageGraph


def validate_snapshot_name(name: str) -> str:
    return validate_name(name, "snapshot name", " (it becomes part of file names)")


def disks_of(hv: Hypervisor, domain: str) -> list[DiskInfo]:
    return list(domxml.disks(domxml.parse(hv.xml(domain))))


def snapshottable(d: DiskInfo) -> bool:
    """A disk a snapshot covers: writable and not shared (CD-ROMs and shared disks are not)."""
    return d.device == "disk" and not d.readonly and not d.shareable


def require_image_files(domain: str, disks: Iterable[DiskInfo], what: str) -> None:
    """Refuse a writable disk that is not an image file: virtdeck would have to put an overlay
    beside a device node or take a network export's name for a local file."""
    for d in disks:
        if snapshottable(d) and d.kind != DiskKind.FILE:
            raise InvalidInputError(
                f"disk {d.target} of '{domain}' is a {d.described}: {what} of it needs an "
                "explicit overlay file, which virtdeck does not make; take the snapshot with "
                "virsh, or detach the disk"
            )


def own_image_paths(hv: Hypervisor, domain: str) -> list[str]:
    return [d.path for d in disks_of(hv, domain) if d.path and snapshottable(d)]


def state(hv: Hypervisor, domain: str) -> DomainState:
    dom = hv.lookup(domain)
    return DomainState.from_libvirt(hv.call(dom.state, what=domain)[0])


def graph(hv: Hypervisor) -> StorageGraph:
    """Every domain's and template backup's chains, read now."""
    return StorageGraph.read(hv, resolver=Resolver(hv, ssh=True), extra_owners=backup_owners(hv=hv))


def unneeded(g: StorageGraph, domain: str, before: Iterable[str], keep: Iterable[str]) -> list[str]:
    """Files in the chains of `before` that `keep` (the domain's own) and nothing else needs."""
    return list(g.freed(before, exclude=domain, keep=keep).delete)


def used_elsewhere(
    hv: Hypervisor,
    domain: str,
    tree: SnapshotTree,
    paths: Iterable[str],
    g: StorageGraph | None = None,
) -> list[str]:
    """Images outside the domain's own disks and snapshots that sit on `paths`, and other
    domains (or template backups) whose chains hold them. libvirt knows only the domain's own
    files when it removes an overlay or commits into an image; where others need them,
    virtdeck does the work itself and keeps what they need. `g`: a graph already read."""
    g = g or graph(hv)
    wanted = {g.canonical(p) for p in paths if p}
    if not wanted:
        return []
    g.scan({os.path.dirname(p) for p in wanted if p.startswith("/")})
    own: set[str] = set()
    roots = own_image_paths(hv, domain)
    roots += [x for n in tree.nodes for d in n.disks for x in (d.image, d.overlay) if x]
    for p in roots:
        own.update(g.chain_paths(p))
    out = {str(u) for u in g.users(wanted, exclude=domain)}
    for p in wanted:
        out |= g.children(p) - own
    return sorted(out)


def collect(
    hv: Hypervisor, files: Files, domain: str, paths: Iterable[str], progress: Progress
) -> list[str]:
    """Remove files planned as unneeded, checking again that nothing uses them now."""
    paths = list(paths)
    if not paths:
        return []
    tree = snapshot_tree(hv, domain)
    g = graph(hv)
    keep = own_image_paths(hv, domain)
    keep += [d.image for n in tree.nodes for d in n.disks if d.image]
    still = set(unneeded(g, domain, paths, keep))
    gone = [p for p in paths if g.canonical(p) in still]
    for p in gone:
        progress(f"removing {p}", None)
    left = files.delete_quietly(gone, progress)
    return [p for p in gone if p not in left]


def snapshot_xml(hv: Hypervisor, domain: str, name: str) -> str:
    dom = hv.lookup(domain)
    snap = hv.call(dom.snapshotLookupByName, name, 0, what=f"snapshot '{name}' of '{domain}'")
    return str(hv.call(snap.getXMLDesc, libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE, what=name))


def lookup_snapshot(hv: Hypervisor, dom: object, domain: str, name: str) -> object:
    return hv.call(
        dom.snapshotLookupByName,  # type: ignore[attr-defined]
        name,
        0,
        what=f"snapshot '{name}' of '{domain}'",
    )


def redefine(hv: Hypervisor, domain: str, xml: str, *, current: bool) -> None:
    dom = hv.lookup(domain)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    if current:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    hv.call(dom.snapshotCreateXML, xml, flags, what=f"updating snapshot metadata of '{domain}'")


@ops.undo_kind("redefine_snapshot")
def undo_redefine(hv: Hypervisor, domain: str, xml: str, current: bool) -> None:
    """Undo: put a snapshot's metadata (and which one is current) back as it was."""
    redefine(hv, domain, xml, current=current)


def set_snapshot_disks(
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
        switch_disks(dom, images)
    return ET.tostring(root, encoding="unicode")


def switch_disks(dom: ET.Element, sources: dict[str, tuple[str, str]]) -> None:
    """Point the domain XML's file disks (by target) at other files; libvirt re-reads the
    chains. Only file disks are switched: a block or network disk is never rewritten."""
    for disk in domxml.disk_elements(dom):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sources or domxml.disk_kind(disk) != DiskKind.FILE:
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
