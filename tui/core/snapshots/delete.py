"""Deleting snapshots. Internal snapshots, and external ones where libvirt says it can (libvirt
9.9 and newer), are deleted by libvirt. Older libvirt cannot, so on a hypervisor proved to be
this machine virtdeck commits the snapshot's overlay into its image (block commit while
running, `qemu-img commit` when shut off), fixes the domain and snapshot XML, and removes the
files nothing needs any more (asked of the storage graph). It never leaves a disk pointing at
a deleted file.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import libvirt

from tui.core import audit, bases, domxml, ops
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress, no_progress
from tui.core.snapshots import common
from tui.core.snapshots.tree import (
    EXTERNAL,
    INTERNAL,
    SnapshotNode,
    SnapshotTree,
    libvirt_handles_external,
    snapshot_mark,
    snapshot_tree,
)
from tui.core.storage import Files, files_for
from tui.core.storage.qemuimg import QemuImg

_COMMIT_TIMEOUT = 600.0


@dataclass(frozen=True)
class DeletePlan(ops.DestructivePlanDefaults):
    host: str
    domain: str
    snapshot: str
    names: tuple[str, ...]  # in deletion order: descendants first
    kind: str
    method: str
    children: bool
    lost: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def title(self) -> str:
        return f"Delete snapshot '{self.snapshot}' of '{self.domain}'?"

    @property
    def confirm_label(self) -> str:
        return "Delete"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        delete(hv, self, progress)
        return f"{self.domain}: deleted {', '.join(self.names)}"

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
    bases.refuse_base_write(
        hv, domain, f"deleting snapshot '{name}'", internal=node.kind == INTERNAL
    )
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
    native = node.kind == INTERNAL or (not by_virtdeck and libvirt_handles_external(hv))
    if native and node.kind != INTERNAL:
        # libvirt commits each overlay into its image and removes the overlay.
        touched = [
            p for n in names for d in tree.get(n).disks if d.snapshot == EXTERNAL
            for p in (d.image, d.overlay) if p
        ]  # fmt: skip
        users = common.used_elsewhere(hv, domain, tree, touched)
        if users:
            native = False
            notes.append(
                f"done by virtdeck, not libvirt: other images sit on its files ({', '.join(users)})"
            )
    if native:
        method = "libvirt"
    else:
        method = "virtdeck"
        # Validate the first step now so refusals come before any change, and show it.
        step = _plan_delete_one(hv, domain, tree.get(names[0]), tree)
        notes += [f"merge {c.overlay} into {c.image}" for c in step.commits]
        notes += list(step.kept)
        files = files_for(hv, f"deleting external snapshot '{name}'", define_pools=False)
        notes += files.pool_notes([c.overlay for c in step.commits])
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
    title = f"deleting snapshot(s) {', '.join(repr(n) for n in plan.names)} of '{plan.domain}'"
    verb = f"deleting snapshot '{plan.snapshot}'"
    with (
        audit.recorded(hv.uri, title, [plan.domain]) as entry,
        bases.snapshot_guard(hv, plan.domain, verb, internal=plan.kind == INTERNAL),
    ):
        _delete(hv, plan, progress, qemu_img, entry.steps)


def _delete(
    hv: Hypervisor,
    plan: DeletePlan,
    progress: Progress,
    qemu_img: QemuImg | None,
    steps: list[str],
) -> None:
    dom = hv.lookup(plan.domain)
    try:
        if plan.method == "libvirt" and plan.kind != INTERNAL:
            # libvirt (11.3) refuses DELETE_CHILDREN for external snapshots ("deletion of
            # external disk snapshots with children not supported"): one by one, descendants
            # first.
            for i, name in enumerate(plan.names):
                progress(f"deleting '{name}' of '{plan.domain}'", i / len(plan.names))
                snap = common.lookup_snapshot(hv, dom, plan.domain, name)
                hv.call(
                    snap.delete,  # type: ignore[attr-defined]
                    0,
                    what=f"deleting snapshot '{name}' of '{plan.domain}'",
                )
                steps.append(f"deleted '{name}'")
        elif plan.method == "libvirt":
            snap = common.lookup_snapshot(hv, dom, plan.domain, plan.snapshot)
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN if plan.children else 0
            progress(f"deleting '{plan.snapshot}' of '{plan.domain}'", None)
            hv.call(
                snap.delete,  # type: ignore[attr-defined]
                flags,
                what=f"deleting snapshot '{plan.snapshot}' of '{plan.domain}'",
            )
            steps.extend(f"deleted '{name}'" for name in plan.names)
        else:
            files = files_for(
                hv,
                f"deleting external snapshot '{plan.snapshot}' (libvirt on this host cannot)",
                qemu_img=qemu_img,
            )
            for i, name in enumerate(plan.names):
                progress(f"deleting '{name}' of '{plan.domain}'", i / len(plan.names))
                tree = snapshot_tree(hv, plan.domain)
                step = _plan_delete_one(hv, plan.domain, tree.get(name), tree)
                _delete_one(hv, step, files, progress)
                steps.append(f"deleted '{name}'")
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
    hv: Hypervisor, domain: str, node: SnapshotNode, tree: SnapshotTree
) -> _DeleteStep:
    state = common.state(hv, domain)
    g = common.graph(hv)
    c = g.canonical
    current = {d.target: d for d in common.disks_of(hv, domain)}
    common.require_image_files(domain, current.values(), "deleting an external snapshot")
    rest = [n for n in tree.nodes if n.name != node.name]
    commits: list[_Commit] = []
    kept: list[str] = []
    for d in node.disks:
        if d.snapshot != EXTERNAL or not d.overlay or not g.session.image(d.overlay).known:
            continue
        ov, img = c(d.overlay), c(d.image) if d.image else None
        top_path = current[d.target].path if d.target in current else None
        top = c(top_path) if top_path else None
        active_chain = g.chain_paths(top_path) if top_path else ()
        needed = ov in active_chain or any(
            ov in g.chain_paths(o.image) for n in rest for o in n.disks
            if o.target == d.target and o.image
        )  # fmt: skip
        if not needed or not img:
            continue  # nothing sits on the overlay: it is simply collected
        img_users = g.children(img) - {ov}
        others = sorted({u.name for u in g.users([img], exclude=domain)})
        if img_users or others:
            who = sorted(img_users) or others
            kept.append(f"{ov} stays: {img} also backs {', '.join(who)}")
            continue
        image = g.session.image(img)
        if image.read_only:
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
                image.format or d.image_format or "raw",
                is_top,
                tuple(sorted(g.children(ov))),
            )
        )
    before = [c(p) for d in node.disks for p in (d.image, d.overlay) if p]
    keep = [c(d.path) for d in current.values() if d.path and common.snapshottable(d)]
    keep += [c(x.image) for n in rest for x in n.disks if x.image]
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


def _delete_one(hv: Hypervisor, step: _DeleteStep, files: Files, progress: Progress) -> None:
    dom = hv.lookup(step.domain)
    for note in step.kept:
        progress(note, None)
    new_sources: dict[str, tuple[str, str]] = {}
    moved_images: dict[str, tuple[str, str]] = {}  # old image -> (new image, format)
    touched = False
    canonical = common.graph(hv).canonical if step.commits else str
    try:
        for c in step.commits:
            progress(
                f"merging {os.path.basename(c.overlay)} into {os.path.basename(c.image)}", None
            )
            touched = True  # from here on the snapshot's image no longer holds its state
            if c.active and step.running:
                _block_commit(hv, dom, c, progress)
            else:
                files.commit(c.overlay)
                for user in c.users:
                    files.rebase_unsafe(user, c.image, c.image_format)
                if c.active:
                    new_sources[c.target] = (c.image, c.image_format)
            moved_images[c.overlay] = (c.image, c.image_format)
        if new_sources or step.running and step.commits:
            secure = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
            root = domxml.parse(str(hv.call(dom.XMLDesc, secure, what=step.domain)))
            fix = dict(new_sources)
            for d in domxml.disks(root):
                for c in step.commits:
                    if (
                        c.active
                        and d.target == c.target
                        and d.path
                        and canonical(d.path) == c.overlay
                    ):
                        fix[d.target] = (c.image, c.image_format)
            if fix:
                common.switch_disks(root, fix)
                hv.define(domxml.to_string(root), what=f"redefining '{step.domain}'")
        # Snapshots whose image was a merged overlay now find that state in the image below.
        if moved_images:
            for n in snapshot_tree(hv, step.domain).nodes:
                if n.name == step.name:
                    continue
                images = {
                    d.target: moved_images[canonical(d.image)]
                    for d in n.disks
                    if d.image and canonical(d.image) in moved_images
                }
                if images:
                    xml = common.snapshot_xml(hv, step.domain, n.name)
                    common.redefine(
                        hv,
                        step.domain,
                        common.set_snapshot_disks(xml, images=images),
                        current=n.current,
                    )
    except VirtdeckError as err:
        if not touched:
            raise
        # Every disk still shows its latest writes (the overlays are only removed at the end),
        # but the snapshot's image changed: drop the snapshot so nobody reverts to it.
        with contextlib.suppress(VirtdeckError):
            snap = common.lookup_snapshot(hv, dom, step.domain, step.name)
            hv.call(snap.delete, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)  # type: ignore[attr-defined]
        raise OperationError(
            f"deleting '{step.name}' of '{step.domain}' failed half-way ({err}); no data was "
            f"lost, but '{step.name}' could no longer be reverted to and was removed: check "
            f"'virsh dumpxml {step.domain}'"
        ) from None
    snap = common.lookup_snapshot(hv, dom, step.domain, step.name)
    hv.call(
        snap.delete,  # type: ignore[attr-defined]
        libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY,
        what=f"deleting snapshot '{step.name}' of '{step.domain}'",
    )
    files.delete_quietly([c.overlay for c in step.commits], progress)
    if step.memory_file:
        files.delete_quietly([step.memory_file], progress)
    common.collect(hv, files, step.domain, _unneeded_paths(step), progress)


def _unneeded_paths(step: _DeleteStep) -> list[str]:
    return [p for p in step.before if p not in step.keep]


def _block_commit(hv: Hypervisor, dom: Any, c: _Commit, progress: Progress) -> None:
    """Active block commit of the top overlay into its backing image, then pivot."""
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    hv.call(dom.blockCommit, c.target, c.image, None, 0, flags, what=f"block commit of {c.target}")
    deadline = time.monotonic() + _COMMIT_TIMEOUT
    what = f"block job of {c.target}"
    while True:
        info = hv.call(dom.blockJobInfo, c.target, 0, what=what) or {}
        end, cur = int(info.get("end", 0)), int(info.get("cur", 0))
        if end:
            progress(f"committing {c.target}", cur / end)
        if info and cur == end:
            try:
                hv.call(dom.blockJobAbort, c.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                break
            except VirtdeckError:
                pass  # not ready yet
        if time.monotonic() > deadline:
            with contextlib.suppress(VirtdeckError):
                hv.call(dom.blockJobAbort, c.target, 0)
            raise OperationError(
                f"block commit of {c.target} did not finish in {_COMMIT_TIMEOUT:.0f} s; aborted, "
                "the snapshot is kept"
            )
        time.sleep(0.1)
    while hv.call(dom.blockJobInfo, c.target, 0, what=what):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)


# -- the undo of a snapshot taken (snapshot create, group snapshots) -----------------------


def _check_snapshot(
    hv: Hypervisor, action: ops.UndoAction, live: bool, owned: frozenset[str]
) -> str:
    """Why a member's snapshot must not be deleted now (it was taken again since), or ''."""
    domain, name, token = action.args["domain"], action.args["name"], action.args.get("token")
    if action.identity is None and live:
        return ""
    if action.identity is None:
        # The connection was lost while libvirt worked: the daemon may have taken it after.
        # Only the operation's token in its description proves it is this one (snapshot
        # create asks for it with the token; one taken again under the name never has it).
        if not token:
            return "it was never recorded as taken, so it is not provably this one"
        try:
            mark = snapshot_mark(hv, domain, name)
        except NotFoundError:
            return ""  # never taken (or gone): nothing to delete
        if mark != token:
            return (
                f"snapshot '{name}' does not carry this operation's mark (taken by another "
                "since), so it is not provably this one"
            )
        return ""
    try:
        node = snapshot_tree(hv, domain).find(name)
    except NotFoundError:
        return ""
    if node is not None and node.created.isoformat() != action.identity.get("created"):
        return f"snapshot '{node.name}' was taken again since ({node.created.isoformat()})"
    return ""


@ops.undo_kind("delete_snapshot", check=_check_snapshot)
def delete_snapshot(hv: Hypervisor, domain: str, name: str, token: str | None = None) -> None:
    """Undo of a group member's snapshot (idempotent: a domain or snapshot that is gone is
    not an error). Internal snapshots are deleted by libvirt, external ones as `virtdeck
    snapshot delete` would (nothing was written to their overlays but what came after).
    `token`: what proves the snapshot is this operation's (checked by _check_snapshot)."""

    try:
        tree = snapshot_tree(hv, domain)
    except NotFoundError:
        return
    if tree.find(name) is None:
        return
    try:
        delete(hv, plan_delete(hv, domain, name))
    except ops.Interrupted as err:
        # The group was interrupted and the delete is an operation of its own: leave the
        # journal entry to `virtdeck recover`.
        raise OperationError(f"interrupted ({err})") from None
