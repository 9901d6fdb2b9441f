"""Detaching a thin clone from its template's base: thin → full, for a clone that must outlive
its template.

`plan_detach()` is pure and validated: which disks have a backing chain, where each new
standalone image goes (beside the overlay), the space needed (the chain's allocation, the
upper bound of a sparse flattened copy) against what is free, and why it is refused: a
template, a domain with snapshots (an internal snapshot's clusters in the overlay still read
the base for what they never wrote, and an external one's older layers keep building on it:
flattening the top would leave them reading a file the template may delete), a domain whose
images others build on, a disk that is not an image file.

`execute_detach()` holds the lock of the clone's image families (tui.core.bases) from the
re-check to the last step:

- shut off: `qemu-img convert` of each disk's chain into its new file (journalled: undo
  deletes it, if it is still the file this operation made and no other domain took it),
  then one redefinition switching every disk to its new file and marking the clone full
  (journalled: undo restores the old definition, if it is still the one this operation left);
  if the domain was started meanwhile (it runs on the old overlay, so the copy is stale) the
  whole operation unwinds. The old overlays are removed last, after the commit.
- running (or paused): a libvirt block pull per disk (QEMU's block-stream: the base's
  clusters are copied into the overlay under the running guest, then the overlay's backing
  file is dropped). Progress from blockJobInfo. A cancel (Ctrl-C, SIGTERM, SIGHUP, the
  dashboard) aborts the job: the overlay keeps its backing file and its data, the clone runs
  on, still thin. A pull has nothing to undo: a virtdeck killed with SIGKILL leaves QEMU to
  finish it (the clone ends full, which is the finished result). Chosen over a block copy
  with pivot: a copy's new file, orphaned by a SIGKILL, stays a mirror target of a job QEMU
  keeps running; a pull makes no new file, and it works the same on libvirt 9.0 and 11.3.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import libvirt

from tui.core import bases, domxml, ops
from tui.core.errors import (
    DependencyError,
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskKind, DomainState
from tui.core.progress import Progress, no_progress
from tui.core.storage import Resolver, files_for
from tui.core.storage.qemuimg import QemuImg
from tui.core.units import size

#: Room for a new image's metadata (header, L1/L2 and refcount tables), over the chain's data.
METADATA_MARGIN = 1024**2
_STATES = (DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED, DomainState.SHUTOFF)
#: How often a running block pull is asked how far it got.
POLL = 0.1


@dataclass(frozen=True)
class DetachDisk:
    target: str
    overlay: str  # the clone's own top image now
    format: str
    backing: tuple[str, ...]  # the images below it, nearest first
    path: str  # where the standalone image ends up (the overlay itself for a live pull)
    bytes_needed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "overlay": self.overlay,
            "format": self.format,
            "backing": list(self.backing),
            "path": self.path,
            "bytes_needed": self.bytes_needed,
        }


@dataclass(frozen=True)
class DetachPlan(ops.PlanDefaults):
    host: str
    domain: str
    uuid: str
    live: bool  # running or paused: block pull; else convert and switch
    template: str | None  # what it was cloned from (its metadata), if anything
    disks: tuple[DetachDisk, ...]
    bytes_needed: int
    bytes_free: int | None
    overlay_ids: tuple[tuple[str, tuple[int, int] | None], ...] = ()  # (path, (dev, ino))
    bandwidth: int = 0  # MiB/s a running clone's pull may take (libvirt's limit); 0: none

    @property
    def title(self) -> str:
        return f"Detach '{self.domain}' from its base (thin → full)?"

    @property
    def confirm_label(self) -> str:
        return "Detach"

    @property
    def _rate(self) -> str:
        return f", at most {self.bandwidth} MiB/s" if self.bandwidth else ""

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        execute_detach(hv, self, progress)
        return f"detached '{self.domain}': its disks no longer build on a base"

    def summary(self) -> list[str]:
        how = (
            "running: block pull of the base into each overlay (the guest keeps running)"
            if self.live
            else "shut off: each chain converted into a new standalone image, then the "
            "definition switched to it and the old overlay removed"
        )
        lines = [f"{self.domain}: {how}"]
        for d in self.disks:
            below = " <- ".join(d.backing)
            if self.live:
                lines.append(f"  {d.target}: {d.overlay} (pull in {below}{self._rate})")
            else:
                lines.append(f"  {d.target}: {d.path} (copy of {d.overlay} on {below})")
        if self.bandwidth and not self.live:
            lines.append(f"  not limited to {self.bandwidth} MiB/s: only a running clone's pull is")
        free = f" of {size(self.bytes_free)} free" if self.bytes_free is not None else ""
        lines.append(f"space needed: at most {size(self.bytes_needed)}{free}")
        if self.template:
            lines.append(f"afterwards it no longer counts as a thin clone of '{self.template}'")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "domain": self.domain,
            "uuid": self.uuid,
            "live": self.live,
            "template": self.template,
            "disks": [d.to_json() for d in self.disks],
            "bytes_needed": self.bytes_needed,
            "bytes_free": self.bytes_free,
        }


def _snapshot_names(hv: Hypervisor, name: str) -> list[str]:
    from tui.core.snapshots.tree import snapshot_tree

    try:
        return sorted(snapshot_tree(hv, name).names)
    except OperationError:
        return []  # a driver without snapshots


def _new_path(files: Any, overlay: str, taken: set[str]) -> str:
    stem, ext = os.path.splitext(overlay)
    ext = ext or ".qcow2"
    for n in range(1, 100):
        path = f"{stem}-full{ext}" if n == 1 else f"{stem}-full-{n}{ext}"
        if path not in taken and not files.lexists(path):
            taken.add(path)
            return path
    raise InvalidInputError(f"no free name beside {overlay} for its standalone image")


def _ident(identity: dict[str, Any] | None) -> tuple[int, int] | None:
    if not identity or "dev" not in identity or "ino" not in identity:
        return None
    return int(identity["dev"]), int(identity["ino"])


def _refuse_snapshots(hv: Hypervisor, name: str) -> None:
    snaps = _snapshot_names(hv, name)
    if snaps:
        raise DependencyError(
            f"'{name}' has snapshots ({', '.join(snaps)}): they read the base for what they "
            "never wrote (an internal one inside the overlay, an external one's older layers), "
            "so flattening the top would leave them on a base its template may delete; delete "
            f"them first ('virtdeck snapshot delete {name} SNAP'); nothing was changed"
        )


def _overlay_format(name: str, disk: Any, chain: Any) -> str:
    fmt = str(chain.top.format or disk.format or "qcow2")
    if fmt != "qcow2":
        raise InvalidInputError(
            f"disk {disk.target} of '{name}' is {fmt} with a backing file: only qcow2 "
            "overlays are detached"
        )
    return fmt


def _free_space(
    files: Any, name: str, needed_by_dev: dict[int, int], dirs_by_dev: dict[int, str]
) -> dict[int, int]:
    """What is free on each file system the new images go to; refused where it is less than
    they need."""
    free = {dev: files.free_bytes(d) for dev, d in dirs_by_dev.items()}
    for dev, need in needed_by_dev.items():
        if need > free[dev]:
            raise InvalidInputError(
                f"not enough space in {dirs_by_dev[dev]}: detaching '{name}' needs up to "
                f"{size(need)}, {size(free[dev])} is free; nothing was changed"
            )
    return free


def plan_detach(
    hv: Hypervisor, name: str, *, qemu: QemuImg | None = None, bandwidth: int = 0
) -> DetachPlan:
    """Validate and describe the detach of `name`; nothing is written. `bandwidth`: the MiB/s
    a running clone's block pull may take (0: as fast as the disks go)."""
    if bandwidth < 0:
        raise InvalidInputError(f"bandwidth {bandwidth}: give MiB/s, 0 or more")
    files = files_for(hv, "detach", qemu_img=qemu)
    info = hv.domain(name)
    root = domxml.parse(hv.xml(name, inactive=True))
    meta = domxml.read_meta(root)
    if meta.role == "template" or info.is_template:
        raise InvalidInputError(
            f"'{name}' is a template: its images are the base others build on, not a clone's"
        )
    if info.state not in _STATES:
        raise StateError(
            f"'{name}' is {info.state.value}: detach works on a shut-off or a running domain"
        )
    live = info.state.active
    _refuse_snapshots(hv, name)
    resolver = Resolver(hv, qemu_img=qemu, ssh=True)
    taken: set[str] = set()
    disks: list[DetachDisk] = []
    needed_by_dev: dict[int, int] = {}
    dirs_by_dev: dict[int, str] = {}
    overlays: list[str] = []
    for disk in info.disks:
        if disk.readonly or disk.removable or disk.shareable or not disk.path:
            continue
        if disk.kind != DiskKind.FILE:
            if disk.backing_path:
                raise InvalidInputError(
                    f"disk {disk.target} of '{name}' is a {disk.kind.value} disk with a "
                    "backing chain: virtdeck detaches image files only"
                )
            continue
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target} of '{name}': {chain.problem}")
        if len(chain.links) < 2:
            continue  # already standalone
        fmt = _overlay_format(name, disk, chain)
        if live:
            need = sum(i.actual_bytes or 0 for i in chain.links[1:]) + METADATA_MARGIN
            path = disk.path
        else:
            need = sum(i.actual_bytes or 0 for i in chain.links) + METADATA_MARGIN
            path = _new_path(files, disk.path, taken)
        where = os.path.dirname(path)
        dev = files.device(where)
        needed_by_dev[dev] = needed_by_dev.get(dev, 0) + need
        dirs_by_dev.setdefault(dev, where)
        overlays.append(disk.path)
        disks.append(DetachDisk(disk.target, disk.path, fmt, chain.paths[1:], path, need))
    if not disks:
        raise InvalidInputError(
            f"'{name}' is already full: none of its disks has a backing file; nothing to do"
        )
    users = bases.image_users(hv, name, overlays)
    if users:
        raise DependencyError(
            f"'{name}' cannot be detached: others build on its disks ({'; '.join(users)}); "
            "nothing was changed"
        )
    free = _free_space(files, name, needed_by_dev, dirs_by_dev)
    return DetachPlan(
        host=hv.uri,
        domain=name,
        uuid=info.uuid,
        live=live,
        template=meta.source if meta.role == "clone" else None,
        disks=tuple(disks),
        bytes_needed=sum(needed_by_dev.values()),
        bytes_free=min(free.values()) if free else None,
        overlay_ids=tuple((p, _ident(files.identity(p))) for p in overlays),
        bandwidth=bandwidth,
    )


