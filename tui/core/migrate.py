"""Move a domain to another hypervisor, keeping a thin clone thin: offline (shut off) or live.

Live (a running domain, `live=True`): planned as below, except that the top layer of each
disk, which the running domain writes, is not streamed: an empty overlay is made for it on
the target over the layer below (the target's base), and libvirt's live migration fills it
(tui.core.livemigrate: incremental storage copy, then memory, then the switchover); on
shared storage only the memory moves. Snapshots are refused (libvirt does not migrate a
running domain with snapshot metadata; internal ones would not be copied).

Plan (`plan_migrate`, nothing written except a missing template identity, which is a recorded
fact about a base and is said in the plan):
- the domain is shut off, not a template, has no managed save, no NVRAM or TPM state (not
  carried yet: refused), and every disk is an image file (or an empty drive);
- each disk's chain is split into the layers the domain owns (its overlay, external snapshot
  layers; internal snapshots live inside those qcow2 files) and the base of its template.
  A chain that goes below the domain's own layers into a file of no template is refused;
- the template is found on the target by identity (tui.core.baseid: the sha256 of each base
  layer, never by name or path): a target template whose identity is unknown is computed
  on demand (the plan says how many bytes it reads), a different one is refused. With none
  there, the plan copies the template first (tui.core.transfer's plan, its bytes counted);
- the target's directory (its pool), no name, UUID or file collision, and its free space for
  every byte that will be written; rebasing and `qemu-img check` there need the target to
  be this machine or reached over SSH (the streams themselves need neither).

Execute (`execute_migrate`), journalled on the target (and, from the source's undefine on, on
the source too):
1. the template copy, if planned (its own journalled operation: it stays if the migration
   fails later; it is a template like any other);
2. each own layer, lowest first, streamed sparse through libvirt's storage volumes (download
   from the source, upload to the target; holes stay holes), hashed as it passes, in windows
   of whole segments that the target reads back while the next travels
   (tui.core.storage.digest.SegmentReadback); the target file's size and sha256 are checked
   against what was sent, the file flushed to its disk; then rebased (`qemu-img rebase
   -u`, same data, only the backing path changes) onto the target's base (after an identity
   match only) or the layer below, and `qemu-img check`ed;
3. the domain defined on the target (same name, UUID and MACs), its snapshot metadata
   redefined parent first, the current snapshot marked;
4. the source re-checked (still shut off, its definition and its files unchanged since the
   plan); then it is undefined (with its snapshot metadata; `--keep-source`: renamed
   instead), both journals committed, and only then its own files deleted.

An interrupt before step 4 ends undoes everything on the target; between the source's
undefine and the commits, `recover` (or the unwinding) defines the source again with its
snapshots and removes the target's copy. Deleting the source's files after the commit is
the one step that can be left half-done: the plan's files are then named as left over.
"""

from __future__ import annotations

import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import libvirt

from tui.core import baseid, domxml, livemigrate, ops, transfer
from tui.core.cancel import Interrupted
from tui.core.catalog import backup_templates, own_images, template_xml
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskKind, DomainState
from tui.core.progress import Progress, no_progress
from tui.core.snapshots import common as _snapshot_kinds  # noqa: F401  (registers its kind)
from tui.core.storage import Resolver, files_for
from tui.core.storage.digest import SegmentReadback
from tui.core.storage.remote import RemoteFiles

LIVE_HINT = "migrate it running with --live, or shut it down first"


@dataclass(frozen=True)
class Layer:
    """One layer the domain owns, streamed to the target as it is."""

    disk: str
    source: str
    target: str
    format: str
    file_bytes: int
    allocated_bytes: int
    backing: str | None  # its backing path on the target
    backing_format: str | None
    rebase: bool  # the backing path changes: qemu-img rebase -u on the target

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LiveTop:
    """The layer a running domain writes: created empty on the target (over the layer below
    it there) and filled by libvirt's incremental storage copy (QEMU's shallow mirror)."""

    disk: str
    source: str
    target: str
    format: str
    capacity: int
    allocated_bytes: int
    backing: str | None
    backing_format: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SnapshotMeta:
    name: str
    parent: str | None
    current: bool
    xml: str  # as the source has it (redefined there by an undo)
    target_xml: str  # its disks renamed to the target's paths


