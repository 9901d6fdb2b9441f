"""Templates between hosts: copy a template's base image(s) and definition to another hypervisor.

Plan, then execute, on the journal (tui.core.ops) of the target host.

`plan_template_copy()` reads the template on its host (defined, or an XML backup), the chain of
each base image, and the target: its storage pool for the chosen directory (one is defined for
a directory no pool covers, and the plan says so), free space, name and file collisions (a
domain or a file already there is refused, never overwritten). Each layer of a base's chain is
copied as it is (layer by layer, never flattened: a thin base stays thin), so the target holds
the same chain; where the directory differs, the upper layers are rebased (`qemu-img rebase
-u`, the data is the same) onto their new backing paths, which needs the target to be this
machine or reachable over SSH.

`execute_template_copy()` streams each volume with `virStorageVolDownload` from the source
and `virStorageVolUpload` to the target, both with sparse streams (holes stay holes: only
allocated data crosses the wire), verifies the target file has the source's size, makes the
base read-only there and defines the template with its own UUID and MAC addresses (the
per-domain rules of tui.core.clonexml), so clones can be deployed on that host. Any failure
or interrupt deletes what was uploaded and undefines what was defined.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import libvirt

from tui.core import clonexml, domxml, ops
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress, no_progress
from tui.core.storage import Resolver, files_for
from tui.core.storage.digest import (
    SEGMENT,
    BackgroundDigest,
    SegmentDigest,
    SegmentReadback,
    StreamDigest,
    readback,
)
from tui.core.storage.remote import RemoteFiles
from tui.core.templates import own_images, template_xml

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CopyVolume:
    """One layer of a base image, copied to the target as it is."""

    source: str  # path on the source host
    target: str  # path on the target host
    format: str
    virtual_bytes: int
    file_bytes: int  # the file's length (what the stream covers)
    allocated_bytes: int  # what actually crosses (holes do not)
    backing: str | None = None  # the target path of the layer below (rebased onto it)
    backing_format: str | None = None
    rebase: bool = False  # the backing path changes: rebase -u on the target
    base: bool = False  # a template disk's top image (made read-only there)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TemplateCopyPlan(ops.PlanDefaults):
    source_host: str
    target_host: str
    template: str
    uuid: str  # the template's UUID on the target (its own)
    directory: str  # on the target
    pool: str | None  # the target's pool for it (None: one is defined)
    volumes: tuple[CopyVolume, ...]  # lowest layer first
    xml: str
    bytes_needed: int
    bytes_free: int | None
    notes: tuple[str, ...] = ()
    # Each disk's base layers on the source, lowest first (what its identity digests).
    layers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    identity: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # recorded on the source

    @property
    def host(self) -> str:
        """It runs (and is journalled) on the target."""
        return self.target_host

    @property
    def title(self) -> str:
        return f"Copy '{self.template}' to {self.target_host}?"

    @property
    def confirm_label(self) -> str:
        return "Copy"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        """On the target `hv`; the source is reached by its URI for the streams."""
        source = Hypervisor.open(self.source_host)
        try:
            execute_template_copy(source, hv, self, progress)
        finally:
            source.close()
        return f"copied '{self.template}' to {self.target_host}"

    def summary(self) -> list[str]:
        lines = [f"copy template '{self.template}' from {self.source_host} to {self.target_host}"]
        for v in self.volumes:
            how = "base, made read-only" if v.base else "backing layer"
            lines.append(
                f"  {v.source} -> {v.target} ({v.format}, {_mib(v.allocated_bytes)} of data, "
                f"{how}; sparse stream)"
            )
            if v.rebase:
                lines.append(f"  rebase {v.target} onto {v.backing} (same data, new path)")
        lines.append(
            "copied layer by layer (not flattened); pool "
            + (f"'{self.pool}'" if self.pool else "(new)")
            + f" for {self.directory} on the target"
        )
        lines.append(f"define '{self.template}' there as a template (uuid {self.uuid})")
        if self.identity is None:
            lines.append(
                "its base's identity (sha256 of each layer) is computed as it streams and "
                "recorded on both hosts"
            )
        else:
            lines.append("each layer's sha256 is checked against the template's identity")
        lines.append(
            f"space needed: {_mib(self.bytes_needed)}"
            + (f" of {_mib(self.bytes_free)} free" if self.bytes_free is not None else "")
        )
        lines.extend(self.notes)
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "source_host": self.source_host,
            "target_host": self.target_host,
            "template": self.template,
            "uuid": self.uuid,
            "directory": self.directory,
            "pool": self.pool,
            "volumes": [v.to_json() for v in self.volumes],
            "bytes_needed": self.bytes_needed,
            "bytes_free": self.bytes_free,
            "notes": list(self.notes),
            "identity": None if self.identity is None else dict(self.identity),
        }


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 1024**2:.1f} MiB"


def _pool_dir(files: RemoteFiles, preferred: str | None) -> tuple[str, str | None]:
    """The target directory and its pool: --dir, else the pool 'default', else the first."""
    if preferred is not None:
        p = files.pool_of(preferred)
        return posixpath.normpath(preferred), p.name if p else None
    pools = files.pools()
    for p in pools:
        if p.name == "default":
            return p.path, p.name
    if pools:
        return pools[0].path, pools[0].name
    raise InvalidInputError(
        f"{files.hv.uri} has no directory storage pool: choose where the images go with --dir"
    )


def _physical(hv: Hypervisor, vol: Any) -> tuple[int, int, int]:
    """(capacity, file length, allocation) of a volume."""
    _t, capacity, allocation = hv.call(vol.info)
    length = int(allocation)
    flag = getattr(libvirt, "VIR_STORAGE_VOL_GET_PHYSICAL", None)
    if flag is not None:
        length = int(hv.call(vol.infoFlags, flag)[2])
    return int(capacity), length, int(allocation)


def plan_template_copy(
    source: Hypervisor,
    target: Hypervisor,
    template: str,
    *,
    directory: str | None = None,
    backup_dir: Path | None = None,
    rng: random.Random | None = None,
) -> TemplateCopyPlan:
    """Check everything on both hosts; nothing is written."""
    if source.uri == target.uri:
        raise InvalidInputError(f"'{template}' is already on {target.uri}: choose another --to")
    xml, defined = template_xml(source, template, backup_dir)
    if defined and source.domain(template).state.active:
        raise StateError(f"template '{template}' is running on {source.uri}; shut it down first")
    root = domxml.parse(xml)
    meta = domxml.read_meta(root)
    if target.exists(template):
        raise InvalidInputError(f"a domain named '{template}' already exists on {target.uri}")
    src_files = RemoteFiles(source, "template copy")
    dst_files = RemoteFiles(target, "template copy")
    where, pool = _pool_dir(dst_files, directory)
    volumes, disk_paths, disk_layers = _copy_volumes(
        source, target, template, root, src_files, dst_files, where
    )
    if not volumes:
        raise InvalidInputError(f"template '{template}' has no disk image to copy")
    if any(v.rebase for v in volumes) and not (target.local or dst_files.ssh is not None):
        raise InvalidInputError(
            f"the base of '{template}' has backing layers whose paths change on {target.uri}, "
            "and rebasing them needs SSH to that host (or --dir with the same directory)"
        )
    needed = sum(v.allocated_bytes for v in volumes)
    free = dst_files.free_bytes(where) if pool is not None or dst_files.ssh else None
    if free is not None and needed > free:
        raise InvalidInputError(
            f"not enough space in {where} on {target.uri}: {_mib(needed)} needed, {_mib(free)} free"
        )
    rng = rng or random.SystemRandom()
    from tui.core.clones import _all_macs, _new_mac  # per-domain rules of clones

    taken = _all_macs(target)
    new_uuid = str(uuidlib.uuid4())
    macs = tuple(_new_mac(taken, rng) for _ in range(clonexml.interface_count(root)))
    ident = clonexml.CloneIdentity(
        name=template,
        uuid=new_uuid,
        macs=macs,
        disks=tuple(disk_paths),
        meta=replace(meta, xml_backup=None),
        old_names=(template,),
        nvram_present=False,
    )
    out = clonexml.clone_xml(root, ident)
    notes = list(dst_files.pool_notes([where + "/x"])) if pool is None else []
    if out.copies:
        notes.append(
            "its UEFI variables are not copied: the target starts fresh ones from the "
            "firmware's template"
        )
    notes += [f"{r.line()}: {r.why}" for r in out.rewrites if r.kind == "shared-warning"]
    estimate = dst_files.free_note(where) if free is not None else None
    if estimate:
        notes.append(estimate)
    return TemplateCopyPlan(
        source_host=source.uri,
        target_host=target.uri,
        template=template,
        uuid=new_uuid,
        directory=where,
        pool=pool,
        volumes=tuple(volumes),
        xml=out.xml,
        bytes_needed=needed,
        bytes_free=free,
        notes=tuple(notes),
        layers=tuple(disk_layers),
        identity=meta.base_identity,
    )


def _copy_volumes(
    source: Hypervisor,
    target: Hypervisor,
    template: str,
    root: Any,
    src_files: RemoteFiles,
    dst_files: RemoteFiles,
    where: str,
) -> tuple[list[CopyVolume], list[tuple[str, str, str]], list[tuple[str, tuple[str, ...]]]]:
    """Every layer of the template's chains, lowest first, each once (a layer two disks share
    is sent once), with where it goes on the target; and each disk's new top path and its
    layers' source paths."""
    resolver = Resolver(source, ssh=True)
    volumes: list[CopyVolume] = []
    disk_paths: list[tuple[str, str, str]] = []
    disk_layers: list[tuple[str, tuple[str, ...]]] = []
    seen: dict[str, str] = {}
    for disk in own_images(domxml.disks(root)):
        assert disk.path is not None
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target} of '{template}': {chain.problem}")
        below: str | None = None
        below_fmt: str | None = None
        for i, img in enumerate(reversed(chain.links)):
            top = i == len(chain.links) - 1
            if img.path in seen:
                below, below_fmt = seen[img.path], img.format
                continue
            vol = src_files._volume(img.path) or _source_volume(src_files, img.path)
            capacity, length, allocation = _physical(source, vol)
            dest = posixpath.join(where, posixpath.basename(img.path))
            if dest in seen.values():
                raise InvalidInputError(
                    f"two layers are named {posixpath.basename(img.path)}: copy it by hand"
                )
            if dst_files.lexists(dest):
                raise InvalidInputError(
                    f"{dest} already exists on {target.uri}; virtdeck never overwrites a file "
                    "(choose another --dir)"
                )
            rebase = below is not None and img.backing is not None and img.backing != below
            volumes.append(
                CopyVolume(
                    source=img.path,
                    target=dest,
                    format=img.format or "raw",
                    virtual_bytes=capacity,
                    file_bytes=length,
                    allocated_bytes=allocation,
                    backing=below,
                    backing_format=below_fmt,
                    rebase=rebase,
                    base=top,
                )
            )
            seen[img.path] = dest
            below, below_fmt = dest, img.format or "raw"
        disk_paths.append((disk.target, seen[chain.links[0].path], chain.links[0].format or "raw"))
        disk_layers.append((disk.target, tuple(img.path for img in reversed(chain.links))))
    return volumes, disk_paths, disk_layers