def execute_detach(hv: Hypervisor, plan: DetachPlan, progress: Progress = no_progress) -> list[str]:
    """Carry the plan out under the family lock (re-checked there); returns the standalone
    images. Any failure or interrupt leaves the clone as it was (still thin)."""
    with bases.family_lock(hv, [d.overlay for d in plan.disks]):
        _recheck(hv, plan)
        try:
            if plan.live:
                _detach_live(hv, plan, progress)
            else:
                _detach_offline(hv, plan, progress)
        finally:
            hv.invalidate()
    return [d.path for d in plan.disks]


def _recheck(hv: Hypervisor, plan: DetachPlan) -> None:
    """Under the lock: the same domain, in the same kind of state, on the same chains."""
    again = "; plan again"
    hv.invalidate()
    if not hv.exists(plan.domain):
        raise NotFoundError(f"'{plan.domain}' is gone{again}")
    info = hv.domain(plan.domain)
    if info.uuid != plan.uuid:
        raise StateError(f"'{plan.domain}' is another domain now (uuid {info.uuid}){again}")
    if info.state not in _STATES or info.state.active != plan.live:
        now = info.state.value
        raise StateError(f"'{plan.domain}' is {now} now, not as planned{again}")
    snaps = _snapshot_names(hv, plan.domain)
    if snaps:
        raise DependencyError(f"'{plan.domain}' has snapshots now ({', '.join(snaps)}){again}")
    sources = {d.target: d.path for d in info.disks}
    resolver = Resolver(hv, ssh=True)
    files = files_for(hv, "detach")
    for d in plan.disks:
        if sources.get(d.target) != d.overlay:
            raise StateError(f"disk {d.target} of '{plan.domain}' changed since the plan{again}")
        chain = resolver.chain(d.overlay, d.format)
        if not chain.complete or chain.paths[1:] != d.backing:
            raise StateError(
                f"the chain of {d.overlay} changed since the plan "
                f"({chain.problem or ' <- '.join(chain.paths)}){again}"
            )
        if not plan.live and files.lexists(d.path):
            raise InvalidInputError(f"{d.path} appeared meanwhile{again}")
    users = bases.image_users(hv, plan.domain, [d.overlay for d in plan.disks])
    if users:
        raise DependencyError(f"others build on the disks of '{plan.domain}' now: {users}")


