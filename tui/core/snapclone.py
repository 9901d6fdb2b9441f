"""Clones of a VM as it was at one of its snapshots, without making a template and without
changing the VM, its snapshot tree or its current state.

Where each disk's state at the snapshot lives:
- external: the layer the snapshot froze (the image the disk had when it was taken, never
  written since: the VM writes the overlay above it). Thin clones get an overlay on it (the
  VM's snapshot delete and revert keep what other domains build on, see
  tui.core.snapshots.common.used_elsewhere); full clones a `qemu-img convert` copy of it.
- internal: inside the VM's image. It is exported read-only with `qemu-img convert -l
  snapshot.name=SNAP` (the image is only read; the VM must be shut off, since qemu-img does not
  read an image a running QEMU writes) into a new base beside it, made read-only like a
  template's base, that thin clones build on; full clones are exported straight into their
  own files.

The clone definitions come from the snapshot's own copy of the VM's definition (as it was
then), made unique per clone like a template's clones (tui.core.clonexml). Plan, then execute
under the family lock, journalled: an interrupt or a failure removes every clone, overlay and
export the run made.
"""

from __future__ import annotations

import os
import random
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from tui.core import bases, clonexml, domxml, ops
from tui.core.clones import (
    OVERLAY_BYTES,
    _all_macs,
    _mark_complete,
    _new_mac,
    clone_names,
)
from tui.core.errors import InvalidInputError, NotFoundError, StateError
from tui.core.hypervisor import Hypervisor
from tui.core.identity import (
    Customisation,
    Identity,
    IdentityError,
    check_hostname,
    customise_all,
    require_tool,
)
from tui.core.models import VirtdeckMeta
from tui.core.progress import Progress, no_progress
from tui.core.storage import Files, LocalFiles, Resolver, files_for, require_local
from tui.core.templates import now_iso
from tui.core.units import size


@dataclass(frozen=True)
class SnapDisk:
    target: str
    kind: str  # "internal" or "external"
    image: str  # the VM's image that holds the snapshot's state
    image_format: str
    base: str  # what the clones build on or copy: the frozen layer, or the export
    bytes_needed: int


@dataclass(frozen=True)
class SnapItem:
    name: str
    uuid: str
    disks: tuple[tuple[str, str], ...]  # (target, path)
    xml: str
    customise: Customisation | None = None  # its hostname, SSH keys, first-boot commands


@dataclass(frozen=True)
class SnapClonePlan(ops.PlanDefaults):
    host: str
    vm: str
    snapshot: str
    created: str  # the snapshot's creation time (re-checked under the lock)
    mode: str  # thin | full
    disks: tuple[SnapDisk, ...]
    exports: tuple[str, ...]  # new read-only bases (internal snapshots, thin clones)
    items: tuple[SnapItem, ...]
    bytes_needed: int

    @property
    def title(self) -> str:
        return f"Deploy {len(self.items)} {self.mode} clone(s) of '{self.vm}' at '{self.snapshot}'?"

    @property
    def confirm_label(self) -> str:
        return "Deploy"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        names = execute_snapshot_clone(hv, self, progress)
        return f"deployed {', '.join(names)} ({self.mode}) from '{self.vm}' at '{self.snapshot}'"

    def summary(self) -> list[str]:
        lines = []
        for d in self.disks:
            how = "the layer it froze" if d.kind == "external" else "exported read-only"
            lines.append(f"{d.target}: {d.kind} snapshot, state in {d.image} ({how})")
        lines.extend(f"new read-only base {p}" for p in self.exports)
        for item in self.items:
            lines.append(f"{item.name}  uuid {item.uuid}")
            if item.customise is not None:
                lines.append(f"  identity: {item.customise.line()}")
            for (target, path), d in zip(item.disks, self.disks, strict=True):
                how = f"overlay on {d.base}" if self.mode == "thin" else "standalone copy"
                lines.append(f"  {target}: {path} ({how})")
        lines.append(f"space needed: at most {size(self.bytes_needed)}")
        lines.append(f"'{self.vm}', its snapshots and its current state are not changed")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "vm": self.vm,
            "snapshot": self.snapshot,
            "mode": self.mode,
            "disks": [d.__dict__ for d in self.disks],
            "exports": list(self.exports),
            "items": [
                {
                    "name": i.name,
                    "uuid": i.uuid,
                    "disks": dict(i.disks),
                    "customise": i.customise.to_json() if i.customise else None,
                }
                for i in self.items
            ],
            "bytes_needed": self.bytes_needed,
        }