def _source_volume(files: RemoteFiles, path: str) -> Any:
    """The source image as a pool volume (its directory gets a pool when none covers it)."""
    files.ensure_pool(posixpath.dirname(path))
    vol = files._volume(path)
    if vol is None:
        raise NotFoundError(f"{path} is not a storage volume on {files.hv.uri}")
    return vol


def execute_template_copy(
    source: Hypervisor,
    target: Hypervisor,
    plan: TemplateCopyPlan,
    progress: Progress = no_progress,
) -> str:
    """Upload every layer, verify, make the base read-only, define the template there."""
    src_files = RemoteFiles(source, "template copy")
    dst_pools = RemoteFiles(target, "template copy")
    dst_files = files_for(target, "template copy")
    if target.exists(plan.template):
        raise InvalidInputError(f"'{plan.template}' exists on {target.uri} now; plan again")
    total = sum(v.file_bytes for v in plan.volumes) or 1
    done, progress = 0, ops.cancellable(progress)
    digests: dict[str, str] = {}
    title = f"copying template '{plan.template}' to {target.uri}"
    dirs = {posixpath.dirname(v.target) for v in plan.volumes}
    with ops.running(target, title, domains=[plan.template], dirs=dirs) as undo:
        pool = dst_pools.ensure_pool(plan.directory)
        for v in plan.volumes:
            if dst_pools.lexists(v.target):
                raise InvalidInputError(f"{v.target} appeared on {target.uri}; nothing was kept")
            label, start = f"uploading {os.path.basename(v.source)}", done

            def report(n: int, start: int = start, label: str = label) -> None:
                progress(label, (start + n) / total)

            digests[v.source] = upload(
                source, target, _source_volume(src_files, v.source), (dst_pools, pool), undo,
                v.target, v.file_bytes, report,
            )  # fmt: skip
            done += v.file_bytes
            readable = target.local or dst_pools.ssh is not None
            settle(target, dst_files, v, digests[v.source] if readable else None, progress,
                   "the copy is not kept")  # fmt: skip
            dst_files.make_read_only(v.target)
            undo.steps.append(f"made {v.target} read-only")
        identity = tuple((t, tuple(digests[p] for p in paths)) for t, paths in plan.layers)
        if plan.identity is not None and identity and tuple(plan.identity) != identity:
            raise OperationError(
                f"the base of '{plan.template}' on {source.uri} does not hash to the identity "
                "recorded when it was made (it changed since): not copied"
            )
        root = domxml.parse(plan.xml)
        meta = domxml.read_meta(root)
        if identity:
            domxml.write_meta(root, replace(meta, base_identity=identity))
        progress(f"defining '{plan.template}' on {target.uri}", None)
        undo.push(f"undefine '{plan.template}' on {target.uri}", "undefine", uuid=plan.uuid,
                  name=plan.template, keep_nvram=True)  # fmt: skip
        target.define(
            domxml.to_string(root), what=f"defining template '{plan.template}' on {target.uri}"
        )
        undo.commit()
    if plan.identity is None and identity and source.exists(plan.template):
        # Kept on the source too (a fact about its base, read as it streamed): best effort.
        with contextlib.suppress(VirtdeckError):
            from tui.core import baseid

            baseid.record(source, plan.template, identity)
    target.invalidate()
    progress(f"'{plan.template}' copied to {target.uri}", 1.0)
    return plan.template