def _mark_full(root: Any) -> None:
    meta = domxml.read_meta(root)
    if meta.role == "clone":
        domxml.write_meta(root, replace(meta, mode="full"))


def _detach_offline(hv: Hypervisor, plan: DetachPlan, progress: Progress) -> None:
    from tui.core.snapshots.common import switch_disks

    files = files_for(hv, "detach")
    progress = ops.cancellable(progress)
    total = sum(d.bytes_needed for d in plan.disks) or 1
    done = 0
    dirs = {os.path.dirname(d.path) for d in plan.disks}
    title = f"detaching '{plan.domain}' from its base"
    with ops.running(hv, title, domains=[plan.domain], dirs=dirs) as undo:
        for d in plan.disks:
            start, share = done / total, d.bytes_needed / total

            def scaled(msg: str, frac: float | None, s: float = start, w: float = share) -> None:
                progress(msg, None if frac is None else s + frac * w)

            with undo.step(f"remove {d.path}", "delete_file", path=d.path):
                files.copy(
                    d.overlay,
                    d.path,
                    src_fmt=d.format,
                    dst_fmt="qcow2",
                    progress=scaled,
                    label=f"{plan.domain}: {d.target} into {os.path.basename(d.path)}",
                )
            done += d.bytes_needed
        progress(f"switching '{plan.domain}' to its standalone image(s)", None)
        dom = hv.lookup(plan.domain)
        secure = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        old = str(hv.call(dom.XMLDesc, secure, what=plan.domain))
        root = domxml.parse(old)
        switch_disks(root, {d.target: (d.path, "qcow2") for d in plan.disks})
        _mark_full(root)
        if hv.domain(plan.domain).state != DomainState.SHUTOFF:
            raise StateError(f"'{plan.domain}' was started during the copy; nothing was kept")
        undo.push(f"restore the definition of '{plan.domain}'", "define", xml=old)
        hv.define(domxml.to_string(root), what=f"switching the disks of '{plan.domain}'")
        undo.domain_left(plan.uuid)
        hv.invalidate()
        # Started between the check above and the define, it runs on the old overlay and the
        # copy is stale: restore the old definition (the unwinding) rather than lose writes.
        if hv.domain(plan.domain).state != DomainState.SHUTOFF:
            raise StateError(f"'{plan.domain}' was started during the switch; nothing was kept")
        undo.commit()
    # Last, and only the very files the plan saw (same device and inode).
    with ops.signals_deferred():
        for path, was in plan.overlay_ids:
            now = _ident(files.identity(path))
            if was is not None and now == was:
                progress(f"removing the old overlay {path}", None)
                files.delete_quietly([path], progress)
            elif now is not None:
                progress(f"kept {path}: it is not the file the plan saw", None)
    progress(f"'{plan.domain}' detached", 1.0)