def plan_snapshot_clone(
    hv: Hypervisor,
    vm: str,
    snapshot: str,
    name: str,
    *,
    count: int = 1,
    full: bool = False,
    rng: random.Random | None = None,
    identity: Identity | None = None,
) -> SnapClonePlan:
    """Validate and describe the clones; nothing is written. `identity`: what each clone gets
    of its own (tui.core.identity: only what is asked for; the hostname stays by default)."""
    from tui.core.snapshots import common
    from tui.core.snapshots.tree import snapshot_tree

    files = files_for(hv, "clone from snapshot")
    rng = rng or random.SystemRandom()
    names = clone_names(name, count)
    if bases.is_template(hv, vm):
        raise InvalidInputError(f"'{vm}' is a template (it has no snapshots): use 'clone {vm}'")
    node = snapshot_tree(hv, vm).find(snapshot)
    if node is None:
        raise NotFoundError(f"'{vm}' has no snapshot '{snapshot}' ('virtdeck snapshot ls {vm}')")
    for n in names:
        if hv.exists(n):
            raise InvalidInputError(f"a domain named '{n}' already exists; choose another name")
    root = domxml.parse(common.snapshot_xml(hv, vm, snapshot))
    troot = root.find("domain")
    if troot is None:
        raise InvalidInputError(f"snapshot '{snapshot}' of '{vm}' keeps no definition to clone")
    taken: set[str] = set()
    disks, exports = _snapshot_disks(hv, files, vm, snapshot, node, troot, names, name, full,
                                     taken)  # fmt: skip
    if not disks:
        raise InvalidInputError(f"snapshot '{snapshot}' of '{vm}' holds no disk image to clone")
    who = identity or Identity()
    if who.explicit:
        if not hv.local:
            raise IdentityError(
                f"cannot give clones on {hv.uri} their own identity: virt-customize writes "
                "the clone's disk on this machine; drop --hostname-template/--ssh-key/--first-boot"
            )
        require_tool()
    taken_macs = _all_macs(hv)
    items: list[SnapItem] = []
    meta = VirtdeckMeta(
        role="clone",
        created=now_iso(),
        source=f"{vm}@{snapshot}",
        mode="full" if full else "thin",
        complete=False,
    )
    for n in names:
        items.append(_snap_item(files, n, len(items), disks, troot, meta, vm, who, taken,
                                taken_macs, rng))  # fmt: skip
    per_clone = sum(sd.bytes_needed if full else OVERLAY_BYTES for sd in disks)
    needed = per_clone * len(items) + sum(sd.bytes_needed for sd in disks if sd.base in exports)
    where = os.path.dirname(disks[0].image)
    if needed > files.free_bytes(where):
        raise InvalidInputError(
            f"not enough space in {where}: the clones need up to {size(needed)}, "
            f"{size(files.free_bytes(where))} is free"
        )
    return SnapClonePlan(
        host=hv.uri,
        vm=vm,
        snapshot=snapshot,
        created=node.created.isoformat(),
        mode="full" if full else "thin",
        disks=tuple(disks),
        exports=tuple(exports),
        items=tuple(items),
        bytes_needed=needed,
    )


def _snapshot_disks(
    hv: Hypervisor,
    files: Files,
    vm: str,
    snapshot: str,
    node: Any,
    troot: Any,
    names: list[str],
    name: str,
    full: bool,
    taken: set[str],
) -> tuple[list[SnapDisk], list[str]]:
    """Each disk's image at the snapshot, and where an internal snapshot is exported to
    (a thin clone needs a file to build on); the files named go into `taken`."""
    wanted = {d.target for d in domxml.disks(troot) if d.is_image}
    resolver = Resolver(hv, ssh=True)
    disks: list[SnapDisk] = []
    exports: list[str] = []
    active = hv.domain(vm).state.active
    for d in node.disks:
        if d.target not in wanted:
            continue
        if d.snapshot not in ("internal", "external") or not d.image:
            raise InvalidInputError(
                f"disk {d.target} of '{vm}' is not in snapshot '{snapshot}' (snapshot='"
                f"{d.snapshot}'): its state then is unknown"
            )
        fmt = d.image_format or "qcow2"
        chain = resolver.chain(d.image, fmt)
        if not chain.complete:
            raise NotFoundError(f"disk {d.target} at '{snapshot}': {chain.problem}")
        need = sum(i.actual_bytes or 0 for i in chain.links) + OVERLAY_BYTES
        base = d.image
        if d.snapshot == "internal":
            require_local(hv, "exporting an internal snapshot")
            if active:
                raise StateError(
                    f"'{vm}' is running: qemu-img reads an internal snapshot only from an image "
                    "no QEMU writes; shut it down first (or take an --external snapshot)"
                )
            if not full:
                stem = names[0] if len(names) == 1 else name
                suffix = "" if not disks else f"-{d.target}"
                base = os.path.join(os.path.dirname(d.image), f"{stem}-base{suffix}.qcow2")
                if files.lexists(base) or base in taken:
                    raise InvalidInputError(f"{base} already exists; choose another name")
                taken.add(base)
                exports.append(base)
        disks.append(SnapDisk(d.target, d.snapshot, d.image, fmt, base, need))
    return disks, exports


