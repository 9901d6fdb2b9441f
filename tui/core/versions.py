"""Template versions: a template that evolves without changing the base its clones read.

`template update T` deploys an editable VM (`T-v2-edit`) as a thin clone of T's newest version
(tui.core.clones: an overlay on that version's read-only base, nothing else written). The
operator boots and changes it and shuts it down; `template seal T-v2-edit` then makes it a
template like any other (tui.core.templates: virt-sysprep, XML backup, its overlay made
read-only) named `T-vN`, recorded in virtdeck's metadata as version N of family T. Its own
layer holds only the clusters the edit changed; version N-1's base is never written (it is
read-only, and sealing writes only the overlay).

A version is a template domain: clones, `template copy`, `rm` and the dependency checks of
`rm --storage` (every domain of every host that builds on a file) see it as such. Hence a
version cannot be removed while a clone or a later version builds on it, and `template prune`
removes the versions nothing uses, the newest excepted (new clones are made from it).
`clone T` deploys T's newest version; `clone T --version N` (or `clone T-vN`) an older one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from tui.core import bases, clones, domxml, ops, templates
from tui.core.catalog import Template, list_templates, own_images, storage_graph
from tui.core.errors import InvalidInputError, NotFoundError, StateError
from tui.core.hypervisor import Hypervisor, validate_name
from tui.core.identity import Identity
from tui.core.progress import Progress, no_progress
from tui.core.storage import files_for
from tui.core.units import size


def family_of(t: Template) -> str:
    return t.family or t.name


def members(hv: Hypervisor, family: str, backup_dir: Path | None = None) -> list[Template]:
    """The versions of a template family, oldest first."""
    found = [t for t in list_templates(hv, backup_dir) if family_of(t) == family]
    return sorted(found, key=lambda t: t.version)


def _family_named(hv: Hypervisor, name: str, backup_dir: Path | None) -> list[Template]:
    every = list_templates(hv, backup_dir)
    mine = next((t for t in every if t.name == name), None)
    family = family_of(mine) if mine is not None else name
    return sorted((t for t in every if family_of(t) == family), key=lambda t: t.version)


def resolve(
    hv: Hypervisor, name: str, version: int | None = None, backup_dir: Path | None = None
) -> str:
    """The template a clone of `name` is made from: with `version`, that version of its
    family; a family's first template (or the family's name once that is removed) stands for
    its newest version; any other version for itself."""
    family = _family_named(hv, name, backup_dir)
    if not family:
        return name  # not a template: plan_clone says so
    if version is not None:
        for t in family:
            if t.version == version:
                return t.name
        have = ", ".join(f"v{t.version} ({t.name})" for t in family)
        raise NotFoundError(f"template '{name}' has no version {version}; it has {have}")
    named = next((t for t in family if t.name == name), None)
    if named is not None and named.family is not None:
        return name  # a version named explicitly
    return family[-1].name


def edit_name(family: Sequence[Template]) -> str:
    """`T-vN-edit` for the next version N of family T: its overlay file (named after it)
    becomes that version's layer, so each version's edit VM has a name of its own."""
    return f"{family_of(family[0])}-v{family[-1].version + 1}-edit"


def plan_update(
    hv: Hypervisor,
    template: str,
    *,
    name: str | None = None,
    directory: str | Path | None = None,
    backup_dir: Path | None = None,
) -> clones.ClonePlan:
    """The editable VM: a thin clone of the family's newest version, nothing customised (its
    hostname and identity are the template's: it becomes the next version, not a clone)."""
    family = _family_named(hv, template, backup_dir)
    if not family:
        raise NotFoundError(f"no template named '{template}' ('virtdeck template ls')")
    newest = family[-1]
    plan = clones.plan_clone(
        hv,
        newest.name,
        validate_name(name or edit_name(family)),
        directory=directory,
        allow_unsealed=True,
        backup_dir=backup_dir,
        identity=Identity(),
    )
    return dataclasses.replace(plan, edit_of=newest.version + 1)