def _detach_live(hv: Hypervisor, plan: DetachPlan, progress: Progress) -> None:
    title = f"detaching running '{plan.domain}' from its base"
    with ops.running(hv, title, domains=[plan.domain]) as undo:
        dom = hv.lookup(plan.domain)
        for i, d in enumerate(plan.disks):
            _pull(hv, dom, plan.domain, d, progress, (i, len(plan.disks)), plan.bandwidth)
        root = domxml.parse(hv.xml(plan.domain, inactive=True))
        if domxml.read_meta(root).role == "clone":
            hv.update_meta(plan.domain, f"marking '{plan.domain}' full", mode="full",
                           live=bool(hv.call(dom.isActive)))  # fmt: skip
        undo.commit()
    progress(f"'{plan.domain}' detached", 1.0)


def _pull(
    hv: Hypervisor,
    dom: Any,
    name: str,
    d: DetachDisk,
    progress: Progress,
    nth: tuple[int, int],
    bandwidth: int,
) -> None:
    """One block pull (disk `nth` = (i, of n)) at most `bandwidth` MiB/s (0: no limit), waited
    for; on any interrupt or error the job is aborted (the overlay keeps its backing file)
    before the error goes on."""
    i, n = nth
    what = f"block pull of {d.target} of '{name}'"
    if hv.call(dom.blockJobInfo, d.target, 0, what=what):
        raise StateError(f"disk {d.target} of '{name}' already has a block job; nothing was done")
    hv.call(dom.blockPull, d.target, bandwidth, 0, what=what)
    try:
        while True:
            ops.check_cancelled()
            info = hv.call(dom.blockJobInfo, d.target, 0, what=what) or {}
            if not info:
                break
            end, cur = int(info.get("end", 0)), int(info.get("cur", 0))
            frac = (i + (cur / end if end else 0.0)) / n
            progress(f"{name}: pulling the base into {d.target} ({size(cur)} of {size(end)})", frac)
            time.sleep(POLL)
    except BaseException:
        with ops.signals_deferred():
            _abort(hv, dom, d.target, what)
        raise
    # The job is gone: finished, or failed inside QEMU (libvirt says which only in an event).
    hv.invalidate()
    chain = Resolver(hv, ssh=True).chain(d.overlay, d.format)
    if len(chain.links) != 1:
        raise OperationError(
            f"{what} ended before it finished; the disk is still thin ({chain.problem or ''})"
        )


