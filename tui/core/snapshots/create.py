"""Taking a snapshot: internal (inside qcow2 images, libvirt does it, running or shut off) or
external (libvirt puts a copy-on-write overlay beside each image file, and saves the memory of
a running guest). Only image-file disks are snapshotted; a block or network disk is refused
with the reason, never given an overlay beside its device node.
"""

from __future__ import annotations

import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from tui.core import audit, bases, ops
from tui.core.errors import ConnectError, InvalidInputError, StateError, VirtdeckError
from tui.core.hypervisor import Hypervisor, validate_text
from tui.core.models import DomainState
from tui.core.progress import Progress, no_progress
from tui.core.snapshots import common
from tui.core.snapshots.common import validate_snapshot_name
from tui.core.snapshots.tree import (
    DISK_ONLY,
    EXTERNAL,
    INTERNAL,
    SnapshotNode,
    marked,
    snapshot_tree,
)
from tui.core.storage import LocalFiles, files_for


@dataclass(frozen=True)
class CreatePlan(ops.PlanDefaults):
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

    @property
    def title(self) -> str:
        return f"Take {self.kind} snapshot '{self.name}' of '{self.domain}'?"

    @property
    def confirm_label(self) -> str:
        return "Take snapshot"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        node = create(hv, self, progress)
        return f"{self.domain}: {node.kind} snapshot '{node.name}' taken"

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
    validate_text(description, "description")
    bases.refuse_base_write(hv, domain, f"snapshot '{name}'", internal=not external)
    tree = snapshot_tree(hv, domain)
    if tree.find(name):
        raise InvalidInputError(
            f"'{domain}' already has a snapshot named '{name}': pick another name"
        )
    state = common.state(hv, domain)
    _check_options(domain, state, external, disk_only, quiesce)
    _check_kinds(domain, tree.kinds(), external)
    disks = common.disks_of(hv, domain)
    targets = [d for d in disks if common.snapshottable(d)]
    if not targets:
        raise InvalidInputError(f"'{domain}' has no writable disk to snapshot")
    common.require_image_files(
        domain, targets, "an external snapshot" if external else "an internal snapshot"
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
        kind = INTERNAL
        _internal_xml(root, domain, disks, targets, state.active, notes)
    else:
        # libvirt takes external snapshots of a shut-off domain as disk-only ones (state
        # "disk-snapshot"): there is no memory to save.
        disk_only = disk_only or not state.active
        kind = DISK_ONLY if disk_only else EXTERNAL
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        if disk_only:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        memory_file = _external_xml(root, hv, domain, name, disks, targets, disk_only,
                                    state.active, notes, overlays)  # fmt: skip
    return CreatePlan(
        host=hv.uri,
        domain=domain,
        name=name,
        kind=kind,
        description=description,
        running=state.active,
        quiesce=quiesce,
        overlays=tuple(overlays),
        memory_file=memory_file,
        xml=ET.tostring(root, encoding="unicode"),
        flags=flags,
        notes=tuple(notes),
    )


def _check_options(
    domain: str, state: DomainState, external: bool, disk_only: bool, quiesce: bool
) -> None:
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


def _check_kinds(domain: str, kinds: Any, external: bool) -> None:
    """Internal and external snapshots never mix in one tree."""
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


def _internal_xml(
    root: ET.Element, domain: str, disks: Any, targets: Any, running: bool, notes: list[str]
) -> None:
    raw = [d for d in targets if d.format != "qcow2"]
    if raw:
        d = raw[0]
        raise InvalidInputError(
            f"internal snapshots need qcow2 disks; {d.target} of '{domain}' is "
            f"{d.format or 'of unknown format'} ({d.path}): use --external"
        )
    if running:
        notes.append(f"'{domain}' pauses while its memory and disks are saved")
    disks_el = ET.SubElement(root, "disks")
    for d in disks:
        snapshot = INTERNAL if common.snapshottable(d) else "no"
        ET.SubElement(disks_el, "disk", name=d.target, snapshot=snapshot)


def _external_xml(
    root: ET.Element,
    hv: Hypervisor,
    domain: str,
    name: str,
    disks: Any,
    targets: Any,
    disk_only: bool,
    running: bool,
    notes: list[str],
    overlays: list[tuple[str, str, str]],
) -> str | None:
    """The memory file and an overlay per disk (filled into `overlays`); the memory file's
    path (None: no memory saved)."""
    memory_file = None
    first_dir = os.path.dirname(str(targets[0].path))
    if running and not disk_only:
        memory_file = os.path.join(first_dir, f"{domain}.{name}.mem")
        ET.SubElement(root, "memory", snapshot="external", file=memory_file)
        notes.append(f"'{domain}' pauses while its memory is saved")
    else:
        ET.SubElement(root, "memory", snapshot="no")
    disks_el = ET.SubElement(root, "disks")
    for d in disks:
        if not common.snapshottable(d):
            ET.SubElement(disks_el, "disk", name=d.target, snapshot="no")
            continue
        overlay = os.path.join(os.path.dirname(str(d.path)), f"{domain}.{name}.{d.target}.qcow2")
        overlays.append((d.target, str(d.path), overlay))
        el = ET.SubElement(disks_el, "disk", name=d.target, snapshot=EXTERNAL)
        ET.SubElement(el, "driver", type="qcow2")
        ET.SubElement(el, "source", file=overlay)
    # On another host libvirt itself refuses to write over an existing file.
    for path in [o for _, _, o in overlays] + ([memory_file] if memory_file else []):
        if hv.local and LocalFiles.lexists(path):
            raise InvalidInputError(
                f"{path} already exists; virtdeck never overwrites a file: pick another "
                "snapshot name"
            )
    return memory_file


def create(
    hv: Hypervisor,
    plan: CreatePlan,
    progress: Progress = no_progress,
    *,
    journal: bool = True,
    token: str | None = None,
    taken: Callable[[dict[str, str]], None] | None = None,
) -> SnapshotNode:
    """Take the snapshot. With `journal` (the default) it is journalled before it is asked
    for: a connection lost while libvirt works leaves the journal (the daemon may still take
    the snapshot when it answers again), so `virtdeck recover` finds it. A group snapshot
    journals its members itself (journal=False), with the `token` it journalled and `taken`,
    which records the snapshot's identity in its journal.

    The journalled snapshot is asked for with the operation's token on the last line of its
    description (`tree.marked`), and the line is taken out again once its identity (creation
    time) is journalled: a snapshot the daemon took after the connection was lost carries the
    token, which proves to `recover` that it is this operation's (one taken again under the
    same name never carries it)."""
    title = f"taking {plan.kind} snapshot '{plan.name}' of '{plan.domain}'"
    guard = bases.snapshot_guard(
        hv, plan.domain, f"snapshot '{plan.name}'", internal=plan.kind == INTERNAL
    )
    if not journal:
        with audit.recorded(hv.uri, title, [plan.domain]) as entry, guard:
            node = _create(hv, plan, progress, token, taken)
            entry.steps.append(f"snapshot '{plan.name}' taken")
            return node
    token = new_token()
    with ops.running(hv, title, domains=[plan.domain]) as undo, guard:
        undo.push(
            f"delete snapshot '{plan.name}' of '{plan.domain}'",
            "delete_snapshot",
            domain=plan.domain,
            name=plan.name,
            token=token,
        )
        try:
            return _create(hv, plan, progress, token, undo.identify)
        except ConnectError:
            raise  # the daemon may take it when it answers again: the journal keeps it
        except VirtdeckError:
            if undo.journal.actions[-1].identity is None:
                undo.pop()  # ATOMIC: libvirt took nothing; never delete another's
            raise


def new_token() -> str:
    """A token naming one snapshot-taking operation (random: never guessed, never repeated)."""
    return secrets.token_hex(12)


def _create(
    hv: Hypervisor,
    plan: CreatePlan,
    progress: Progress,
    token: str | None = None,
    taken: Callable[[dict[str, str]], None] | None = None,
) -> SnapshotNode:
    dom = hv.lookup(plan.domain)
    made = [o for _, _, o in plan.overlays] + ([plan.memory_file] if plan.memory_file else [])
    files = files_for(hv, "snapshot create", define_pools=False)
    existed = {p for p in made if files.lexists(p)}
    xml = plan.xml
    if token:
        xml = _with_description(xml, marked(plan.description, token))
    progress(f"taking {plan.kind} snapshot '{plan.name}' of '{plan.domain}'", None)
    try:
        hv.call(
            dom.snapshotCreateXML,
            xml,
            plan.flags,
            what=f"snapshot '{plan.name}' of '{plan.domain}'",
        )
    except VirtdeckError:
        # ATOMIC: libvirt put the disks back; remove what it may have left (only files that
        # did not exist before the call), unless in use.
        in_use = set(common.own_image_paths(hv, plan.domain)) | existed
        files.delete_quietly([p for p in made if p not in in_use], progress)
        raise
    finally:
        hv.invalidate(dom.UUIDString())
    if token:
        snap = hv.call(dom.snapshotLookupByName, plan.name, 0, what=f"snapshot '{plan.name}'")
        node = snapshot_tree(hv, plan.domain).get(plan.name)
        if taken is not None:
            taken({"created": node.created.isoformat(), "token": token})
        # The mark has done its work (the identity is journalled): the operator's description
        # comes back (a redefinition of the snapshot's metadata; the snapshot stays current).
        raw = hv.call(snap.getXMLDesc, libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
        try:
            common.redefine(
                hv, plan.domain, _with_description(raw, plan.description), current=node.current
            )
        except ConnectError:
            raise
        except VirtdeckError as err:  # the snapshot is whole; virtdeck never shows the line
            progress(f"snapshot '{plan.name}' keeps virtdeck's mark line: {err}", None)
        hv.invalidate(dom.UUIDString())
    progress(f"snapshot '{plan.name}' taken", 1.0)
    return snapshot_tree(hv, plan.domain).get(plan.name)


def _with_description(xml: str, description: str) -> str:
    """Snapshot XML with its <description> set (removed when empty), everything else kept."""
    root = ET.fromstring(xml)
    for old in root.findall("description"):
        root.remove(old)
    if description:
        el = ET.Element("description")
        el.text = description
        root.insert(1, el)  # after <name>
    return ET.tostring(root, encoding="unicode")