@dataclass(frozen=True)
class MigratePlan(ops.PlanDefaults):
    source_host: str
    target_host: str
    domain: str
    uuid: str
    directory: str
    pool: str | None
    template: str | None  # the source's template (None: the domain stands alone)
    target_template: str | None  # the template on the target with the same identity
    template_copy: transfer.TemplateCopyPlan | None
    layers: tuple[Layer, ...]  # lowest first, per disk
    xml: str  # the definition on the target
    source_xml: str  # the source's definition (what an undo defines again)
    source_digest: str  # tui.core.ops.xml_digest of it when planned
    snapshots: tuple[SnapshotMeta, ...]  # parents first
    keep_source: str | None  # the source's new name when it is kept
    bytes_needed: int
    bytes_free: int | None
    notes: tuple[str, ...] = ()
    disks: tuple[tuple[str, str, str], ...] = field(default=())  # (target, top on target, fmt)
    shared: str | None = None  # how it is proved that both hosts see the same files
    shared_files: tuple[str, ...] = ()  # the domain's own files there (kept, not copied)
    live: bool = False  # a running domain, moved by libvirt's live migration
    tops: tuple[LiveTop, ...] = ()  # live: the layers the running domain writes
    paths: tuple[tuple[str, str], ...] = ()  # live: source path -> target path of its files
    max_downtime: int | None = None  # live: milliseconds the domain may be paused at the end
    bandwidth: int | None = None  # live: MiB/s
    nvram: tuple[str, str, int] | None = None  # UEFI variables: source, target path, bytes

    @property
    def host(self) -> str:
        return self.target_host

    @property
    def title(self) -> str:
        return f"Migrate '{self.domain}' to {self.target_host}?"

    @property
    def confirm_label(self) -> str:
        return "Migrate"

    @property
    def bytes_sent(self) -> int:
        """Data that crosses for the domain's own layers (holes do not; live: the storage
        copy's estimate, without the memory, which the domain keeps changing)."""
        return sum(v.allocated_bytes for v in self.layers) + sum(
            t.allocated_bytes for t in self.tops
        )

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        source = Hypervisor.open(self.source_host)
        try:
            done = execute_migrate(source, hv, self, progress)
        finally:
            source.close()
        return f"migrated '{self.domain}' to {self.target_host}" + (
            f" live ({done})" if self.live else ""
        )

    def summary(self) -> list[str]:
        if self.live:
            return self._live_summary()
        lines = [
            f"migrate '{self.domain}' (shut off) from {self.source_host} to {self.target_host}"
        ]
        if self.shared:
            return lines + [
                f"both hosts see the same image files (shared storage: {self.shared}): "
                "nothing is copied and no file is deleted",
                f"define '{self.domain}' there as it is (same UUID {self.uuid}, same MAC "
                f"addresses, same disks: {', '.join(self.shared_files)})"
                + (f" with its {len(self.snapshots)} snapshot(s)" if self.snapshots else ""),
                f"then undefine it on {self.source_host} (its files stay: {self.target_host} "
                "reads them)",
                *self.notes,
            ]
        lines.extend(self._template_lines())
        for v in self.layers:
            lines.append(
                f"  stream {v.source} -> {v.target} ({v.format}, {_mib(v.allocated_bytes)} of "
                "data; sparse stream, sha256 checked on both sides)"
            )
            if v.rebase:
                lines.append(f"  rebase {v.target} onto {v.backing} (same data, new path)")
        lines.extend(self._nvram_lines())
        lines.append("check each layer there with qemu-img check")
        lines.append(
            f"define '{self.domain}' there (same UUID {self.uuid}, same MAC addresses)"
            + (
                f" with its {len(self.snapshots)} snapshot(s) redefined"
                + (
                    f", current '{next(s.name for s in self.snapshots if s.current)}'"
                    if any(s.current for s in self.snapshots)
                    else ""
                )
                if self.snapshots
                else ""
            )
        )
        if self.keep_source:
            lines.append(
                f"then rename the source to '{self.keep_source}' and keep it, stopped, with its "
                "files"
            )
        else:
            lines.append(
                "then undefine it on the source and delete its own files there: "
                + ", ".join(v.source for v in self.layers)
            )
        lines.append(
            f"data sent: {_mib(self.bytes_sent)} for the domain"
            + (
                f" + {_mib(self.template_copy.bytes_needed)} for the template"
                if self.template_copy
                else ""
            )
        )
        lines.append(
            f"space needed in {self.directory}: {_mib(self.bytes_needed)}"
            + (f" of {_mib(self.bytes_free)} free" if self.bytes_free is not None else "")
        )
        lines.extend(self.notes)
        return lines

    def _template_lines(self) -> list[str]:
        if self.template_copy is not None:
            return [
                f"{self.target_host} has no template with the identity of '{self.template}': "
                f"copy the template there first ({_mib(self.template_copy.bytes_needed)} of base)",
                *("  " + line for line in self.template_copy.summary()),
            ]
        if self.target_template is not None:
            return [
                f"its base is already on {self.target_host}: template '{self.target_template}' "
                "has the same identity (sha256 of each layer); the base is not sent"
            ]
        return []

    def _nvram_lines(self) -> list[str]:
        if self.nvram is None:
            return []
        src, dest, size = self.nvram
        return [f"  copy its UEFI variables {src} -> {dest} ({size} bytes)"]

    def _live_summary(self) -> list[str]:
        limits = [f"at most {self.max_downtime} ms paused"] if self.max_downtime else []
        limits += [f"at most {self.bandwidth} MiB/s"] if self.bandwidth else []
        lines = [
            f"migrate '{self.domain}' live from {self.source_host} to {self.target_host}: it "
            "keeps running and pauses only for the switchover at the end"
            + (f" ({', '.join(limits)})" if limits else "")
        ]
        if self.shared:
            lines.append(
                f"both hosts see the same image files (shared storage: {self.shared}): only "
                "its memory moves; no file is copied or deleted"
            )
        lines.extend(self._template_lines())
        for v in self.layers:
            lines.append(
                f"  stream {v.source} -> {v.target} ({_mib(v.allocated_bytes)}; it is not "
                "written while the domain runs; sha256 checked on both sides)"
            )
        for t in self.tops:
            lines.append(
                f"  create {t.target} there over {t.backing or 'nothing (a standalone disk)'}; "
                f"libvirt copies into it the {_mib(t.allocated_bytes)} the domain wrote in "
                f"{t.source}, and what it writes meanwhile"
            )
        lines.extend(self._nvram_lines())
        lines.append(
            f"then its memory; the domain runs on {self.target_host}, defined there (same "
            f"UUID {self.uuid}, same MAC addresses); the downtime is reported"
        )
        if self.keep_source:
            lines.append(f"the source is kept, stopped, as '{self.keep_source}', with its files")
        elif not self.shared:
            lines.append(
                "then it is undefined on the source and its own files deleted there: "
                + ", ".join([v.source for v in self.layers] + [t.source for t in self.tops])
            )
        else:
            lines.append(f"then it is undefined on {self.source_host} (its files stay)")
        lines.append(
            "an interrupt or a failure before the switchover leaves it running on the source "
            "and nothing on the target"
        )
        if not self.shared:
            lines.append(
                f"data sent: {_mib(self.bytes_sent)} of disk (and what it writes meanwhile) "
                "+ its memory"
                + (
                    f" + {_mib(self.template_copy.bytes_needed)} for the template"
                    if self.template_copy
                    else ""
                )  # fmt: skip
            )
            lines.append(
                f"space needed in {self.directory}: {_mib(self.bytes_needed)}"
                + (f" of {_mib(self.bytes_free)} free" if self.bytes_free is not None else "")
            )
        lines.extend(self.notes)
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "tops": [t.to_json() for t in self.tops],
            "max_downtime": self.max_downtime,
            "bandwidth": self.bandwidth,
            "source_host": self.source_host,
            "target_host": self.target_host,
            "domain": self.domain,
            "uuid": self.uuid,
            "directory": self.directory,
            "pool": self.pool,
            "template": self.template,
            "target_template": self.target_template,
            "template_copy": None if self.template_copy is None else self.template_copy.to_json(),
            "layers": [v.to_json() for v in self.layers],
            "snapshots": [
                {"name": s.name, "parent": s.parent, "current": s.current} for s in self.snapshots
            ],
            "keep_source": self.keep_source,
            "bytes_sent": self.bytes_sent,
            "bytes_needed": self.bytes_needed,
            "bytes_free": self.bytes_free,
            "notes": list(self.notes),
            "shared_storage": self.shared,
        }


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 1024**2:.1f} MiB"


# -- planning -------------------------------------------------------------------------------


def _template_bases(hv: Hypervisor) -> dict[str, tuple[str, str]]:
    """Base path -> (template, disk target) of every template of `hv` (defined or backed up)."""
    out: dict[str, tuple[str, str]] = {}
    defined = set()
    for d in hv.domains():
        if d.is_template:
            defined.add(d.name)
            for disk in own_images(d.disks):
                assert disk.path is not None
                out[disk.path] = (d.name, disk.target)
    for b in backup_templates(None, hv):
        if b.name not in defined:
            for disk in own_images(domxml.disks(b.root)):
                assert disk.path is not None
                out.setdefault(disk.path, (b.name, disk.target))
    return out


