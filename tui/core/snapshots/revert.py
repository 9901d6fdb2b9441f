"""Reverting to a snapshot, and one-key rollback to the current one.

Internal snapshots, and external ones where libvirt says it can (the `<externalSnapshot/>`
guest feature, libvirt 9.9 and newer), are reverted by libvirt. Older libvirt (Debian 12 has
9.0) refuses external snapshots, so virtdeck does it on a hypervisor proved to be this machine:
a fresh overlay on the snapshot's image, the domain XML switched to it, the snapshot metadata
redefined as current, the memory state restored from the snapshot's memory file if it has one;
every step is undone if a later one fails.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

import libvirt

from tui.core import audit, bases, ops
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskInfo, DomainState
from tui.core.progress import Progress, no_progress
from tui.core.snapshots import common
from tui.core.snapshots.tree import (
    EXTERNAL,
    INTERNAL,
    SnapshotNode,
    SnapshotTree,
    libvirt_handles_external,
    snapshot_tree,
)
from tui.core.storage import Files, files_for
from tui.core.storage.qemuimg import QemuImg


@dataclass(frozen=True)
class DiskSwitch:
    target: str
    image: str  # the snapshot's image (read-only from now on)
    image_format: str
    overlay: str  # the fresh overlay the disk will run on


@dataclass(frozen=True)
class RevertPlan(ops.DestructivePlanDefaults):
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
    notes: tuple[str, ...] = ()  # storage set-up on another host (pools defined)

    @property
    def title(self) -> str:
        return f"Revert '{self.domain}' to '{self.snapshot}'?"

    @property
    def confirm_label(self) -> str:
        return "Revert"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        revert(hv, self, progress)
        return f"{self.domain}: back at '{self.snapshot}' ({self.result_state})"

    def summary(self) -> list[str]:
        lines = [
            f"revert '{self.domain}' to {self.kind} snapshot '{self.snapshot}' "
            f"(by {self.method}); it ends {self.result_state}"
        ]
        lines += [f"lost: {x}" for x in self.lost]
        for s in self.switches:
            lines.append(f"{s.target}: new overlay {s.overlay} on {s.image}")
        lines += list(self.notes)
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
        if bases.is_template(hv, domain):  # not "take one": a template's snapshot is refused
            bases.refuse_base_write(hv, domain, "a rollback", internal=False)
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
    bases.refuse_base_write(
        hv, domain, f"reverting to snapshot '{name}'", internal=node.kind == INTERNAL
    )
    state = common.state(hv, domain)
    disks = {d.target: d for d in common.disks_of(hv, domain)}
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
    native = node.kind == INTERNAL or (
        not by_virtdeck
        and libvirt_handles_external(hv)
        and not common.used_elsewhere(hv, domain, tree, _revert_discards(tree, disks))
    )
    if native:
        # Without a memory state libvirt leaves the domain shut off unless asked to run it;
        # boot it afresh as virtdeck's own path does.
        start_after = node.kind != INTERNAL and node.state not in ("running", "paused")
        start_after = start_after and state.active
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
    files = files_for(
        hv, f"reverting external snapshot '{name}' (libvirt on this host cannot)", qemu_img=qemu_img
    )
    return _plan_revert_external(hv, files, domain, node, tree, state)


def _revert_discards(tree: SnapshotTree, disks: dict[str, DiskInfo]) -> list[str]:
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


def _free_overlay_name(files: Files, image: str, stem: str) -> str:
    """STEM.rN.qcow2 beside `image`, N the first number no file has."""
    n = 1
    while files.lexists(path := os.path.join(os.path.dirname(image), f"{stem}.r{n}.qcow2")):
        n += 1
    return path


def _after_revert(
    files: Files, node: SnapshotNode, state: DomainState
) -> tuple[str | None, bool, str]:
    """The memory state to restore (None: none is usable), whether to start it afresh, and
    the state it is left in."""
    memory = node.memory_file if node.memory_file and files.lexists(node.memory_file) else None
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
    return memory, start_after, result


def _plan_revert_external(
    hv: Hypervisor,
    files: Files,
    domain: str,
    node: SnapshotNode,
    tree: SnapshotTree,
    state: DomainState,
) -> RevertPlan:
    snap_xml = ET.fromstring(common.snapshot_xml(hv, domain, node.name))
    snap_dom = snap_xml.find("domain")
    if snap_dom is None:
        raise OperationError(
            f"snapshot '{node.name}' of '{domain}' has no saved domain definition; "
            "virtdeck cannot revert it"
        )
    current = {d.target: d for d in common.disks_of(hv, domain)}
    common.require_image_files(domain, current.values(), "reverting an external snapshot")
    g = common.graph(hv)
    switches: list[DiskSwitch] = []
    for d in node.disks:
        if d.snapshot != EXTERNAL:
            continue
        if d.target not in current:
            raise StateError(
                f"disk {d.target} of snapshot '{node.name}' is no longer attached to '{domain}': "
                "attach it again before reverting"
            )
        chain = g.chain(d.image, d.image_format) if d.image else None
        if chain is None or not chain.complete:
            why = chain.problem if chain is not None else "it names no image file"
            raise NotFoundError(
                f"the image of snapshot '{node.name}' for {d.target} cannot be used ({why}); "
                "this snapshot cannot be reverted"
            )
        assert d.image is not None
        overlay = _free_overlay_name(files, d.image, f"{domain}.{node.name}.{d.target}")
        switches.append(DiskSwitch(d.target, d.image, d.image_format or "raw", overlay))
    if not switches:
        raise InvalidInputError(f"snapshot '{node.name}' of '{domain}' covers no disk")

    before = [d.path for d in current.values() if d.path and common.snapshottable(d)]
    before += [p for n in tree.nodes for d in n.disks for p in (d.image, d.overlay) if p]
    switched = {s.target for s in switches}
    keep = [s.image for s in switches]
    keep += [d.path for t, d in current.items() if d.path and t not in switched]
    keep += [d.image for n in tree.nodes for d in n.disks if d.image]
    discard = common.unneeded(g, domain, before, keep)

    new_dom = ET.fromstring(ET.tostring(snap_dom))
    common.switch_disks(new_dom, {s.target: (s.overlay, "qcow2") for s in switches})
    for src in new_dom.iter("source"):
        src.attrib.pop("index", None)
    memory, start_after, result = _after_revert(files, node, state)
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
        notes=tuple(files.pool_notes([s.overlay for s in switches])),
    )


def revert(
    hv: Hypervisor,
    plan: RevertPlan,
    progress: Progress = no_progress,
    *,
    qemu_img: QemuImg | None = None,
) -> None:
    dom = hv.lookup(plan.domain)
    try:
        verb = f"reverting to '{plan.snapshot}'"
        with bases.snapshot_guard(hv, plan.domain, verb, internal=plan.kind == INTERNAL):
            _revert(hv, dom, plan, progress, qemu_img)
    finally:
        hv.invalidate(dom.UUIDString())
    progress(f"'{plan.domain}' is back at '{plan.snapshot}'", 1.0)


def _revert(
    hv: Hypervisor, dom: object, plan: RevertPlan, progress: Progress, qemu_img: QemuImg | None
) -> None:
    if plan.method == "libvirt":
        snap = common.lookup_snapshot(hv, dom, plan.domain, plan.snapshot)
        title = f"reverting '{plan.domain}' to '{plan.snapshot}'"
        progress(title, None)
        with audit.recorded(hv.uri, title, [plan.domain]):  # (virtdeck's path: ops.running)
            _libvirt_revert(hv, dom, plan, snap)
    else:
        files = files_for(
            hv,
            f"reverting external snapshot '{plan.snapshot}' (libvirt on this host cannot)",
            qemu_img=qemu_img,
        )
        _revert_external(hv, plan, progress, files)


_REVERT_TRIES = 3


def _libvirt_revert(hv: Hypervisor, dom: object, plan: RevertPlan, snap: object) -> None:
    """libvirt >= 9.9 reverts an external snapshot onto a new overlay named `<stem>.<unix
    seconds>` and refuses when that file exists ("external snapshot file for disk ... already
    exists"): two reverts within one second collide. It checks before changing anything, so
    wait for the next second and try again (a bounded number of times)."""
    what = f"reverting '{plan.domain}' to '{plan.snapshot}'"
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING if plan.start_after else 0
    for attempt in range(1, _REVERT_TRIES + 1):
        try:
            hv.call(dom.revertToSnapshot, snap, flags, what=what)  # type: ignore[attr-defined]
            return
        except OperationError as err:
            collided = "external snapshot file" in str(err) and "already exists" in str(err)
            if plan.kind == INTERNAL or not collided or attempt == _REVERT_TRIES:
                raise
        time.sleep(1.05 - time.time() % 1.0)


def _revert_external(hv: Hypervisor, plan: RevertPlan, progress: Progress, files: Files) -> None:
    dom = hv.lookup(plan.domain)
    old_xml = str(
        hv.call(
            dom.XMLDesc,
            libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE,
            what=plan.domain,
        )
    )
    old_snap = common.snapshot_xml(hv, plan.domain, plan.snapshot)
    tree = snapshot_tree(hv, plan.domain)
    old_current = tree.current.name if tree.current else None
    old_current_xml = (
        common.snapshot_xml(hv, plan.domain, old_current)
        if old_current and old_current != plan.snapshot
        else None
    )
    running = common.state(hv, plan.domain).active
    step = ops.cancellable(progress)  # until the commit an interrupt unwinds
    title = f"reverting '{plan.domain}' to '{plan.snapshot}'"
    dirs = {os.path.dirname(s.overlay) for s in plan.switches}
    with ops.running(hv, title, domains=[plan.domain], dirs=dirs) as undo:
        for i, s in enumerate(plan.switches):
            step(
                f"new overlay for {s.target} on {os.path.basename(s.image)}", i / len(plan.switches)
            )
            if files.lexists(s.overlay):
                raise InvalidInputError(f"{s.overlay} appeared meanwhile; retry the revert")
            with undo.step(f"remove {s.overlay}", "delete_file", path=s.overlay):
                files.create_overlay(s.overlay, s.image, s.image_format)
        if plan.stop_first and running:
            step(f"forcing '{plan.domain}' off", None)
            # Undone by booting it again on its own disks: an interrupted revert leaves the
            # domain running, as it found it (its memory state is lost either way).
            undo.push(f"start '{plan.domain}' again", "start", name=plan.domain)
            with contextlib.suppress(StateError):  # it stopped by itself: what we wanted
                hv.call(dom.destroy, what=f"forcing '{plan.domain}' off")
        step(f"switching the disks of '{plan.domain}' to the new overlays", None)
        undo.push(f"restore the definition of '{plan.domain}'", "define", xml=old_xml)
        hv.define(plan.domain_xml, what=f"redefining '{plan.domain}'")
        undo.domain_left(hv.call(dom.UUIDString))
        new_snap = common.set_snapshot_disks(
            old_snap, overlays={s.target: s.overlay for s in plan.switches}, images=None
        )
        if old_current_xml:
            undo.push(f"make '{old_current}' current again", "redefine_snapshot",
                      domain=plan.domain, xml=old_current_xml, current=True)  # fmt: skip
        undo.push(f"restore the metadata of '{plan.snapshot}'", "redefine_snapshot",
                  domain=plan.domain, xml=old_snap,
                  current=old_current == plan.snapshot)  # fmt: skip
        common.redefine(hv, plan.domain, new_snap, current=True)
        undo.commit()
    # Committed: the disks run on the fresh overlays and the snapshot is current.
    if plan.restore_memory:
        progress(f"restoring the memory state of '{plan.snapshot}'", None)
        flags = (
            libvirt.VIR_DOMAIN_SAVE_RUNNING
            if plan.result_state == "running"
            else libvirt.VIR_DOMAIN_SAVE_PAUSED
        )
        try:
            hv.call(
                hv.conn.restoreFlags,
                plan.restore_memory,
                plan.domain_xml,
                flags,
                what=f"restoring the memory of '{plan.snapshot}'",
            )
        except VirtdeckError as err:
            raise OperationError(
                f"'{plan.domain}' was reverted to '{plan.snapshot}' on disk, but {err}; "
                f"start it with 'virtdeck start {plan.domain}'"
            ) from None
    elif plan.start_after:
        progress(f"starting '{plan.domain}'", None)
        hv.call(dom.create, what=f"starting '{plan.domain}'")
    common.collect(hv, files, plan.domain, plan.discard, progress)
