"""Space that can be reclaimed: overlays left in virtdeck's image directories that nothing
reads any more (a clone undefined by hand, a crash between a copy and its define), with the
bytes each frees; `virtdeck reclaim` deletes them through a plan.

virtdeck's image directories are those holding a template's base image. A file there counts
only when its backing chain reaches such a base (an overlay virtdeck would make): a plain
image nobody references may be an operator's file, and is left alone. A file is kept when
any domain or template backup of this host reads it (its disks or the chains of its
snapshots), when a domain of another host reads it (asked as `rm --storage` asks them), and
when a host that may see the same storage cannot be asked (unknown is kept, never guessed).
Directories are listed on this machine only: on a remote hypervisor the plan says so and
frees nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui.core import bases, ops
from tui.core.catalog import list_templates, storage_graph
from tui.core.errors import OperationError
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress, no_progress
from tui.core.removal import _snapshot_files, execute_remove, plan_remove
from tui.core.storage import files_for
from tui.core.units import size


@dataclass(frozen=True)
class Reclaimable:
    path: str  # the file; for a version, the template's name
    bytes: int | None  # what deleting it frees (None: unknown)
    why: str
    kind: str = "overlay"  # "overlay", "version" (tui.core.versions) or "backup" (an XML backup)
    template: str | None = None  # a version's or a backup's template

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "bytes": self.bytes, "why": self.why,
                "template": self.template}  # fmt: skip


@dataclass(frozen=True)
class ReclaimPlan(ops.DestructivePlanDefaults):
    host: str
    items: tuple[Reclaimable, ...]
    kept: tuple[tuple[str, str], ...] = ()  # (path, why it stays)
    notes: tuple[str, ...] = ()

    @property
    def frees_bytes(self) -> int | None:
        sizes = [i.bytes for i in self.items]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    @property
    def title(self) -> str:
        return "Reclaim space?"

    @property
    def confirm_label(self) -> str:
        return "Reclaim"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        done = execute_reclaim(hv, self, progress)
        return f"deleted {len(done)} file(s)"

    def summary(self) -> list[str]:
        lines = [
            f"remove template {i.path} with its own files ({size(i.bytes)}): {i.why}"
            if i.kind == "version"
            else f"delete {i.path} ({size(i.bytes)}): {i.why}"
            for i in self.items
        ]
        if not self.items:
            lines.append("nothing to reclaim")
        else:
            lines.append(f"frees {size(self.frees_bytes)} in all")
        lines += [f"keep {p}: {why}" for p, why in self.kept]
        return lines + list(self.notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "items": [i.to_json() for i in self.items],
            "frees_bytes": self.frees_bytes,
            "kept": [{"path": p, "why": w} for p, w in self.kept],
            "notes": list(self.notes),
        }


def _referenced(hv: Hypervisor, graph: Any) -> set[str]:
    """Every file a domain's disks, a template backup or a snapshot of this host reads."""
    out: set[str] = set()
    for oc in graph.chains:
        out.update(oc.chain.paths)
    for d in hv.domains():
        _, roots, memory = _snapshot_files(hv, d.name)
        for p in roots:
            out.update(graph.chain_paths(p))
            out.add(graph.canonical(p))
        out.update(graph.canonical(m) for m in memory)
    return out