def _snapshots(hv: Hypervisor, name: str) -> list[tuple[str, str | None, bool, str]]:
    """(name, parent, current, secure XML) of each snapshot, parents first."""
    dom = hv.lookup(name)
    found = []
    for snap in hv.call(dom.listAllSnapshots, 0, what=f"listing snapshots of '{name}'"):
        xml = hv.call(snap.getXMLDesc, libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE, what=name)
        current = bool(hv.call(snap.isCurrent, 0, what=name))
        root = ET.fromstring(xml)
        found.append((root.findtext("name") or "", root.findtext("parent/name"), current, xml))
    ordered: list[tuple[str, str | None, bool, str]] = []
    done: set[str | None] = {None}
    while len(ordered) < len(found):
        ready = [s for s in found if s not in ordered and s[1] in done]
        if not ready:  # a parent that is not listed: keep the rest in their order
            ready = [s for s in found if s not in ordered]
        for s in ready:
            ordered.append(s)
            done.add(s[0])
    return ordered


def _rename_snapshot_disks(xml: str, paths: dict[str, str]) -> tuple[str, list[str]]:
    """The snapshot XML with its files renamed to the target's; the files it names that are
    not among the migrated layers (a memory state file, a layer off the chain)."""
    root = ET.fromstring(xml)
    foreign = []
    memory = root.find("memory")
    if memory is not None and memory.get("file"):
        foreign.append(memory.get("file") or "")
    for src in root.findall("disks/disk/source"):
        path = src.get("file")
        if path:
            if path in paths:
                src.set("file", paths[path])
            else:
                foreign.append(path)
    dom = root.find("domain")
    if dom is not None:
        _rename_disks(dom, paths)
    return ET.tostring(root, encoding="unicode"), foreign


def _rename_disks(dom: ET.Element, paths: dict[str, str]) -> None:
    for disk in dom.findall("devices/disk"):
        src = disk.find("source")
        if src is not None and src.get("file") in paths:
            src.set("file", paths[src.get("file") or ""])
            for backing in disk.findall("backingStore"):
                disk.remove(backing)


def plan_migrate(
    source: Hypervisor,
    target: Hypervisor,
    name: str,
    *,
    directory: str | None = None,
    keep_source: bool = False,
    live: bool | None = False,
    max_downtime: int | None = None,
    bandwidth: int | None = None,
    progress: Progress = no_progress,
    record: bool = True,
) -> MigratePlan:
    """Check everything on both hosts. The only write: a template identity computed now is
    recorded in its metadata (with `record`; a dry run computes it again next time). `live`:
    True moves a running domain, False a shut-off one, None as its state asks (a drain)."""
    _check_request(source, target, name, directory)
    info, live, xml, root, seed = _check_domain(source, target, name, live, max_downtime, bandwidth)
    nvram_src = (root.findtext("os/nvram") or "").strip() or None
    if nvram_src is None and root.find("os/nvram") is not None:
        raise InvalidInputError(
            f"'{name}' keeps UEFI variables that are not a file virtdeck can copy (its <nvram> "
            "names no path: a network or volume source): not migrated; nothing was changed"
        )
    dst_files = RemoteFiles(target, "migrate")
    notes: list[str] = []
    owned, every_file, template = _owned_layers(source, root, name)
    # Existence on the target is asked where it can be answered (this machine, or SSH): a
    # directory in no storage pool is not "empty" to virtdeck.
    dst_check = files_for(target, "migrate", define_pools=False)
    src_check = files_for(source, "migrate", define_pools=False)
    seed_path = seed.path if seed is not None else None
    proof = _shared_proof(
        source, target, src_check, dst_check, every_file + ([seed_path] if seed_path else [])
    )
    if proof is not None:
        if nvram_src:
            raise InvalidInputError(
                f"'{name}' keeps UEFI variables in {nvram_src}: carrying them between hosts on "
                "shared storage is not built yet; nothing was changed"
            )
        shared = _plan_shared(source, target, info.uuid, name, xml, owned, proof,
                              keep_source=keep_source, seed=seed_path)  # fmt: skip
        return replace(shared, live=live, max_downtime=max_downtime if live else None,
                       bandwidth=bandwidth if live else None)  # fmt: skip
    where, pool = transfer._pool_dir(dst_files, directory)
    nvram = _plan_nvram(source, src_check, dst_check, name, nvram_src, where)
    target_template, copy_plan, target_bases = _match_template(
        source, target, name, template, owned, where, notes, progress, record
    )
    layers, tops, paths, disks_out = _place_layers(
        source, target, owned, target_bases, copy_plan, where, live, seed, dst_check
    )
    snaps = _snapshot_metas(source, name, paths)
    target_xml = _target_xml(xml, paths, nvram, seed_path, template, target_template)
    needed = sum(v.allocated_bytes for v in layers) + sum(t.allocated_bytes for t in tops)
    needed += (nvram[2] if nvram else 0) + (copy_plan.bytes_needed if copy_plan else 0)
    free = _space(target, dst_files, where, pool, needed, copy_plan is None, notes)
    kept = _kept_name(source, name) if keep_source else None
    return MigratePlan(
        source_host=source.uri, target_host=target.uri, domain=name, uuid=info.uuid,
        directory=where, pool=pool, template=template, target_template=target_template,
        template_copy=copy_plan, layers=tuple(layers), xml=target_xml, source_xml=xml,
        source_digest=ops.xml_digest(xml), snapshots=tuple(snaps), keep_source=kept,
        bytes_needed=needed, bytes_free=free, notes=tuple(notes), disks=tuple(disks_out),
        live=live, tops=tuple(tops), paths=tuple(paths.items()),
        max_downtime=max_downtime if live else None, bandwidth=bandwidth if live else None,
        nvram=nvram,
    )  # fmt: skip


def _check_request(
    source: Hypervisor, target: Hypervisor, name: str, directory: str | None
) -> None:
    if source.uri == target.uri:
        raise InvalidInputError(f"'{name}' is already on {target.uri}: choose another --to")
    if directory is not None and not directory.startswith("/"):
        raise InvalidInputError(f"--dir '{directory}' is not an absolute path on {target.uri}")


def _kept_name(source: Hypervisor, name: str) -> str:
    kept = f"{name}-migrated"
    if source.exists(kept):
        raise InvalidInputError(f"'{kept}' already exists on {source.uri}: cannot keep a copy")
    return kept


def _space(
    target: Hypervisor,
    dst_files: RemoteFiles,
    where: str,
    pool: str | None,
    needed: int,
    no_copy: bool,
    notes: list[str],
) -> int | None:
    """The target's free space where the files land (None: not known), refused when it is
    short; what the pool notes say is added to `notes`."""
    free = dst_files.free_bytes(where) if pool is not None or dst_files.ssh else None
    if free is not None and needed > free:
        raise InvalidInputError(
            f"not enough space in {where} on {target.uri}: {_mib(needed)} needed, {_mib(free)} free"
        )
    if pool is None and no_copy:
        notes.extend(dst_files.pool_notes([where + "/x"]))
    estimate = dst_files.free_note(where) if free is not None else None
    if estimate:
        notes.append(estimate)
    return free