def upload(
    source: Hypervisor,
    target: Hypervisor,
    src_vol: Any,
    into: tuple[RemoteFiles, Any],
    undo: ops.Undo,
    path: str,
    length: int,
    report: Callable[[int], None],
    *,
    reading: SegmentReadback | None = None,
) -> str:
    """A new raw volume at `path` in the target's pool (`into`: its RemoteFiles and the pool),
    journalled in `undo` as a file to remove, filled from `src_vol` with a sparse stream and
    checked to have `length` bytes; returns the digest of what was sent. With `reading`, the
    SEGMENTED figure: the stream goes in windows of whole segments, each read back on the
    target (`reading.landed`) while the next one travels."""
    dst_pools, pool = into
    with undo.step(f"remove {path} on {target.uri}", "delete_file", path=path):
        xml = (
            f"<volume><name>{_esc(posixpath.basename(path))}</name>"
            f"<capacity unit='bytes'>{length}</capacity>"
            "<allocation unit='bytes'>0</allocation>"
            "<target><format type='raw'/></target></volume>"
        )
        dst_vol = target.call(pool.pool.createXML, xml, 0, what=f"creating {path}")
        with BackgroundDigest(SegmentDigest() if reading else None) as digest:
            step = _window(length) if reading is not None and length else length
            for at in range(0, length, step) if length else [0]:
                n = min(step, length - at)

                def moved(k: int, at: int = at) -> None:
                    report(at + k)

                _stream(source, target, src_vol, dst_vol, n, moved, digest, offset=at)
                if reading is not None:
                    reading.landed(at + n)
    dst_pools._refresh(pool, force=True)
    got = dst_pools._volume(path)
    if got is None:
        raise OperationError(f"{path} is missing on {target.uri} after the upload")
    _cap, got_length, _alloc = _physical(target, got)
    if got_length != length:
        raise OperationError(
            f"{path} on {target.uri} has {got_length} bytes after the upload, the source "
            f"{length}: the copy is incomplete"
        )
    return digest.hexdigest()