def plan_reclaim(
    hv: Hypervisor,
    *,
    backup_dir: Path | None = None,
    others: Sequence[Hypervisor] = (),
) -> ReclaimPlan:
    """What can be deleted, checked now (and again under the lock when it runs)."""
    if not hv.local:
        return ReclaimPlan(
            hv.uri, (), notes=(f"{hv.uri}: image directories are listed on this machine only",)
        )
    files = files_for(hv, "reclaim")
    graph = storage_graph(hv, backup_dir)
    # A backup template's disk that is gone reads nothing (that backup is reclaimable); any
    # other chain that cannot be followed may hide a file in use: nothing is planned.
    gone = {
        b.path
        for t in list_templates(hv, backup_dir)
        if not t.defined
        for b in t.base_images
        if not files.lexists(b.path)
    }
    problems = [p for p in graph.problems if not any(p.startswith(f"{g}:") for g in gone)]
    if problems:
        raise OperationError(
            f"cannot tell which files on {hv.uri} are in use ({problems[0]}); nothing was changed"
        )
    base_paths = {
        graph.canonical(b.path) for t in list_templates(hv, backup_dir) for b in t.base_images
    }
    used = _referenced(hv, graph)
    found: list[Reclaimable] = []
    for directory in sorted({os.path.dirname(p) for p in base_paths}):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = graph.canonical(os.path.join(directory, name))
            if path in used or path in base_paths or not name.endswith(".qcow2"):
                continue
            if not os.path.isfile(path) or os.path.islink(os.path.join(directory, name)):
                continue
            chain = graph.chain(path, "qcow2")
            below = set(chain.paths[1:])
            if not chain.complete or not below & base_paths:
                continue  # not an overlay of a template's base: not known to be virtdeck's
            template = next(p for p in chain.paths[1:] if p in base_paths)
            found.append(
                Reclaimable(
                    path,
                    files.file_size(path),
                    f"an overlay on {template} that no domain, snapshot or backup reads",
                )
            )
    kept: list[tuple[str, str]] = []
    notes: list[str] = []
    if found:
        asked = bases.ask_others(hv, [i.path for i in found], bases.other_hosts(hv, others))
        if asked.users or asked.unasked:
            for i in found:
                kept.append((i.path, "another host reads it, or could not be asked"))
            notes += [f"read on another host: {u}" for u in asked.users]
            notes += asked.notes(force=False)
            found = []
    found += _unused(hv, files, backup_dir, kept)
    return ReclaimPlan(hv.uri, tuple(found), tuple(kept), tuple(notes))


def _unused(
    hv: Hypervisor, files: Any, backup_dir: Path | None, kept: list[tuple[str, str]]
) -> list[Reclaimable]:
    """Template versions nothing uses (as `template prune` finds them) and XML backups of
    templates whose images are all gone."""
    from tui.core import versions

    out: list[Reclaimable] = []
    every = list_templates(hv, backup_dir)
    families = sorted({versions.family_of(t) for t in every if t.family is not None})
    for family in families:
        prune = versions.plan_prune(hv, family, backup_dir)
        for name, freed in zip(prune.remove, prune.frees, strict=True):
            out.append(Reclaimable(name, freed, f"an unused version of '{family}'", "version",
                                   family))  # fmt: skip
    for t in every:
        if t.defined or not t.xml_backup or not t.base_images:
            continue
        if any(files.lexists(b.path) for b in t.base_images):
            continue
        out.append(Reclaimable(t.xml_backup, files.file_size(t.xml_backup),
                               f"the XML backup of template '{t.name}', whose images are gone",
                               "backup", t.name))  # fmt: skip
    return out


def execute_reclaim(
    hv: Hypervisor,
    plan: ReclaimPlan,
    progress: Progress = no_progress,
    *,
    backup_dir: Path | None = None,
    others: Sequence[Hypervisor] = (),
) -> list[str]:
    """Remove the plan's unused versions and backups (each planned again, as `rm` does);
    delete its overlays, each checked again under its image family's lock (a domain
    defined on it since the plan keeps it); returns the files deleted."""
    done: list[str] = []
    for item in plan.items:  # versions and backups: removed as 'rm' removes, planned again now
        if item.kind in ("version", "backup"):
            name = item.path if item.kind == "version" else item.template
            assert name is not None
            progress(f"removing template {name}", None)
            step = plan_remove(
                hv, name, storage=item.kind == "version", backup_dir=backup_dir, others=others
            )
            execute_remove(hv, step, progress, backup_dir=backup_dir, others=others)
            done.append(item.path)
    paths = [i.path for i in plan.items if i.kind == "overlay"]
    if not paths:
        return done
    files = files_for(hv, "reclaim")
    with (
        bases.family_lock(hv, paths),
        # The audit trail names what an operation acts on: here files no domain owns.
        ops.running(
            hv, "reclaiming space", domains=paths, dirs={os.path.dirname(p) for p in paths}
        ) as undo,
    ):
        graph = storage_graph(hv, backup_dir)
        used = _referenced(hv, graph)
        for path in paths:
            if graph.canonical(path) in used:
                progress(f"keeping {path}: something reads it now", None)
                continue
            ops.check_cancelled()
            progress(f"deleting {path}", None)
            if files.delete(path):
                done.append(path)
                undo.steps.append(f"deleted {path}")
        undo.commit()
    return done