def _check_domain(
    source: Hypervisor,
    target: Hypervisor,
    name: str,
    live: bool | None,
    max_downtime: int | None,
    bandwidth: int | None,
) -> tuple[Any, bool, str, ET.Element, Any]:
    """The domain can move (state, disks, saved state, snapshots when live, no collision on
    the target): (its info, live or not, its inactive XML, parsed, its cloud-init seed)."""
    info = source.domain(name)
    if info.is_template:
        raise InvalidInputError(
            f"'{name}' is a template: copy it with 'virtdeck template copy {name} --to ...'"
        )
    live = _live_wanted(source, info, live, max_downtime, bandwidth)
    dom = source.lookup(name)
    if live:
        count = source.call(dom.snapshotNum, 0, what=f"counting the snapshots of '{name}'")
        if count:
            raise InvalidInputError(
                f"'{name}' has {count} snapshot(s): a running domain moves without them "
                "(libvirt refuses it, and the storage copy does not carry internal snapshots): "
                "shut it down and migrate it offline"
            )
    elif source.call(dom.hasManagedSaveImage, 0, what=name):
        raise StateError(
            f"'{name}' has a saved state on {source.uri}: start it or discard the save first"
        )
    xml = source.call(
        dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE, what=name
    )
    root = domxml.parse(xml)
    if root.find("devices/tpm/backend[@type='emulator']") is not None:
        raise InvalidInputError(
            f"'{name}' has an emulated TPM: carrying its state is not built yet; "
            "nothing was changed"
        )
    # Its cloud-init seed (tui.core.clones) is virtdeck's own file: it moves with the domain.
    seed = next((d for d in domxml.disks(root) if d.kind == DiskKind.FILE and d.device == "cdrom"
                 and d.path and d.path == info.meta.seed), None)  # fmt: skip
    for d in domxml.disks(root):
        if d.is_image or d.kind == DiskKind.EMPTY or d == seed:
            continue
        raise InvalidInputError(
            f"disk {d.target} of '{name}' is {d.source or d.kind.value} ({d.kind.value}"
            f"{', read-only' if d.readonly else ''}{', shareable' if d.shareable else ''}): "
            "migrate moves image files only (eject or detach it first)"
        )
    if target.exists(name):
        raise InvalidInputError(f"a domain named '{name}' already exists on {target.uri}")
    try:
        other = target.call(target.conn.lookupByUUIDString, info.uuid)
        raise InvalidInputError(
            f"a domain with the UUID of '{name}' ({info.uuid}) already exists on {target.uri}: "
            f"'{target.call(other.name)}'"
        )
    except NotFoundError:
        pass
    if not (target.local or RemoteFiles(target, "migrate").ssh is not None):
        raise InvalidInputError(
            f"migrate checks each layer on {target.uri} with qemu-img and rebases it there: "
            "that needs the target to be this machine or a qemu+ssh:// URI"
        )
    return info, live, xml, root, seed


def _owned_layers(
    source: Hypervisor, root: ET.Element, name: str
) -> tuple[list[tuple[str, list[Any], str | None]], list[str], str | None]:
    """Each disk's layers the domain owns (top first) and the template base below them;
    every file of every chain (for the shared-storage proof); the template."""
    resolver = Resolver(source, ssh=True)
    bases = _template_bases(source)

    # Each disk: the layers it owns (top first) and the template base below them.
    owned: list[tuple[str, list[Any], str | None]] = []  # (disk, links top first, base path)
    every_file: list[str] = []  # every file of every chain, for the shared-storage proof
    template: str | None = None
    for disk in own_images(domxml.disks(root)):
        assert disk.path is not None
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target} of '{name}': {chain.problem}")
        every_file.extend(chain.paths)
        links: list[Any] = []
        base: str | None = None
        for img in chain.links:
            if img.path in bases:
                base = img.path
                break
            links.append(img)
        if base is None and links[-1].backing:
            raise InvalidInputError(
                f"disk {disk.target} of '{name}' builds on {links[-1].backing}, which is no "
                "template's base virtdeck knows: not migrated (its data would be left behind)"
            )
        if base is not None:
            t = bases[base][0]
            if template is not None and t != template:
                raise InvalidInputError(
                    f"'{name}' has disks on two templates ('{template}', '{t}'): not migrated"
                )
            template = t
        if base is not None and not links:
            raise InvalidInputError(f"disk {disk.target} of '{name}' is a template's base itself")
        owned.append((disk.target, links, base))
    return owned, every_file, template


def _match_template(
    source: Hypervisor,
    target: Hypervisor,
    name: str,
    template: str | None,
    owned: list[tuple[str, list[Any], str | None]],
    where: str,
    notes: list[str],
    progress: Progress,
    record: bool,
) -> tuple[str | None, transfer.TemplateCopyPlan | None, dict[str, tuple[str, str]]]:
    """The template on the target with the same identity (never by name or path), else the
    plan to copy it there first; the target's base for each source base."""
    target_template: str | None = None
    copy_plan: transfer.TemplateCopyPlan | None = None
    target_bases: dict[str, tuple[str, str]] = {}  # source base path -> (target path, format)
    if template is not None:
        t_xml, t_defined = template_xml(source, template)
        identity = baseid.of_xml(t_xml)
        if identity is None:
            cost = baseid.cost(source, t_xml)
            progress(f"computing the identity of '{template}' ({_mib(cost)} to read)", None)
            identity = baseid.compute(source, t_xml, progress)
            if t_defined and record:
                baseid.record(source, template, identity)
            notes.append(
                f"the identity of '{template}' was not recorded: computed now on "
                f"{source.uri} (read {_mib(cost)}{', recorded' if t_defined and record else ''})"
            )
        t_disks = {
            d.path: d.target for d in own_images(domxml.disks(domxml.parse(t_xml))) if d.path
        }
        wanted = {  # source base path -> its layers' digests
            base: baseid.disk_layers(identity, t_disks.get(base, "")) or ()
            for _t, _l, base in owned
            if base is not None
        }
        if not all(wanted.values()):
            raise InvalidInputError(
                f"the identity of '{template}' does not cover every disk: not migrated"
            )
        candidates = [d for d in target.domains() if d.is_template]
        for cand in sorted(candidates, key=lambda d: (d.name != template, d.name)):
            ident = cand.meta.base_identity
            if ident is None and cand.name == template:
                c_xml = target.xml(cand.name, inactive=True)
                cost = baseid.cost(target, c_xml)
                ident, _ = baseid.ensure(target, cand.name, progress, keep=record)
                notes.append(
                    f"the identity of '{cand.name}' on {target.uri} was not recorded: computed "
                    f"now (read {_mib(cost)} there{', recorded' if record else ''})"
                )
            if ident is None:
                continue
            c_paths = {
                d.target: (d.path, d.format or "raw") for d in own_images(cand.disks) if d.path
            }
            found: dict[str, tuple[str, str]] = {}
            for base, digests in wanted.items():
                disk_t = baseid.find_base(ident, digests)
                if disk_t is not None and disk_t in c_paths:
                    found[base] = c_paths[disk_t]
            if len(found) == len(wanted):
                target_template, target_bases = cand.name, found
                break
            if cand.name == template:
                raise InvalidInputError(
                    f"{target.uri} has a template named '{template}' whose base is different "
                    f"(its identity differs): '{name}' is never rebased onto it; not migrated"
                )
        if target_template is None:
            copy_plan = transfer.plan_template_copy(source, target, template, directory=where)
            by_source = {v.source: v for v in copy_plan.volumes}
            for base in wanted:
                v = by_source[base]
                target_bases[base] = (v.target, v.format)
    return target_template, copy_plan, target_bases


