"""Removing a domain or template (`rm`) without breaking the clones of others.

`plan_remove()` refuses to remove a template others build on (listing them) and asks the
storage graph which files belong to the domain alone: every file in the chains of its disks and
of its snapshots (also those no longer on the current chain after a revert), minus what any
other domain, template backup or image lying beside them still reads. `execute_remove()`
journals the definition (and snapshots) before undefining, then deletes exactly the planned
files, going forward to the end, and returns what it really deleted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import libvirt

from tui.core import bases, domxml, ops
from tui.core.errors import (
    DependencyError,
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskInfo, DiskKind
from tui.core.progress import Progress, no_progress
from tui.core.snapshots import snapshot_tree
from tui.core.snapshots.common import snapshot_xml
from tui.core.storage import files_for
from tui.core.storage.local import remove_private
from tui.core.templates import (
    backup_templates,
    own_images,
    storage_graph,
)


@dataclass(frozen=True)
class RemovePlan(ops.DestructivePlanDefaults):
    """What `rm` does: undefine, and (with storage) delete exactly the files listed.

    `delete_files` are the files that belong to the domain alone (its disks' own chains, its
    snapshots' overlays and memory files), nearest first; `kept` says why each file of its
    chains stays; `foreign` names its disks that are not image files (never deleted).
    """

    host: str
    name: str
    defined: bool
    is_template: bool
    storage: bool
    images: tuple[str, ...]  # the domain's own image files
    delete_files: tuple[str, ...]  # those of its files deleted (only with storage)
    kept_files: tuple[str, ...]  # its files left on disk, and the backing files it reads
    backup: str | None  # a template's XML backup, removed with it
    snapshots: tuple[str, ...] = ()  # its snapshots, forgotten with it
    kept: tuple[tuple[str, str], ...] = ()  # (path, why) for files of its chains that stay
    foreign: tuple[str, ...] = ()  # its disks that are not image files, described
    notes: tuple[str, ...] = ()  # storage set-up on another host (pools defined), shared storage
    force: bool = False  # --force: delete although a host that may share the storage was not asked
    ask: bool = False  # the confirmation asks whether its files go too (the dashboard's x)

    @property
    def title(self) -> str:
        return f"Remove '{self.name}'?"

    @property
    def confirm_label(self) -> str:
        return "Remove"

    @property
    def option(self) -> str | None:
        """Asked, the confirmation offers to delete the files too (unticked by default)."""
        if not (self.ask and self.storage):
            return None
        return "Also delete its own files (listed above)"

    def choose(self, on: bool) -> RemovePlan:
        if on or not self.storage:
            return replace(self, ask=False)
        kept = self.delete_files + self.kept_files
        return replace(self, storage=False, delete_files=(), kept_files=kept, ask=False)

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        done = execute_remove(hv, self, progress)
        return f"removed '{self.name}'" + (f" and deleted {', '.join(done)}" if done else "")

    def summary(self) -> list[str]:
        what = "template" if self.is_template else "domain"
        lines = [f"undefine {what} '{self.name}'" if self.defined
                 else f"forget undefined template '{self.name}'"]  # fmt: skip
        if self.backup:
            lines.append(f"delete its XML backup {self.backup}")
        if self.snapshots:
            lines.append(f"forget its snapshots: {', '.join(self.snapshots)}")
        verb = "if ticked below, delete" if self.ask else "delete"
        lines.extend(f"{verb} {p}" for p in self.delete_files)
        why = dict(self.kept)
        lines.extend(f"keep {p}" + (f" ({why[p]})" if p in why else "") for p in self.kept_files)
        lines.extend(f"keep {d} (not an image file: virtdeck never deletes it)"
                     for d in self.foreign)  # fmt: skip
        lines.extend(self.notes)
        return lines


def plan_remove(
    hv: Hypervisor,
    name: str,
    *,
    storage: bool = False,
    backup_dir: Path | None = None,
    others: Sequence[Hypervisor] = (),
    force: bool = False,
) -> RemovePlan:
    """Refuse a domain other domains build on (listing them); say which files go.

    The files to delete are also asked of every other host (`others`, the connected ones, and
    the saved hosts of config.toml): a domain there that reads one refuses the removal, and a
    host that may share the storage but cannot be asked refuses it unless `force`.

    The files come from the storage graph: every file in the chains of the domain's disks and
    of its snapshots (also those no longer on the current chain after a revert), minus what
    any other domain, template backup or image beside them still reads, and minus read-only
    bases under its own disks.
    """
    files = files_for(hv, "rm --storage") if storage else None
    disks, is_template, defined, backup, seed = _what_is_removed(hv, name, backup_dir)
    for d in disks:
        if storage and d.kind == DiskKind.UNSAFE:
            raise InvalidInputError(
                f"disk {d.target} of '{name}' is a {d.described}: virtdeck cannot tell which "
                "file it is, so it deletes none; rename the file and fix the definition first"
            )
    own = own_images(disks)
    # Its seed is the one removable medium virtdeck deletes: it made it, and recorded where
    # (the CD-ROM must still name that very file).
    seed = next((d.path for d in disks if seed and d.kind == DiskKind.FILE
                 and d.device == "cdrom" and d.path == seed), None)  # fmt: skip
    foreign = tuple(
        f"{d.target}: {d.described}"
        for d in disks
        if not d.is_image and d.kind.value != "empty" and not (seed and d.source == seed)
    )
    images = [d.path for d in own if d.path]
    graph = storage_graph(hv, backup_dir)
    _refuse_dependents(hv, graph, name, images, storage, is_template)
    snapshots, roots, memory = _snapshot_files(hv, name) if defined else ((), [], [])
    freed = graph.freed(images + roots, exclude=name, own_tops=images, read_only_is_shared=True)
    delete = list(freed.delete)
    kept_why = list(freed.kept)
    if files is not None:
        _add_own_files(files, graph, images, memory, seed, delete, kept_why)
    kept = [p for p, _ in kept_why]
    if not storage:
        kept = delete + kept
        delete = []
    shared = bases.Others()
    if delete:
        shared = bases.ask_others(hv, delete, bases.other_hosts(hv, others), domain=name)
        bases.refuse_other_users(f"'{name}' cannot be removed with its files", shared, force=force)
    return RemovePlan(
        hv.uri,
        name,
        defined,
        is_template,
        storage,
        tuple(graph.canonical(p) for p in images),
        tuple(delete),
        tuple(kept),
        backup,
        snapshots,
        kept=tuple(kept_why),
        foreign=foreign,
        notes=(tuple(files.pool_notes(delete)) if files is not None and delete else ())
        + tuple(shared.notes(force)),
        force=force,
    )


def _refuse_dependents(
    hv: Hypervisor, graph: Any, name: str, images: list[str], storage: bool, is_template: bool
) -> None:
    """Undefining a plain domain harms nobody; deleting its files, or a template others were
    deployed from, would: refused while any domain reads them, or when that is unknown."""
    if not graph.resolver.reads_host and graph.problems:
        raise OperationError(
            f"cannot tell which domains on {hv.uri} depend on the images of '{name}' "
            f"({graph.problems[0]}); nothing was changed"
        )
    users = graph.users(images, exclude=name) if storage or is_template else []
    if users:
        names = sorted({str(u) for u in users})
        what = "template" if is_template else "domain"
        raise DependencyError(
            f"{what} '{name}' cannot be removed: {len(names)} domain(s) depend on its "
            f"image(s): {', '.join(names)} (remove them first)"
        )


def _what_is_removed(
    hv: Hypervisor, name: str, backup_dir: Path | None
) -> tuple[tuple[DiskInfo, ...], bool, bool, str | None, str | None]:
    """Its disks, whether it is a template, whether it is defined, its XML backup and the
    cloud-init seed virtdeck made for it (tui.core.clones); refused while it runs."""
    backup: str | None = None
    seed: str | None = None
    if hv.exists(name):
        info = hv.domain(name)
        if info.state.active:
            raise StateError(
                f"'{name}' is {info.state.value}; shut it down first "
                f"('virtdeck shutdown {name}' or 'virtdeck destroy {name}')"
            )
        disks = info.disks
        is_template = info.is_template
        defined = True
        seed = info.meta.seed
        if is_template and info.meta.xml_backup and os.path.isfile(info.meta.xml_backup):
            backup = info.meta.xml_backup
    else:
        found = [b for b in backup_templates(backup_dir, hv) if b.name == name]
        if not found:
            raise NotFoundError(f"no domain or template named '{name}' on {hv.uri}")
        disks = domxml.disks(found[0].root)
        is_template, defined, backup = True, False, str(found[0].path)
    return tuple(disks), is_template, defined, backup, seed


def _add_own_files(
    files: Any,
    graph: Any,
    images: list[str],
    memory: list[str],
    seed: str | None,
    delete: list[str],
    kept_why: list[tuple[str, str]],
) -> None:
    """What else goes with it: its snapshots' memory files and its seed; a disk that is a
    symbolic link: the link goes, never what it points to (which may be anywhere, outside
    every image directory)."""
    delete += [m for m in memory if m not in delete and files.lexists(m)]
    if seed and seed not in delete and files.lexists(seed):
        delete.append(seed)
    for p in images:
        target = files.link_target(p)
        if target is not None and graph.canonical(p) in delete:
            delete[delete.index(graph.canonical(p))] = p
            kept_why.append((target, f"what the symbolic link {p} points to: only the "
                                     "link is deleted"))  # fmt: skip


def _journal_definition(hv: Hypervisor, undo: ops.Undo, name: str, dom: Any) -> None:
    """Journal how to define the domain again, with its snapshots (parents first)."""
    try:
        tree = snapshot_tree(hv, name)
    except OperationError:
        tree = None  # a driver without snapshots
    if tree is not None:
        for node in reversed(tree.nodes):  # unwound newest first: parents are defined first
            xml = snapshot_xml(hv, name, node.name)
            undo.push(f"restore snapshot '{node.name}' of '{name}'", "redefine_snapshot",
                      domain=name, xml=xml, current=node.current)  # fmt: skip
    secure = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    undo.push(f"define '{name}' again", "define", xml=hv.call(dom.XMLDesc, secure, what=name))


def _snapshot_files(hv: Hypervisor, name: str) -> tuple[tuple[str, ...], list[str], list[str]]:
    """(snapshot names, the images and overlays its snapshots name, their memory files)."""
    try:
        tree = snapshot_tree(hv, name)
    except OperationError:
        return (), [], []  # a driver without snapshots
    roots = [p for node in tree.nodes for d in node.disks for p in (d.image, d.overlay) if p]
    memory = [node.memory_file for node in tree.nodes if node.memory_file]
    return tuple(sorted(tree.names)), list(dict.fromkeys(roots)), memory


def execute_remove(
    hv: Hypervisor,
    plan: RemovePlan,
    progress: Progress = no_progress,
    *,
    backup_dir: Path | None = None,
    others: Sequence[Hypervisor] = (),
) -> list[str]:
    """Undefine, then delete the files the plan lists (never a backing file another domain
    reads); returns the files it deleted. Checks the dependents again, under the lock of the
    image family (tui.core.bases) held to the last deletion: a clone made since the plan, or
    being made now, must not lose its base."""
    family = [*plan.images, *plan.delete_files, *plan.kept_files]
    title = f"removing '{plan.name}'"
    with bases.family_lock(hv, family):
        if plan.delete_files:
            shared = bases.ask_others(
                hv, plan.delete_files, bases.other_hosts(hv, others), domain=plan.name
            )
            what = f"'{plan.name}' cannot be removed with its files"
            bases.refuse_other_users(what, shared, force=plan.force)
            if shared.unasked:  # the audit log says what --force let through
                unasked = ", ".join(f"{uri} ({why})" for uri, why in shared.unasked)
                title += f" (--force, not asked: {unasked})"
        return _execute_remove(hv, plan, progress, backup_dir=backup_dir, title=title)


def _execute_remove(
    hv: Hypervisor, plan: RemovePlan, progress: Progress, *, backup_dir: Path | None, title: str
) -> list[str]:
    files = files_for(hv, "rm --storage") if plan.delete_files else None
    paths = list(dict.fromkeys(plan.images + plan.delete_files))
    if paths and (plan.storage or plan.is_template):
        users = storage_graph(hv, backup_dir).users(paths, exclude=plan.name)
        if users:
            names = sorted({str(u) for u in users})
            raise DependencyError(
                f"'{plan.name}' cannot be removed: {', '.join(names)} now "
                f"{'depends' if len(names) == 1 else 'depend'} on its image(s)"
            )
    with ops.running(hv, title, domains=[plan.name]) as undo:
        if plan.defined:
            progress(f"undefining '{plan.name}'", None)
            try:
                dom = hv.lookup(plan.name)
            except NotFoundError:
                raise NotFoundError(f"'{plan.name}' no longer exists") from None
            if hv.call(dom.isActive):
                raise StateError(f"'{plan.name}' was started meanwhile; shut it down first")
            _journal_definition(hv, undo, plan.name, dom)
            hv.undefine_all(dom, what=f"undefining '{plan.name}'")
            hv.invalidate()
        # From here on the removal goes forward: a file deleted cannot come back, so the rest
        # is finished (never half-kept), an interrupt arriving meanwhile included.
        undo.commit()
        deleted, failed = [], []
        with ops.signals_deferred():
            for path in plan.delete_files:
                assert files is not None
                progress(f"deleting {path}", None)
                try:
                    if files.delete(path):
                        deleted.append(path)
                        undo.steps.append(f"deleted {path}")  # (the audit record names it)
                except OperationError as err:
                    failed.append(str(err))
                    undo.steps.append(f"failed: deleting {path}")
            if plan.backup:
                remove_private(plan.backup)
        if failed:  # (inside the operation: its audit record says failed, and why)
            raise OperationError(f"'{plan.name}' was undefined, but {'; '.join(failed)}")
    progress(f"'{plan.name}' removed", 1.0)
    return deleted