def plan_seal(
    hv: Hypervisor,
    vm: str,
    *,
    seal: bool = True,
    operations: Sequence[str] | None = None,
    backup_dir: Path | None = None,
    force: bool = False,
    shutdown_timeout: float = 120.0,
    sysprep: templates.Sysprep | None = None,
) -> templates.TemplatePlan:
    """Seal an edit VM (a thin clone of a version, made by `template update`) into the next
    version of that template's family."""
    info = hv.domain(vm)
    if info.is_template:
        raise StateError(f"'{vm}' is already a template")
    source = info.meta.source if info.meta.role == "clone" else None
    every = list_templates(hv, backup_dir)
    parent = next((t for t in every if t.name == source), None)
    if parent is None or vm not in parent.thin_clones:
        raise InvalidInputError(
            f"'{vm}' is not a thin clone of a template ('virtdeck template update TEMPLATE' "
            "makes one to edit); make it a template of its own with 'virtdeck template create'"
        )
    family = family_of(parent)
    number = max(t.version for t in every if family_of(t) == family) + 1
    plan = templates.plan_template(
        hv,
        vm,
        name=f"{family}-v{number}",
        seal=seal,
        operations=operations,
        backup_dir=backup_dir,
        force=force,
        shutdown_timeout=shutdown_timeout,
        sysprep=sysprep,
    )
    # a version's clones get their identity the way the family's did (an imported cloud image)
    identity = plan.identity if plan.identity is not None else parent.identity
    return dataclasses.replace(plan, family=family, version=number, identity=identity)


# -- a flattened version ---------------------------------------------------------------------


@dataclass(frozen=True)
class Flatten:
    """One disk of an edit VM made standalone: its chain converted into `new_path`."""

    target: str
    path: str
    format: str | None
    new_path: str
    bytes_needed: int | None

    def line(self) -> str:
        return (
            f"flatten disk {self.target}: convert {self.path} and its chain into "
            f"{self.new_path} ({size(self.bytes_needed)}), then switch the disk to it and "
            f"delete {self.path} (the earlier versions are not needed by this one)"
        )


def plan_flatten(hv: Hypervisor, vm: str, family: str, number: int) -> tuple[Flatten, ...]:
    """What `--flatten` converts (the edit VM shut off, space checked); nothing is written."""
    info = hv.domain(vm)
    if info.state.active:
        raise StateError(f"'{vm}' is {info.state.value}; shut it down before --flatten")
    files = files_for(hv, "template seal --flatten")
    out = []
    for disk in own_images(info.disks):
        assert disk.path is not None
        new_path = os.path.join(
            os.path.dirname(disk.path), f"{family}-v{number}-{disk.target}.qcow2"
        )
        if files.lexists(new_path):
            raise InvalidInputError(f"{new_path} already exists; nothing was changed")
        need = files.measure(disk.path, disk.format or "qcow2")
        free = files.free_bytes(os.path.dirname(new_path))
        if need > free:
            raise InvalidInputError(
                f"--flatten needs {size(need)} in {os.path.dirname(new_path)}, "
                f"{size(free)} free; nothing was changed"
            )
        out.append(Flatten(disk.target, disk.path, disk.format, new_path, need))
    return tuple(out)


def execute_flatten(
    hv: Hypervisor, vm: str, steps: Sequence[Flatten], progress: Progress = no_progress
) -> None:
    """Convert, then switch the domain's disks (journalled: an interrupt removes the new files
    and keeps the old definition); the old overlays are deleted last, once the switch is
    final (a crash in between leaves one that `virtdeck reclaim` finds)."""
    files = files_for(hv, "template seal --flatten")
    progress = ops.cancellable(progress)
    paths = [s.path for s in steps]
    dirs = {os.path.dirname(s.new_path) for s in steps}
    with (
        bases.family_lock(hv, paths),
        ops.running(hv, f"flattening '{vm}'", domains=[vm], dirs=dirs) as undo,
    ):
        if hv.domain(vm).state.active:
            raise StateError(f"'{vm}' was started since the plan; nothing was changed")
        dom = hv.lookup(vm)
        secure = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        xml = hv.call(dom.XMLDesc, secure, what=vm)
        for s in steps:
            progress(f"flattening {s.path} into {s.new_path}", None)
            with undo.step(f"remove {s.new_path}", "delete_file", path=s.new_path):
                files.copy(s.path, s.new_path, src_fmt=s.format or "qcow2", dst_fmt="qcow2",
                           progress=progress, label="flattening")  # fmt: skip
        root = domxml.parse(xml)
        by_path = {s.path: s for s in steps}
        for disk in domxml.disk_elements(root):
            src = disk.find("source")
            step = by_path.get(src.get("file") or "") if src is not None else None
            if step is None or src is None:
                continue
            src.set("file", step.new_path)
            driver = disk.find("driver")
            if driver is not None:
                driver.set("type", "qcow2")
            for bs in disk.findall("backingStore"):
                disk.remove(bs)
        undo.push(f"restore the definition of '{vm}'", "define", xml=xml)
        hv.define(domxml.to_string(root), what=f"switching '{vm}' to its flattened disks")
        undo.commit()
    hv.invalidate()  # its disks changed: the cached facts name the old overlays
    for s in steps:
        progress(f"deleting {s.path}", None)
        files.delete(s.path)