def _place_layers(
    source: Hypervisor,
    target: Hypervisor,
    owned: list[tuple[str, list[Any], str | None]],
    target_bases: dict[str, tuple[str, str]],
    copy_plan: transfer.TemplateCopyPlan | None,
    where: str,
    live: bool,
    seed: Any,
    dst_check: Any,
) -> tuple[list[Layer], list[LiveTop], dict[str, str], list[tuple[str, str, str]]]:
    """The layers, lowest first, and their places on the target (live: the top of each disk,
    which the running domain writes, is created there and filled by the storage copy)."""
    src_files = RemoteFiles(source, "migrate")
    dst_files = RemoteFiles(target, "migrate")
    seed_path = seed.path if seed is not None else None
    layers: list[Layer] = []
    tops: list[LiveTop] = []
    paths: dict[str, str] = {}
    disks_out: list[tuple[str, str, str]] = []
    taken = {v.target for v in copy_plan.volumes} if copy_plan else set()
    for disk_t, links, base in owned:
        below, below_fmt = target_bases[base] if base is not None else (None, None)
        for img in reversed(links):
            dest = posixpath.join(where, posixpath.basename(img.path))
            if dest in taken:
                raise InvalidInputError(
                    f"two layers would be {dest} on {target.uri}: migrate it with another --dir"
                )
            if dst_check.lexists(dest) or dst_files.lexists(dest):
                raise InvalidInputError(
                    f"{dest} already exists on {target.uri}; virtdeck never overwrites a file "
                    "(choose another --dir)"
                )
            taken.add(dest)
            vol = src_files._volume(img.path) or transfer._source_volume(src_files, img.path)
            cap, length, allocation = transfer._physical(source, vol)
            if live and img is links[0]:
                tops.append(LiveTop(disk_t, img.path, dest, img.format or "raw", cap,
                                    allocation, below, below_fmt))  # fmt: skip
            else:
                layers.append(Layer(
                    disk=disk_t, source=img.path, target=dest, format=img.format or "raw",
                    file_bytes=length, allocated_bytes=allocation, backing=below,
                    backing_format=below_fmt, rebase=below is not None and img.backing != below,
                ))  # fmt: skip
            paths[img.path] = dest
            below, below_fmt = dest, img.format or "raw"
        disks_out.append((disk_t, paths[links[0].path], links[0].format or "raw"))
    if seed is not None and seed_path is not None:  # streamed as it is, a raw file
        dest = posixpath.join(where, posixpath.basename(seed_path))
        if dest in taken or dst_check.lexists(dest) or dst_files.lexists(dest):
            raise InvalidInputError(
                f"{dest} already exists on {target.uri}; virtdeck never overwrites a file "
                "(choose another --dir)"
            )
        vol = src_files._volume(seed_path) or transfer._source_volume(src_files, seed_path)
        _cap, length, allocation = transfer._physical(source, vol)
        layers.append(Layer(disk=seed.target, source=seed_path, target=dest, format="raw",
                            file_bytes=length, allocated_bytes=allocation, backing=None,
                            backing_format=None, rebase=False))  # fmt: skip
        paths[seed_path] = dest
    return layers, tops, paths, disks_out


def _snapshot_metas(source: Hypervisor, name: str, paths: dict[str, str]) -> list[SnapshotMeta]:
    """Each snapshot, parents first, its files renamed to the target's."""
    snaps = []
    for s_name, parent, current, s_xml in _snapshots(source, name):
        t_xml_s, foreign = _rename_snapshot_disks(s_xml, paths)
        if foreign:
            raise InvalidInputError(
                f"snapshot '{s_name}' of '{name}' keeps {', '.join(foreign)}, outside the disk "
                "chains migrate moves: not migrated (delete that snapshot first)"
            )
        snaps.append(SnapshotMeta(s_name, parent, current, s_xml, t_xml_s))
    return snaps


def _target_xml(
    xml: str,
    paths: dict[str, str],
    nvram: tuple[str, str, int] | None,
    seed_path: str | None,
    template: str | None,
    target_template: str | None,
) -> str:
    """The definition on the target: its files where they land, its metadata naming the
    seed and the target's template."""
    out_root = domxml.parse(xml)
    _rename_disks(out_root, paths)
    _rename_nvram(out_root, nvram)
    if seed_path is not None:  # the metadata names the seed where it now is
        domxml.write_meta(out_root, replace(domxml.read_meta(out_root), seed=paths[seed_path]))
    if template is not None and target_template is not None and target_template != template:
        meta = domxml.read_meta(out_root)
        if meta.role == "clone":
            domxml.write_meta(out_root, replace(meta, source=target_template))
    return domxml.to_string(out_root)


def _plan_nvram(
    source: Hypervisor, src_check: Any, dst_check: Any, name: str, path: str | None, where: str
) -> tuple[str, str, int] | None:
    """(source path, target path, bytes) of the domain's UEFI variables, carried as a small
    file next to its disks on the target (read and written where virtdeck can: this machine
    or over SSH); None without NVRAM."""
    if path is None:
        return None
    if isinstance(src_check, RemoteFiles) and src_check.ssh is None:
        raise InvalidInputError(
            f"'{name}' keeps UEFI variables in {path} on {source.uri}: reading them needs that "
            "host to be this machine or a qemu+ssh:// URI; nothing was changed"
        )
    size = src_check.file_size(path)
    if size is None:
        raise InvalidInputError(
            f"the UEFI variables of '{name}' ({path}) cannot be read on {source.uri}: "
            "not migrated (start it once, or check the file)"
        )
    dest = posixpath.join(where, f"{name}_VARS.fd")
    if dst_check.lexists(dest):
        raise InvalidInputError(
            f"{dest} already exists on the target; virtdeck never overwrites a file "
            "(choose another --dir)"
        )
    return path, dest, size


