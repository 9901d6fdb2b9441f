"""One resolver of image facts per hypervisor: the cheapest honest source first, cached.

For each image path (a file disk's source, or a link of its backing chain) on the disk's own
hypervisor:
1. this machine's file, read in-process (tui.core.storage.reader) — only when the hypervisor
   is proved to be this machine (`Hypervisor.local`), never because a path happens to exist
   here;
2. a libvirt storage volume (`storageVolLookupByPath`, `virStorageVolGetInfo`, the volume
   XML's backingStore and permissions): the same numbers for a `qemu+ssh://` host, with no
   local file access;
3. a running domain's bulk block stats with their backing chains (one getAllDomainStats call
   per pass), for images no pool knows about;
4. for an operation on another host reached over SSH (`ssh=True`): `qemu-img info -U
   --backing-chain` run there (tui.core.storage.remote), one call per chain, for images
   outside any pool (an operation must know every chain before it deletes or shares a base).
An image none of them knows is returned with source "missing", sizes None and the reason.

Identity: `canonical()` gives one spelling per image (the real path on this machine, a
normalised path on another host), so a symlinked image directory is one directory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import libvirt

from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.storage.qemuimg import QemuImg
from tui.core.storage.reader import Image, ImageReader, resolve_backing

MAX_CHAIN = 64
_POOL_REFRESH_INTERVAL = 30.0

#: path -> (capacity, physical, backing path) from bulk block stats
BlockStats = dict[str, tuple[int, int, str | None]]


def canonical(path: str, local: bool) -> str:
    """One identity per image: the real path here, a normalised one on another host."""
    if not path.startswith("/"):
        return path  # a protocol name (json:, nbd://): no file identity to compute
    return os.path.realpath(path) if local else os.path.normpath(path)


@dataclass(frozen=True)
class Chain:
    """A disk's backing chain, top image first, as far as it could be read.

    `problem` says why it stops early (a missing or unreadable layer, a loop); a chain with a
    problem is not complete, and nothing that needs the whole chain may act on it.
    """

    links: tuple[Image, ...]
    problem: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(i.path for i in self.links)

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def top(self) -> Image:
        return self.links[0]


class Resolver:
    """Image facts of one hypervisor, cached between passes; thread-safe caches."""

    def __init__(
        self,
        hv: Hypervisor,
        *,
        qemu_img: QemuImg | None = None,
        reader: ImageReader | None = None,
        local: bool | None = None,
        ssh: bool = False,
    ) -> None:
        self.hv = hv
        self.local = hv.local if local is None else local
        self._ssh_qemu_img: QemuImg | None = None
        if ssh and not self.local:
            from tui.core.storage.remote import Ssh, ssh_target

            target = ssh_target(hv.uri)
            if target is not None:
                self._ssh_qemu_img = QemuImg(runner=Ssh(target).run)
        self._ssh_images: dict[str, Image] = {}
        self.reader = reader or ImageReader(qemu_img)
        self._vol_xml: dict[tuple[str, int], _VolumeFacts] = {}
        self._canonical: dict[str, str] = {}
        self._pools_refreshed_at = -_POOL_REFRESH_INTERVAL
        self._lock = threading.Lock()
        #: counters for tests and benchmarks
        self.pool_lookups = 0
        self.blockstats_calls = 0

    def canonical(self, path: str) -> str:
        # Cached: a usage refresh asks for every link of every chain every few seconds, and
        # realpath costs a syscall per path component. A resolver used for an operation is
        # made for it, so its answers are as fresh as the operation.
        found = self._canonical.get(path)
        if found is None:
            found = self._canonical[path] = canonical(path, self.local)
        return found

    def session(self, running: Iterable[str] = ()) -> Pass:
        """A pass over many images; `running` names the domains whose block stats may help."""
        return Pass(self, running)

    def image(self, path: str, fmt: str | None = None) -> Image:
        return self.session().image(path, fmt)

    def chain(self, path: str, fmt: str | None = None) -> Chain:
        return self.session().chain(path, fmt)

    # -- sources ----------------------------------------------------------------------------

    def local_image(self, path: str, fmt: str | None, why: list[str]) -> Image | None:
        if not self.local:
            return None
        try:
            return self.reader.read(path, fmt)
        except FileNotFoundError:
            why.append("no such file")
        except OSError as err:
            why.append(str(err.strerror or err))
        return None

    def pool_image(self, path: str, why: list[str]) -> Image | None:
        conn = self.hv.conn
        self.pool_lookups += 1
        try:
            vol = self.hv.call(conn.storageVolLookupByPath, path)
        except VirtdeckError:
            vol = None
        if vol is None and self._refresh_pools():
            try:
                vol = self.hv.call(conn.storageVolLookupByPath, path)
            except VirtdeckError:
                vol = None
        if vol is None:
            return None
        try:
            # virStorageVolGetInfo re-reads the file on the hypervisor (refreshVol), so the
            # allocation is as live as a local stat.
            _type, capacity, allocation = self.hv.call(vol.info)
            key = (path, int(capacity))
            facts = self._vol_xml.get(key)
            if facts is None:
                facts = _volume_facts(self.hv.call(vol.XMLDesc, 0))
                self._vol_xml[key] = facts
        except VirtdeckError as err:
            why.append(f"storage volume unreadable: {err}")
            return None
        return Image(
            path=path,
            format=facts.format,
            virtual_bytes=int(capacity),
            actual_bytes=int(allocation),
            backing=resolve_backing(path, facts.backing) if facts.backing else None,
            backing_format=facts.backing_format,
            source="pool",
            read_only=facts.read_only,
        )

    @property
    def reads_host(self) -> bool:
        """Every image of the host is readable: it is this machine, or SSH reaches it."""
        return self.local or self._ssh_qemu_img is not None

    def ssh_image(self, path: str, why: list[str]) -> Image | None:
        """The image (and its chain, cached) read by qemu-img on the host over SSH."""
        if self._ssh_qemu_img is None or not path.startswith("/"):
            return None
        found = self._ssh_images.get(path)
        if found is not None:
            return found
        try:
            entries = self._ssh_qemu_img.info(path, backing_chain=True)
        except VirtdeckError as err:
            why.append(f"qemu-img on the host: {err}")
            return None
        for i, entry in enumerate(entries):
            name = path if i == 0 else entry.get("filename")
            if not isinstance(name, str):
                continue
            backing = entry.get("full-backing-filename") or entry.get("backing-filename")
            img = Image(
                path=name,
                format=entry.get("format"),
                virtual_bytes=entry.get("virtual-size"),
                actual_bytes=entry.get("actual-size"),
                backing=resolve_backing(name, backing) if backing else None,
                backing_format=entry.get("backing-filename-format"),
                source="ssh",
            )
            self._ssh_images.setdefault(name, img)
        return self._ssh_images.get(path)

    def _refresh_pools(self) -> bool:
        """Rescan active pools (new clone files), at most every 30 s; True if it did."""
        with self._lock:
            now = time.monotonic()
            if now - self._pools_refreshed_at < _POOL_REFRESH_INTERVAL:
                return False
            self._pools_refreshed_at = now
        try:
            pools = self.hv.call(
                self.hv.conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
            )
        except VirtdeckError:
            return False
        for pool in pools:
            # A pool busy building a volume refuses; the next round retries.
            with contextlib.suppress(VirtdeckError):
                self.hv.call(pool.refresh, 0)
        return True

    def block_stats(self, names: Iterable[str]) -> BlockStats:
        """path -> (capacity, physical, backing path) for the running domains `names`."""
        wanted = set(names)
        if not wanted:
            return {}
        self.blockstats_calls += 1
        # VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING: libvirt >= 1.2.15; looked up at run time
        # so older or newer bindings without it still get the top images.
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | getattr(
            libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING", 0
        )
        try:
            records = self.hv.call(
                self.hv.conn.getAllDomainStats, libvirt.VIR_DOMAIN_STATS_BLOCK, flags
            )
        except VirtdeckError:
            return {}
        out: BlockStats = {}
        for dom, st in records:
            if dom.name() in wanted:
                out.update(parse_block_stats(st))
        return out


class Pass:
    """One consistent read of many images: memoised per path, block stats read once, lazily."""

    def __init__(self, resolver: Resolver, running: Iterable[str] = ()) -> None:
        self.r = resolver
        self.running = list(running)
        self.images: dict[str, Image] = {}
        self.problems: list[str] = []
        self._stats: BlockStats | None = None

    def stats(self) -> BlockStats:
        if self._stats is None:
            self._stats = self.r.block_stats(self.running)
        return self._stats

    def image(self, path: str, fmt: str | None = None) -> Image:
        """Facts of `path` (canonical spelling); unknown sizes are None, with the reason."""
        key = self.r.canonical(path)
        img = self.images.get(key)
        if img is not None:
            return img
        why: list[str] = []  # reported only when no source at all can tell
        img = self.r.local_image(path, fmt, why)
        if img is None:
            img = self.r.pool_image(path, why)
        if img is None:
            st = self.stats().get(path)
            if st is not None:
                capacity, physical, backing = st
                img = Image(path, fmt, capacity, physical, backing, None, "blockstats")
        if img is None:
            img = self.r.ssh_image(path, why)
        if img is None:
            if not self.r.local:
                why.append(
                    f"{self.r.hv.uri} is another host: not in a storage pool or in a running "
                    "domain's block stats"
                )
            elif not why:
                why.append("not readable here, in a storage pool or in block stats")
            reason = "; ".join(dict.fromkeys(why))
            self.problems.append(f"{path}: {reason}")
            img = Image(path, fmt, None, None, None, None, "missing", reason=reason)
        if img.path != key:
            img = _with_path(img, key)
        self.images[key] = img
        return img

    def chain(self, path: str, fmt: str | None = None) -> Chain:
        """The backing chain of `path`, top first; stops (with a problem) at an unknown link."""
        links: list[Image] = []
        seen: set[str] = set()
        nxt: str | None = path
        while nxt is not None:
            key = self.r.canonical(nxt)
            if key in seen or len(links) >= MAX_CHAIN:
                problem = f"{path}: backing chain loops or is deeper than {MAX_CHAIN}"
                self.problems.append(problem)
                return Chain(tuple(links), problem)
            seen.add(key)
            img = self.image(nxt, fmt)
            links.append(img)
            if not img.known:
                what = "image" if len(links) == 1 else f"backing file (layer {len(links)})"
                return Chain(tuple(links), f"{what} {nxt}: {img.reason}")
            nxt, fmt = img.backing, img.backing_format  # already resolved against `nxt`
        return Chain(tuple(links))


def _with_path(img: Image, path: str) -> Image:
    data = img.to_json()
    data["path"] = path
    return Image(**data)


@dataclass(frozen=True)
class _VolumeFacts:
    format: str | None
    backing: str | None
    backing_format: str | None
    read_only: bool | None


def _volume_facts(xml: str) -> _VolumeFacts:
    root = ET.fromstring(xml)
    fmt = root.find("target/format")
    backing = root.findtext("backingStore/path")
    backing_fmt = root.find("backingStore/format")
    mode = root.findtext("target/permissions/mode")
    read_only = None
    if mode and mode.strip():
        with contextlib.suppress(ValueError):
            read_only = int(mode.strip(), 8) & 0o222 == 0
    return _VolumeFacts(
        fmt.get("type") if fmt is not None else None,
        backing.strip() if backing and backing.strip() else None,
        backing_fmt.get("type") if backing_fmt is not None else None,
        read_only,
    )


def parse_block_stats(st: dict[str, Any]) -> BlockStats:
    """Bulk block stats -> path -> (capacity, physical, backing path).

    With the BACKING flag libvirt lists each disk's chain as consecutive entries with the same
    `name`, top image first. For a running domain `physical` is the file's allocation on the
    host (QEMU's actual-size); `allocation` would be the highest written offset.
    """
    out: BlockStats = {}
    entries = []
    for i in range(int(st.get("block.count", 0))):
        entries.append(
            (
                st.get(f"block.{i}.name"),
                st.get(f"block.{i}.path"),
                st.get(f"block.{i}.capacity"),
                st.get(f"block.{i}.physical", st.get(f"block.{i}.allocation")),
            )
        )
    for i, (name, path, capacity, physical) in enumerate(entries):
        if not path or capacity is None or physical is None:
            continue
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        backing = nxt[1] if nxt is not None and nxt[0] == name else None
        out.setdefault(path, (int(capacity), int(physical), backing))
    return out