def _snap_item(
    files: Files,
    n: str,
    index: int,
    disks: list[SnapDisk],
    troot: Any,
    meta: VirtdeckMeta,
    vm: str,
    who: Identity,
    taken: set[str],
    taken_macs: set[str],
    rng: random.Random,
) -> SnapItem:
    """One clone: its disk files, UUID, MACs, XML and customisation."""
    paths = []
    for i, sd in enumerate(disks):
        stem = n if i == 0 else f"{n}-{sd.target}"
        path = os.path.join(os.path.dirname(sd.image), stem + ".qcow2")
        if files.lexists(path) or path in taken:
            raise InvalidInputError(f"{path} already exists; choose another name")
        taken.add(path)
        paths.append((sd.target, path))
    uuid = str(uuidlib.uuid4())
    macs = tuple(_new_mac(taken_macs, rng) for _ in range(clonexml.interface_count(troot)))
    out = clonexml.clone_xml(
        troot,
        clonexml.CloneIdentity(
            name=n,
            uuid=uuid,
            macs=macs,
            disks=tuple((t, p, "qcow2") for t, p in paths),
            meta=meta,
            old_names=(vm,),
            nvram_present=False,
        ),
    )
    custom = None
    if who.explicit:
        custom = Customisation(
            images=tuple((p, "qcow2") for _, p in paths),
            hostname=None
            if who.hostname is None
            else check_hostname(who.hostname.format(name=n, n=index + 1), n),
            ssh_keys=who.ssh_keys,
            first_boot=who.first_boot,
        )
    return SnapItem(n, uuid, tuple(paths), out.xml, custom)


def _local(files: Files) -> LocalFiles:
    if not isinstance(files, LocalFiles):  # the plan refuses an internal export elsewhere
        raise StateError("an internal snapshot is exported on this machine only")
    return files


def execute_snapshot_clone(
    hv: Hypervisor, plan: SnapClonePlan, progress: Progress = no_progress
) -> list[str]:
    """Make the clones under the lock of the VM's image families; undo all on any failure."""
    from tui.core.snapshots.tree import snapshot_tree

    files = files_for(hv, "clone from snapshot")
    with bases.family_lock(hv, [d.image for d in plan.disks]):
        node = snapshot_tree(hv, plan.vm).find(plan.snapshot)
        if node is None or node.created.isoformat() != plan.created:
            raise StateError(f"snapshot '{plan.snapshot}' of '{plan.vm}' changed; plan again")
        if any(d.kind == "internal" for d in plan.disks) and hv.domain(plan.vm).state.active:
            raise StateError(f"'{plan.vm}' was started; plan again")
        made = list(plan.exports) + [p for i in plan.items for _, p in i.disks]
        for path in made:
            if files.lexists(path):
                raise InvalidInputError(f"{path} appeared meanwhile; plan again")
        progress = ops.cancellable(progress)
        title = f"deploying {len(plan.items)} clone(s) of '{plan.vm}' at '{plan.snapshot}'"
        dirs = {os.path.dirname(p) for p in made}
        try:
            with ops.running(
                hv, title, domains=[plan.vm, *(i.name for i in plan.items)], dirs=dirs
            ) as undo:
                for item in plan.items:
                    if hv.exists(item.name):
                        raise InvalidInputError(f"a domain named '{item.name}' exists; plan again")
                    progress(f"defining '{item.name}'", None)
                    undo.push(f"undefine '{item.name}'", "undefine", uuid=item.uuid,
                              name=item.name, keep_nvram=True)  # fmt: skip
                    hv.define(item.xml, what=f"defining clone '{item.name}' failed")
                for d in plan.disks:
                    if d.base in plan.exports:
                        progress(f"exporting '{plan.snapshot}' of {d.image} to {d.base}", None)
                        with undo.step(f"remove {d.base}", "delete_file", path=d.base):
                            _local(files).export_snapshot(d.image, plan.snapshot, d.base)
                        files.make_read_only(d.base)
                for item in plan.items:
                    for (_, path), d in zip(item.disks, plan.disks, strict=True):
                        with undo.step(f"remove {path}", "delete_file", path=path):
                            if plan.mode == "thin":
                                progress(f"{item.name}: overlay {path} on {d.base}", None)
                                files.create_overlay(path, d.base, "qcow2" if d.base in
                                                     plan.exports else d.image_format)  # fmt: skip
                            elif d.kind == "internal":
                                progress(f"{item.name}: exporting '{plan.snapshot}'", None)
                                _local(files).export_snapshot(d.image, plan.snapshot, path)
                            else:
                                files.copy(d.base, path, src_fmt=d.image_format,
                                           dst_fmt="qcow2", progress=progress,
                                           label=f"{item.name}: copying")  # fmt: skip
                    if item.customise is None:
                        _mark_complete(hv, item.name)
                work = [(i.name, i.customise) for i in plan.items if i.customise is not None]
                if work:
                    customise_all(work, progress)
                    for name, _ in work:
                        _mark_complete(hv, name)
                undo.commit()
        finally:
            hv.invalidate()
    return [i.name for i in plan.items]