def _rename_nvram(root: ET.Element, nvram: tuple[str, str, int] | None) -> None:
    if nvram is not None:
        element = root.find("os/nvram")
        if element is not None:
            element.text = nvram[1]


def _live_wanted(
    source: Hypervisor,
    info: Any,
    live: bool | None,
    max_downtime: int | None,
    bandwidth: int | None,
) -> bool:
    """Whether the domain moves live (running) or offline (shut off); refusals say why."""
    name = info.name
    running = info.state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.BLOCKED)
    auto = live is None
    if live is None:
        live = running
    if live and not running:
        raise StateError(
            f"'{name}' is {info.state.value} on {source.uri}: --live moves a running domain; "
            "migrate it without --live"
        )
    if not live and info.state != DomainState.SHUTOFF:
        raise StateError(f"'{name}' is {info.state.value} on {source.uri}: {LIVE_HINT}")
    if not live and not auto and (max_downtime is not None or bandwidth is not None):
        raise InvalidInputError("--max-downtime and --bandwidth apply to a live migration (--live)")
    for value, what in ((max_downtime, "--max-downtime"), (bandwidth, "--bandwidth")):
        if value is not None and value <= 0:
            raise InvalidInputError(f"{what} {value}: give a positive number")
    return live


def _shared_proof(
    source: Hypervisor, target: Hypervisor, src: Any, dst: Any, paths: Sequence[str]
) -> str | None:
    """How it is proved that the target sees every one of `paths` as the very file the
    source has (shared storage), or None. The target's libvirt must hold each file as a
    volume of one of its storage pools (it can use it, not only see it), and: both hosts on
    this machine (the same path is the same file), or each file's inode and change time,
    read on both hosts over SSH, agree. Anything less is no proof: the migration then
    copies, which is safe on shared storage too (it never writes over a file it sees)."""
    if not paths:
        return None
    pools = RemoteFiles(target, "migrate", define_pools=False)
    if any(pools._volume(p) is None for p in paths):
        return None
    if source.local and target.local:
        return "both daemons run on this machine and hold the files in their pools"
    for path in paths:
        mine, theirs = src.identity(path), dst.identity(path)
        if not mine or not theirs or "ino" not in mine or "ino" not in theirs:
            return None
        if (mine["ino"], mine["ctime"]) != (theirs["ino"], theirs["ctime"]):
            return None
    return "each file has the same inode and change time on both hosts, in a pool of both"


def _plan_shared(
    source: Hypervisor,
    target: Hypervisor,
    uuid: str,
    name: str,
    xml: str,
    owned: list[tuple[str, list[Any], str | None]],
    proof: str,
    *,
    keep_source: bool,
    seed: str | None = None,
) -> MigratePlan:
    """Both hosts see the domain's files (shared storage): nothing is copied or deleted; the
    domain is defined on the target as it is, with its snapshots, and undefined here."""
    if keep_source:
        raise InvalidInputError(
            f"{target.uri} sees the very files of '{name}' (shared storage): a kept copy would "
            "write to the same disks as the migrated one; migrate it without --keep-source"
        )
    snaps = []
    for s_name, parent, current, s_xml in _snapshots(source, name):
        snaps.append(SnapshotMeta(s_name, parent, current, s_xml, s_xml))
    own = tuple(img.path for _d, links, _b in owned for img in links) + ((seed,) if seed else ())
    return MigratePlan(
        source_host=source.uri,
        target_host=target.uri,
        domain=name,
        uuid=uuid,
        directory=posixpath.dirname(own[0]) if own else "/",
        pool=None,
        template=None,
        target_template=None,
        template_copy=None,
        layers=(),
        xml=xml,
        source_xml=xml,
        source_digest=ops.xml_digest(xml),
        snapshots=tuple(snaps),
        keep_source=None,
        bytes_needed=0,
        bytes_free=None,
        shared=proof,
        shared_files=own,
    )


# -- executing ------------------------------------------------------------------------------


def _source_unchanged(
    source: Hypervisor, plan: MigratePlan, files: Any, ids: dict[str, Any]
) -> None:
    """The source is still what was planned: shut off (live: running), same definition, same
    files."""
    try:
        dom = source.call(source.conn.lookupByUUIDString, plan.uuid)
    except NotFoundError:
        raise StateError(f"'{plan.domain}' is gone from {plan.source_host}; plan again") from None
    active = bool(source.call(dom.isActive))
    if active and not plan.live:
        raise StateError(f"'{plan.domain}' was started on {plan.source_host}; nothing was kept")
    if plan.live and not active:
        raise StateError(
            f"'{plan.domain}' stopped on {plan.source_host} meanwhile; migrate it offline"
        )
    if ops.domain_digest(source, plan.uuid) != plan.source_digest:
        raise StateError(
            f"the definition of '{plan.domain}' changed on {plan.source_host}; plan again"
        )
    for path, was in ids.items():
        if files.identity(path) != was:
            raise StateError(f"{path} changed on {plan.source_host} meanwhile; nothing was kept")


def _send_layers(
    source: Hypervisor,
    target: Hypervisor,
    plan: MigratePlan,
    undo: ops.Undo,
    progress: Progress,
    pool: Any,
) -> None:
    """Stream each layer of the plan (lowest first), check its size, sha256 and qemu-img
    check there, rebase it onto its new backing path; each file an undo step."""
    src_pools = RemoteFiles(source, "migrate")
    dst_pools = RemoteFiles(target, "migrate")
    dst_files = files_for(target, "migrate")
    total = sum(v.file_bytes for v in plan.layers) or 1
    done = 0
    for v in plan.layers:
        assert pool is not None
        if dst_files.lexists(v.target) or dst_pools.lexists(v.target):
            raise InvalidInputError(f"{v.target} appeared on {target.uri}; nothing was kept")
        label, start = f"sending {os.path.basename(v.source)}", done

        def report(n: int, start: int = start, label: str = label) -> None:
            progress(label, (start + n) / total)

        with SegmentReadback(target, v.target) as reading:  # (read back as it lands)
            sent = transfer.upload(
                source, target, transfer._source_volume(src_pools, v.source),
                (dst_pools, pool), undo, v.target, v.file_bytes, report, reading=reading,
            )  # fmt: skip
            done += v.file_bytes
            transfer.settle(target, dst_files, v, sent, progress, "nothing was kept", reading)
        if v.format != "raw":  # (a raw file has nothing to check: its sha256 was)
            progress(f"qemu-img check {v.target}", None)
            checker = dst_files.qemu_img
            assert checker is not None  # the plan required local or SSH
            checker.check(v.target, v.format)