def _abort(hv: Hypervisor, dom: Any, target: str, what: str) -> None:
    """Abort the pull synchronously (the overlay keeps its backing file)."""
    with contextlib.suppress(VirtdeckError):
        hv.call(dom.blockJobAbort, target, 0, what=what)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if not hv.call(dom.blockJobInfo, target, 0, what=what):
                return
        except VirtdeckError:
            return
        time.sleep(POLL)


@dataclass(frozen=True)
class GroupDetachPlan(ops.PlanDefaults):
    """Several clones detached one after another, each on its own (one atomic detach each):
    a failure stops the group there; those before it stay detached, the failed one is as
    it was, those after it are not touched. Clones already full are skipped (said)."""

    host: str  # the first member's (every plan names its own)
    plans: tuple[DetachPlan, ...]
    skipped: tuple[str, ...] = ()  # "name: why" of the members with nothing to do

    @property
    def title(self) -> str:
        return f"Detach {len(self.plans)} clone(s) from their bases (thin → full)?"

    @property
    def confirm_label(self) -> str:
        return "Detach"

    def summary(self) -> list[str]:
        lines = [line for p in self.plans for line in p.summary()]
        lines += [f"skipped {s}" for s in self.skipped]
        if len(self.plans) > 1:
            lines.append(
                "one after another: a failure stops there (those before stay detached, the "
                "failed one stays as it was)"
            )
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"plans": [p.to_json() for p in self.plans], "skipped": list(self.skipped)}

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        done = []
        for p in self.plans:  # those of `hv` (the CLI runs each member on its own host)
            if p.host == hv.uri:
                execute_detach(hv, p, progress)
                done.append(p.domain)
        return f"detached {', '.join(done)}: no longer building on a base"


def plan_group_detach(
    members: list[tuple[Hypervisor, str]], *, bandwidth: int = 0
) -> GroupDetachPlan:
    """Every member planned first (a refusal refuses the group, nothing done); a member that
    is already full is skipped. `bandwidth`: as plan_detach."""
    plans, skipped = [], []
    for hv, name in members:
        try:
            plans.append(plan_detach(hv, name, bandwidth=bandwidth))
        except InvalidInputError as err:
            if "already full" not in str(err):
                raise
            skipped.append(f"{name}: already full")
    if not plans:
        raise InvalidInputError("nothing to detach: " + "; ".join(skipped or ["no domain"]))
    return GroupDetachPlan(plans[0].host, tuple(plans), tuple(skipped))