def _window(length: int) -> int:
    """Bytes per stream of a copy read back as it lands (upload): whole segments, eight
    windows or fewer up to 8 GiB, 1 GiB each above (what is left to read at the end)."""
    segments = -(-length // SEGMENT)
    return SEGMENT * max(1, min(16, -(-segments // 8)))


def settle(
    target: Hypervisor,
    dst_files: Any,
    v: Any,
    sent: str | None,
    progress: Progress,
    kept: str,
    reading: SegmentReadback | None = None,
) -> None:
    """An uploaded layer `v` (its target path, and backing to rebase onto): its sha256 on the
    target read back (`reading`: what upload has read of it so far; the file flushed to disk
    meanwhile) and compared with what was `sent` (None: it cannot be read there), then
    pointed at its new backing file. `kept`: what the refusal says happens to the copy."""
    if sent is not None:
        progress(f"checksumming {v.target} on {target.uri}", None)
        got = reading.hexdigest() if reading is not None else readback(target, v.target, sent)
        if got != sent:
            raise OperationError(
                f"{v.target} on {target.uri} does not have the bytes that were sent "
                f"(sha256 differs): {kept}"
            )
    if v.rebase and v.backing:
        progress(f"rebasing {v.target} onto {v.backing}", None)
        dst_files.rebase_unsafe(v.target, v.backing, v.backing_format or "raw")


def _stream(
    source: Hypervisor,
    target: Hypervisor,
    src_vol: Any,
    dst_vol: Any,
    length: int,
    report: Any,
    digest: StreamDigest | BackgroundDigest | None = None,
    *,
    offset: int = 0,
) -> None:
    """Download -> upload with sparse streams of `length` bytes from `offset`: data is sent,
    holes are sent as holes (and hashed into `digest` as they pass:
    tui.core.storage.digest)."""
    down = source.call(source.conn.newStream, 0)
    up = target.call(target.conn.newStream, 0)
    moved = 0
    try:
        with source.translating("downloading the image"):
            src_vol.download(down, offset, length, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
        with target.translating("uploading the image"):
            dst_vol.upload(up, offset, length, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        while True:
            with source.translating("downloading the image"):
                got = down.recvFlags(_CHUNK, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
                hole = down.recvHole(0) if got == -3 else 0
            if isinstance(got, int) and got != -3:
                raise OperationError(f"download stream returned {got}")
            with target.translating("uploading the image"):
                if got == -3:
                    up.sendHole(hole, 0)
                    moved += hole
                    if digest is not None:
                        digest.hole(hole)
                elif not got:
                    break
                else:
                    if digest is not None:
                        digest.data(got)
                    sent = up.send(got)
                    view = memoryview(got)[sent:]
                    while view:  # (libvirt takes a whole chunk at a time; this is the rest)
                        sent = up.send(bytes(view))
                        view = view[sent:]
                    moved += len(got)
            report(moved)
        with source.translating("finishing the download"):
            down.finish()
        with target.translating("finishing the upload"):
            up.finish()
    except BaseException:
        for hv, st in ((source, down), (target, up)):
            with contextlib.suppress(VirtdeckError):
                hv.call(st.abort)
        raise


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