def execute_migrate(
    source: Hypervisor,
    target: Hypervisor,
    plan: MigratePlan,
    progress: Progress = no_progress,
) -> str:
    """Stream, verify, define there; then (only then) undefine the source and delete its files."""
    progress = ops.cancellable(progress)
    if plan.template_copy is not None:
        if target.exists(plan.template_copy.template):
            raise InvalidInputError(
                f"'{plan.template_copy.template}' appeared on {target.uri} meanwhile; plan again"
            )
        transfer.execute_template_copy(source, target, plan.template_copy, progress)
    src_files = files_for(source, "migrate")
    dst_pools = RemoteFiles(target, "migrate")
    # (live: the files the running domain writes change all the time; they are not compared)
    kept_files = [v.source for v in plan.layers] + ([] if plan.live else list(plan.shared_files))
    ids = {p: src_files.identity(p) for p in kept_files}
    _source_unchanged(source, plan, src_files, ids)
    if target.exists(plan.domain):
        raise InvalidInputError(f"'{plan.domain}' exists on {target.uri} now; plan again")
    if plan.live:
        return _execute_live(source, target, plan, progress, src_files, ids)
    title = f"migrating '{plan.domain}' from {plan.source_host}"
    with ops.running(target, title, domains=[plan.domain], dirs={plan.directory}) as undo:
        pool = dst_pools.ensure_pool(plan.directory) if plan.layers else None
        _send_layers(source, target, plan, undo, progress, pool)
        _send_nvram(source, target, plan, undo, progress)
        progress(f"defining '{plan.domain}' on {target.uri}", None)
        undo.push(f"undefine '{plan.domain}' on {target.uri}", "undefine", uuid=plan.uuid,
                  name=plan.domain, snapshots=True)  # fmt: skip
        target.define(plan.xml, what=f"defining '{plan.domain}' on {target.uri}")
        for s in plan.snapshots:
            _redefine(target, plan.domain, s.target_xml, current=False)
        current = [s for s in plan.snapshots if s.current]
        if current:
            _redefine(target, plan.domain, current[0].target_xml, current=True)
        names = {n for n, *_ in _snapshots(target, plan.domain)}
        if names != {s.name for s in plan.snapshots}:
            raise OperationError(
                f"the snapshots of '{plan.domain}' on {target.uri} are not the source's: "
                "nothing was kept"
            )
        _source_unchanged(source, plan, src_files, ids)
        _leave_source_offline(source, plan, undo, progress)
    source.invalidate()
    target.invalidate()
    if not plan.keep_source:
        paths = [v.source for v in plan.layers] + ([plan.nvram[0]] if plan.nvram else [])
        left = _delete_own(src_files, paths, plan, progress)
        if left:
            raise OperationError(
                f"'{plan.domain}' is on {plan.target_host}; left on {plan.source_host}: "
                + ", ".join(left)
            )
    progress(f"'{plan.domain}' is on {plan.target_host}", 1.0)
    return plan.domain


def _leave_source_offline(
    source: Hypervisor, plan: MigratePlan, undo: ops.Undo, progress: Progress
) -> None:
    """The source renamed (--keep-source) or undefined, journalled (an undo defines it again
    with its snapshots); then both journals commit."""
    side = f"migrating '{plan.domain}' to {plan.target_host}: the source"
    with ops.running(source, side, domains=[plan.domain]) as src_undo:
        dom = source.call(source.conn.lookupByUUIDString, plan.uuid)
        if plan.keep_source:
            progress(f"renaming the source to '{plan.keep_source}'", None)
            src_undo.push(f"rename back to '{plan.domain}'", "rename", uuid=plan.uuid,
                          name=plan.domain)  # fmt: skip
            source.rename(dom, plan.domain, plan.keep_source)
        else:
            progress(f"undefining '{plan.domain}' on {plan.source_host}", None)
            # Unwound last pushed first: the definition, then its snapshots, parents first.
            for s in reversed(plan.snapshots):
                src_undo.push(f"redefine snapshot '{s.name}'", "redefine_snapshot",
                              domain=plan.domain, xml=s.xml, current=s.current)  # fmt: skip
            src_undo.push(f"define '{plan.domain}' again on {plan.source_host}", "define",
                          xml=plan.source_xml)  # fmt: skip
            # Its UEFI variables stay until both journals commit (an undo defines it again).
            source.call(dom.undefineFlags, libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                        | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM,
                        what=f"undefining '{plan.domain}' on the source")  # fmt: skip
        progress(f"'{plan.domain}' left {plan.source_host}; committing", None)
        undo.commit()
        src_undo.commit()


def _execute_live(
    source: Hypervisor,
    target: Hypervisor,
    plan: MigratePlan,
    progress: Progress,
    src_files: Any,
    ids: dict[str, Any],
) -> str:
    """The layers below the running one streamed; an overlay made there for each disk the
    domain writes; then libvirt's live migration fills it and moves the memory. Until the
    switchover an interrupt or a failure leaves the domain running on the source and removes
    what was made on the target (journalled on both hosts: `recover`); after it, the domain
    runs on the target and the source's definition and own files are removed."""
    title = f"migrating '{plan.domain}' live from {plan.source_host}"
    with ops.running(target, title, domains=[plan.domain], dirs={plan.directory}) as undo:
        pool = (
            RemoteFiles(target, "migrate").ensure_pool(plan.directory) if not plan.shared else None
        )
        _send_layers(source, target, plan, undo, progress, pool)
        _create_tops(target, plan, undo, progress, pool)
        _send_nvram(source, target, plan, undo, progress)
        undo.push(f"stop the incoming '{plan.domain}' on {target.uri}", "live_incoming",
                  uuid=plan.uuid, name=plan.domain)  # fmt: skip
        _source_unchanged(source, plan, src_files, ids)
        side = f"migrating '{plan.domain}' live to {plan.target_host}: the source"
        with ops.running(source, side, domains=[plan.domain]) as src_undo:
            src_undo.push(
                f"resume '{plan.domain}' if the migration left it paused, or remove its copy "
                f"here once it runs on {plan.target_host}", "live_source", uuid=plan.uuid,
                name=plan.domain, target=plan.target_host, files=_own_files(plan),
                keep=plan.keep_source,
            )  # fmt: skip
            dom = source.call(source.conn.lookupByUUIDString, plan.uuid, what=plan.domain)
            root = domxml.parse(source.call(
                dom.XMLDesc, libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE,
                what=plan.domain))  # fmt: skip
            _rename_disks(root, dict(plan.paths))
            _rename_nvram(root, plan.nvram)
            params, flags = livemigrate.parameters(
                plan.target_host, domxml.to_string(root), plan.xml,
                [t.disk for t in plan.tops], plan.bandwidth,
            )  # fmt: skip
            result = livemigrate.migrate(source, target, plan.uuid, plan.domain, params, flags,
                                         progress, max_downtime=plan.max_downtime)  # fmt: skip
            # The switchover happened: the domain runs on the target, which keeps it; the
            # source's copy goes (an interrupt now: the journal's live_source finishes it).
            undo.commit()
            _leave_source_live(source, plan, src_files, progress)
            src_undo.commit()
    source.invalidate()
    target.invalidate()
    done = result.describe()
    if result.cancelled_too_late:
        raise Interrupted(
            f"the migration of '{plan.domain}' had finished when the cancel came: it runs on "
            f"{plan.target_host} ({done})"
        )
    progress(f"'{plan.domain}' runs on {plan.target_host} ({done})", 1.0)
    return done


