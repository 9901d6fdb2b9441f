"""Snapshot trees: the frozen model (SnapshotNode, SnapshotTree), read from libvirt.

The core builds the tree; the UI only draws it. Pure parsing (`parse_snapshot_xml`,
`build_tree`) is separate from reading (`snapshot_tree`) so tests can feed XML.
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from tui.core import domxml
from tui.core.errors import NotFoundError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.storage import Resolver
from tui.core.text import printable

INTERNAL = "internal"
EXTERNAL = "external"
DISK_ONLY = "disk-only"


@dataclass(frozen=True)
class SnapshotFile:
    """A file an external snapshot made: an overlay (role 'disk vda') or its memory state."""

    path: str
    role: str
    size_bytes: int | None  # allocated on its host; None when nobody could read it
    problem: str | None = None  # why the size is unknown


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
                {"path": f.path, "role": f.role, "size_bytes": f.size_bytes, "problem": f.problem}
                for f in self.files
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
            files.append(SnapshotFile(sd.overlay, f"disk {sd.target}", None))
    if mem_file:
        files.append(SnapshotFile(mem_file, "memory", None))
    return SnapshotNode(
        name=name,
        parent=parent,
        children=(),
        created=dt.datetime.fromtimestamp(created_ts, dt.UTC),
        state=state,
        kind=kind,
        current=current,
        description=printable(unmarked(root.findtext("description") or "").strip()),
        files=tuple(files),
        disks=tuple(disks),
        memory_file=mem_file,
    )


# A journalled `snapshot create` asks libvirt for the snapshot with this line (and a token of
# its own operation) at the end of its description, and takes the line out again once the call
# answered (tui.core.snapshots.create). When the connection is lost while libvirt works, the
# daemon may still take the snapshot later: the line is what proves to `recover` that the
# snapshot it finds is that operation's, and not one taken again under the same name.
MARK = "virtdeck-operation: "


def marked(description: str, token: str) -> str:
    return f"{description}\n{MARK}{token}" if description else f"{MARK}{token}"


def mark_of(description: str) -> str | None:
    """The operation token the description ends with, if any."""
    last = description.rstrip("\n").rsplit("\n", 1)[-1]
    return last[len(MARK) :].strip() if last.startswith(MARK) else None


def unmarked(description: str) -> str:
    """The description without an operation's mark line (what the operator wrote)."""
    if mark_of(description) is None:
        return description
    head, _, _ = description.rstrip("\n").rpartition("\n")
    return head


def snapshot_mark(hv: Hypervisor, domain: str, name: str) -> str | None:
    """The operation token in the description of the domain's snapshot `name` (None when it has
    none); NotFoundError when there is no such domain or snapshot."""
    dom = hv.lookup(domain)
    snap = hv.call(dom.snapshotLookupByName, name, 0, what=f"snapshot '{name}' of '{domain}'")
    xml = hv.call(snap.getXMLDesc, 0, what=f"reading snapshot '{name}' of '{domain}'")
    return mark_of(ET.fromstring(xml).findtext("description") or "")


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


def snapshot_tree(hv: Hypervisor, domain: str, *, resolver: Resolver | None = None) -> SnapshotTree:
    """The domain's snapshot tree: one listAllSnapshots, then each snapshot's XML; the sizes of
    its files come from the storage resolver (unknown stays None, with the reason)."""
    dom = hv.lookup(domain)
    snaps = hv.call(dom.listAllSnapshots, 0, what=f"listing snapshots of '{domain}'")
    nodes = []
    for snap in snaps:
        try:
            xml = hv.call(snap.getXMLDesc, 0, what=f"reading snapshot of '{domain}'")
            current = bool(hv.call(snap.isCurrent, 0, what=f"reading snapshot of '{domain}'"))
        except NotFoundError:
            continue  # deleted between the list and now
        nodes.append(_with_sizes(parse_snapshot_xml(xml, current=current), resolver, hv))
    return build_tree(domain, nodes)


def snapshot_names(hv: Hypervisor) -> dict[str, tuple[str, ...]]:
    """Domain name -> its snapshots' names, for every domain of the host that has any: one
    listAllDomains (libvirt filters by "has a snapshot") and one listAllSnapshots per such
    domain; no XML (the command palette's index)."""
    import libvirt

    flag = libvirt.VIR_CONNECT_LIST_DOMAINS_HAS_SNAPSHOT
    out: dict[str, tuple[str, ...]] = {}
    for dom in hv.call(hv.conn.listAllDomains, flag, what="listing domains"):
        try:
            name = dom.name()
            snaps = hv.call(dom.listAllSnapshots, 0, what=f"listing snapshots of '{name}'")
        except NotFoundError:
            continue  # undefined between the two calls
        out[name] = tuple(sorted(s.getName() for s in snaps))
    return out


def _with_sizes(node: SnapshotNode, resolver: Resolver | None, hv: Hypervisor) -> SnapshotNode:
    if not node.files:
        return node
    resolver = resolver or Resolver(hv)
    files = []
    for f in node.files:
        img = resolver.image(f.path)
        files.append(replace(f, size_bytes=img.actual_bytes, problem=img.reason))
    return replace(node, files=tuple(files))


def libvirt_handles_external(hv: Hypervisor) -> bool:
    """True when libvirt reverts and deletes external snapshots itself.

    Advertised as <externalSnapshot/> among the guest features of the capabilities XML
    (libvirt 9.9 and newer); decided at run time, never from the distribution.
    """
    try:
        caps = ET.fromstring(hv.call(hv.conn.getCapabilities, what="reading capabilities"))
    except (VirtdeckError, ET.ParseError):
        return False
    return caps.find("./guest/features/externalSnapshot") is not None