# -- removing versions -----------------------------------------------------------------------


def version_name(
    hv: Hypervisor, template: str, version: int, backup_dir: Path | None = None
) -> str:
    family = _family_named(hv, template, backup_dir)
    for t in family:
        if t.version == version:
            return t.name
    if not family:
        raise NotFoundError(f"no template named '{template}' ('virtdeck template ls')")
    have = ", ".join(f"v{t.version} ({t.name})" for t in family)
    raise NotFoundError(f"template '{template}' has no version {version}; it has {have}")


@dataclass(frozen=True)
class PrunePlan(ops.DestructivePlanDefaults):
    host: str
    family: str
    remove: tuple[str, ...]  # newest first: a version goes before the one it builds on
    frees: tuple[int | None, ...]  # bytes of each one's own files (None: unknown)
    kept: tuple[tuple[str, str], ...]  # (version, why it stays)

    @property
    def title(self) -> str:
        return f"Prune the unused versions of '{self.family}'?"

    @property
    def confirm_label(self) -> str:
        return "Prune"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        done = execute_prune(hv, self, progress)
        return f"removed {len(done)} version(s) of '{self.family}'"

    def summary(self) -> list[str]:
        if not self.remove:
            lines = [f"nothing to prune: every version of '{self.family}' is in use"]
        else:
            lines = [
                f"remove {name} and its own files ({size(n)})"
                for name, n in zip(self.remove, self.frees, strict=True)
            ]
        lines += [f"keep {name}: {why}" for name, why in self.kept]
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "family": self.family,
            "remove": [
                {"name": n, "frees_bytes": b} for n, b in zip(self.remove, self.frees, strict=True)
            ],
            "kept": [{"name": n, "why": w} for n, w in self.kept],
        }


def plan_prune(hv: Hypervisor, template: str, backup_dir: Path | None = None) -> PrunePlan:
    """Every version but the newest that no domain (other than versions pruned with it)
    builds on or uses. A domain of another host reading a file refuses that version's removal
    when it is planned (tui.core.removal asks them)."""
    family = _family_named(hv, template, backup_dir)
    if not family:
        raise NotFoundError(f"no template named '{template}' ('virtdeck template ls')")
    graph = storage_graph(hv, backup_dir)
    users: dict[str, set[str]] = {}
    for t in family:
        images = [b.path for b in t.base_images]
        users[t.name] = {u.name for u in graph.users(images, exclude=t.name)}
    newest = family[-1].name
    gone: set[str] = set()
    for t in reversed(family[:-1]):
        if users[t.name] <= gone:
            gone.add(t.name)
    remove = tuple(t.name for t in reversed(family) if t.name in gone)
    frees = tuple(next(t for t in family if t.name == n).actual_bytes for n in remove)
    kept = [(newest, "the newest version (new clones are made from it)")]
    for t in family[:-1]:
        if t.name not in gone:
            who = sorted(users[t.name] - gone)
            kept.append((t.name, "used by " + ", ".join(who)))
    return PrunePlan(hv.uri, family_of(family[0]), remove, frees, tuple(kept))


def execute_prune(
    hv: Hypervisor,
    plan: PrunePlan,
    progress: Progress = no_progress,
    *,
    backup_dir: Path | None = None,
    others: Sequence[Hypervisor] = (),
) -> list[str]:
    """Remove each version with its files, newest first, each planned again now (a clone made
    since refuses it) and journalled by tui.core.removal; returns the removed versions."""
    done = []
    for name in plan.remove:
        progress(f"removing {name}", None)
        step = clones.plan_remove(hv, name, storage=True, backup_dir=backup_dir, others=others)
        clones.execute_remove(hv, step, progress, backup_dir=backup_dir, others=others)
        done.append(name)
    return done