def _send_nvram(
    source: Hypervisor, target: Hypervisor, plan: MigratePlan, undo: ops.Undo, progress: Progress
) -> None:
    """The domain's UEFI variables, a small file, read on the source and written new (0600)
    next to its disks on the target."""
    if plan.nvram is None:
        return
    src, dest, _size = plan.nvram
    progress(f"copying the UEFI variables to {dest}", None)
    data = files_for(source, "migrate").read_small(src)
    with undo.step(f"remove {dest} on {target.uri}", "delete_file", path=dest):
        files_for(target, "migrate").write_small(dest, data)


def _create_tops(
    target: Hypervisor, plan: MigratePlan, undo: ops.Undo, progress: Progress, pool: Any
) -> None:
    """An empty overlay on the target for each disk the running domain writes, over the
    layer below it there (the template's base or a streamed layer)."""
    dst_pools = RemoteFiles(target, "migrate")
    for t in plan.tops:
        if dst_pools.lexists(t.target):
            raise InvalidInputError(f"{t.target} appeared on {target.uri}; nothing was kept")
        backing = (
            f"<backingStore><path>{transfer._esc(t.backing)}</path>"
            f"<format type='{transfer._esc(t.backing_format or 'raw')}'/></backingStore>"
            if t.backing
            else ""
        )
        xml = (
            f"<volume><name>{transfer._esc(posixpath.basename(t.target))}</name>"
            f"<capacity unit='bytes'>{t.capacity}</capacity>"
            f"<target><format type='{transfer._esc(t.format)}'/></target>{backing}</volume>"
        )
        progress(f"creating {t.target} on {target.uri}", None)
        with undo.step(f"remove {t.target} on {target.uri}", "delete_file", path=t.target):
            target.call(pool.pool.createXML, xml, 0, what=f"creating {t.target}")


def _delete_own(
    src_files: Any, paths: list[str], plan: MigratePlan, progress: Progress
) -> list[str]:
    """Delete the source's own files once the move is committed; what could not be, named."""
    left = []
    for path in paths:
        progress(f"deleting {path} on {plan.source_host}", None)
        try:
            src_files.delete(path)
        except VirtdeckError as err:
            left.append(f"{path} ({err})")
    return left


def _own_files(plan: MigratePlan) -> list[str]:
    """The source's files that go once the domain runs on the target."""
    if plan.keep_source or plan.shared:
        return []
    return [v.source for v in plan.layers] + [t.source for t in plan.tops]


def _leave_source_live(
    source: Hypervisor, plan: MigratePlan, src_files: Any, progress: Progress
) -> None:
    """After the switchover: the source's definition (shut off now) undefined, or renamed
    with --keep-source, and its own files deleted; what cannot be is named as left over."""
    left = []
    try:
        dom = source.call(source.conn.lookupByUUIDString, plan.uuid)
        if source.call(dom.isActive):
            raise StateError(f"'{plan.domain}' is active on {plan.source_host} again")
        if plan.keep_source:
            source.rename(dom, plan.domain, plan.keep_source)
        else:
            progress(f"undefining '{plan.domain}' on {plan.source_host}", None)
            source.undefine_all(dom, what=f"undefining '{plan.domain}' on the source")
    except NotFoundError:
        pass  # a transient domain: gone with the migration
    except VirtdeckError as err:
        left.append(f"its definition ({err})")
    source.invalidate()
    if not left:
        left = _delete_own(src_files, _own_files(plan), plan, progress)
    if left:
        raise OperationError(
            f"'{plan.domain}' runs on {plan.target_host}; left on {plan.source_host}: "
            + ", ".join(left)
        )


def _redefine(hv: Hypervisor, domain: str, xml: str, *, current: bool) -> None:
    dom = hv.lookup(domain)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
    if current:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    hv.call(dom.snapshotCreateXML, xml, flags, what=f"redefining a snapshot of '{domain}'")


@dataclass(frozen=True)
class MigrateGroup(ops.PlanDefaults):
    """Several domains to one target (the dashboard's `M` with marks): one plan each, run one
    after the other; a member whose plan copied the template is planned again on that copy
    once an earlier member made it."""

    target_host: str
    plans: tuple[MigratePlan, ...]
    refused: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return self.target_host

    @property
    def title(self) -> str:
        if len(self.plans) == 1:
            return self.plans[0].title
        return f"Migrate {len(self.plans)} domains to {self.target_host}?"

    @property
    def confirm_label(self) -> str:
        return "Migrate"

    def summary(self) -> list[str]:
        lines = [f"not migrated: {r}" for r in self.refused]
        for plan in self.plans:
            lines.extend(plan.summary())
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"plans": [p.to_json() for p in self.plans], "refused": list(self.refused)}

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        done, failed = [], []
        for plan in self.plans:
            source = Hypervisor.open(plan.source_host)
            try:
                if plan.template_copy is not None and hv.exists(plan.template or ""):
                    plan = plan_migrate(
                        source, hv, plan.domain, directory=plan.directory,
                        keep_source=plan.keep_source is not None, progress=progress,
                        live=plan.live, max_downtime=plan.max_downtime, bandwidth=plan.bandwidth,
                    )  # fmt: skip
                result = execute_migrate(source, hv, plan, progress)
                done.append(f"{plan.domain} (live: {result})" if plan.live else plan.domain)
            except VirtdeckError as err:
                if ops.cancelled():  # stopped: the rest are not started
                    raise ops.Interrupted(
                        f"{err}; migrated before it: {', '.join(done) or 'none'}"
                    ) from None
                failed.append(f"{plan.domain}: {err}")
            finally:
                source.close()
        if failed:
            raise OperationError(
                "; ".join(failed) + (f" (migrated: {', '.join(done)})" if done else "")
            )
        return f"migrated {', '.join(done)} to {self.target_host}"


def plan_group(
    source_of: Any,
    target: Hypervisor,
    members: Sequence[tuple[str, str]],
    *,
    directory: str | None = None,
) -> MigrateGroup:
    """One plan per (host, name), live for a running domain, offline for a shut-off one; a
    member refused is named, the others go on. Refused all: the first refusal is raised."""
    plans, refused = [], []
    first: VirtdeckError | None = None
    for host, name in members:
        try:
            plans.append(
                plan_migrate(source_of(host), target, name, directory=directory, live=None)
            )
        except VirtdeckError as err:
            first = first or err
            refused.append(f"{name}: {err}")
    if not plans:
        assert first is not None
        raise first
    return MigrateGroup(target.uri, tuple(plans), tuple(refused))
