"""Disk usage of a hypervisor: backing chains, what each domain owns and shares, and what thin
clones save against full copies. A base shared by many clones is counted once in every total.

Where the numbers come from, per image path:
1. a local file (the URI has no host part, or uses the unix transport, and the file exists):
   read in-process by tui.core.images (qemu-img only for formats it does not parse);
2. a libvirt storage volume (`storageVolLookupByPath`, `virStorageVolGetInfo`, the volume
   XML's backingStore) - so `-c qemu+ssh://host/system` gives the same numbers with no local
   file access;
3. a running domain's bulk block stats with their backing chains (one getAllDomainStats call),
   for images no pool knows about.
An image none of them knows is reported with source "missing" and zero sizes, and a problem line.

How the totals are defined:
- a thin clone is a non-template domain with a disk whose backing chain reaches an image of a
  template; its cost is the images of that chain above the template's (its overlays);
- a full clone is a domain virtdeck recorded as a clone of the template (meta role "clone",
  source = template) whose chains do not reach it; its cost is its whole chains;
- `full_equivalent_bytes` is what the thin clones would cost as full copies: per thin disk, the
  allocation of its whole chain (base included) capped at the disk's virtual size, which is what
  `qemu-img convert` of that chain allocates at most;
- `saved_bytes` = full_equivalent_bytes - thin_bytes (the base is needed by full clones too).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import libvirt

from tui.core import domxml
from tui.core.hypervisor import Hypervisor, is_local_uri, libvirt_message
from tui.core.images import Image, ImageReader, resolve_backing
from tui.core.models import DiskInfo, DomainInfo
from tui.core.qemuimg import QemuImg

__all__ = [
    "CloneDisk",
    "DiskChain",
    "DomainUsage",
    "Image",
    "TemplateUsage",
    "UsageCollector",
    "UsageReport",
]

_MAX_CHAIN = 64

#: Templates known only from an XML backup: (name, disks) pairs.
BackupSource = Callable[[], list[tuple[str, tuple[DiskInfo, ...]]]]
_POOL_REFRESH_INTERVAL = 30.0


@dataclass(frozen=True)
class CloneDisk:
    """One disk of a clone: its top image and the bytes that clone pays for it."""

    domain: str
    path: str
    actual_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "path": self.path, "actual_bytes": self.actual_bytes}


@dataclass(frozen=True)
class DiskChain:
    """A domain's disk and its backing chain, top image first."""

    target: str
    chain: tuple[str, ...]

    @property
    def path(self) -> str:
        return self.chain[0]


@dataclass(frozen=True)
class DomainUsage:
    """Per domain: bytes only it uses (owned) and bytes of images other domains use too."""

    name: str
    role: str | None
    disks: tuple[DiskChain, ...]
    owned_bytes: int
    shared_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "disks": [{"target": d.target, "chain": list(d.chain)} for d in self.disks],
            "owned_bytes": self.owned_bytes,
            "shared_bytes": self.shared_bytes,
        }


@dataclass(frozen=True)
class TemplateUsage:
    """A template's base and what its thin and full clones cost."""

    name: str
    base: str | None
    base_bytes: int
    thin: tuple[CloneDisk, ...]
    full: tuple[CloneDisk, ...]
    thin_bytes: int
    full_bytes: int
    full_equivalent_bytes: int
    defined: bool = True  # False: known only from its clones' metadata

    @property
    def saved_bytes(self) -> int:
        return max(0, self.full_equivalent_bytes - self.thin_bytes)

    @property
    def thin_domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.domain for c in self.thin))

    @property
    def full_domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.domain for c in self.full))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "base_bytes": self.base_bytes,
            "thin": [c.to_json() for c in self.thin],
            "full": [c.to_json() for c in self.full],
            "thin_bytes": self.thin_bytes,
            "full_bytes": self.full_bytes,
            "full_equivalent_bytes": self.full_equivalent_bytes,
            "saved_bytes": self.saved_bytes,
            "defined": self.defined,
        }


@dataclass(frozen=True)
class UsageReport:
    host: str
    images: tuple[Image, ...]
    templates: tuple[TemplateUsage, ...]
    domains: tuple[DomainUsage, ...]
    total_actual_bytes: int
    problems: tuple[str, ...] = ()
    _by_path: dict[str, Image] = field(default_factory=dict, repr=False, compare=False)

    def image(self, path: str) -> Image | None:
        if not self._by_path:
            self._by_path.update((i.path, i) for i in self.images)
        return self._by_path.get(path)

    def users(self, path: str) -> tuple[str, ...]:
        """The domains whose backing chains include `path`."""
        return tuple(d.name for d in self.domains if any(path in c.chain for c in d.disks))

    def domain(self, name: str) -> DomainUsage | None:
        return next((d for d in self.domains if d.name == name), None)

    def template(self, name: str) -> TemplateUsage | None:
        return next((t for t in self.templates if t.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "images": [i.to_json() for i in self.images],
            "templates": [t.to_json() for t in self.templates],
            "domains": [d.to_json() for d in self.domains],
            "total_actual_bytes": self.total_actual_bytes,
            "problems": list(self.problems),
        }


class UsageCollector:
    """Builds UsageReports for one hypervisor, keeping caches between refreshes.

    One refresh at a time per collector (the TUI never runs two measures at once); the caches
    themselves are thread-safe.
    """

    def __init__(
        self,
        hv: Hypervisor,
        *,
        qemu_img: QemuImg | None = None,
        local: bool | None = None,
        reader: ImageReader | None = None,
        backups: BackupSource | None = None,
    ) -> None:
        self.hv = hv
        self.backups = backups or saved_templates
        self.local = is_local_uri(hv.uri) if local is None else local
        self.reader = reader or ImageReader(qemu_img)
        self._vol_xml: dict[tuple[str, int], tuple[str | None, str | None, str | None]] = {}
        self._pools_refreshed_at = -_POOL_REFRESH_INTERVAL
        self._lock = threading.Lock()
        #: counters for tests
        self.pool_lookups = 0
        self.blockstats_calls = 0

    def report(self, domains: Sequence[DomainInfo] | None = None) -> UsageReport:
        """A fresh report; `domains` saves a listing when the caller just made one."""
        with self._lock:
            return _Refresh(self, list(self.hv.domains() if domains is None else domains)).run()

    # -- sources ----------------------------------------------------------------------------

    def pool_image(self, path: str, why: list[str]) -> Image | None:
        conn = self.hv.conn
        self.pool_lookups += 1
        try:
            vol = conn.storageVolLookupByPath(path)
        except libvirt.libvirtError:
            vol = None
        if vol is None and self._refresh_pools():
            try:
                vol = conn.storageVolLookupByPath(path)
            except libvirt.libvirtError:
                vol = None
        if vol is None:
            return None
        try:
            # virStorageVolGetInfo re-reads the file on the hypervisor (refreshVol), so the
            # allocation is as live as a local stat.
            _type, capacity, allocation = vol.info()
            key = (path, int(capacity))
            facts = self._vol_xml.get(key)
            if facts is None:
                facts = _volume_facts(vol.XMLDesc(0))
                self._vol_xml[key] = facts
        except libvirt.libvirtError as err:
            why.append(f"storage volume unreadable: {libvirt_message(err)}")
            return None
        fmt, backing, backing_format = facts
        return Image(
            path=path,
            format=fmt,
            virtual_bytes=int(capacity),
            actual_bytes=int(allocation),
            backing=resolve_backing(path, backing) if backing else None,
            backing_format=backing_format,
            source="pool",
        )

    def _refresh_pools(self) -> bool:
        """Rescan active pools (new clone files), at most every 30 s; True if it did."""
        now = time.monotonic()
        if now - self._pools_refreshed_at < _POOL_REFRESH_INTERVAL:
            return False
        self._pools_refreshed_at = now
        try:
            pools = self.hv.conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        except libvirt.libvirtError:
            return False
        for pool in pools:
            # A pool busy building a volume refuses; the next round retries.
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
        return True

    def block_stats(self, names: Iterable[str]) -> dict[str, tuple[int, int, str | None]]:
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
            records = self.hv.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_BLOCK, flags)
        except libvirt.libvirtError:
            return {}
        out: dict[str, tuple[int, int, str | None]] = {}
        for dom, st in records:
            if dom.name() not in wanted:
                continue
            out.update(parse_block_stats(st))
        return out


def saved_templates() -> list[tuple[str, tuple[DiskInfo, ...]]]:
    """The templates virtdeck keeps an XML backup of (see tui.core.templates)."""
    from tui.core.templates import backup_templates

    try:
        return [(b.name, domxml.disks(b.root)) for b in backup_templates()]
    except OSError:
        return []


def parse_block_stats(st: dict[str, Any]) -> dict[str, tuple[int, int, str | None]]:
    """Bulk block stats -> path -> (capacity, physical, backing path).

    With the BACKING flag libvirt lists each disk's chain as consecutive entries with the same
    `name`, top image first. For a running domain `physical` is the file's allocation on the
    host (QEMU's actual-size); `allocation` would be the highest written offset.
    """
    out: dict[str, tuple[int, int, str | None]] = {}
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


def _volume_facts(xml: str) -> tuple[str | None, str | None, str | None]:
    root = ET.fromstring(xml)
    fmt = root.find("target/format")
    backing = root.findtext("backingStore/path")
    backing_fmt = root.find("backingStore/format")
    return (
        fmt.get("type") if fmt is not None else None,
        backing.strip() if backing and backing.strip() else None,
        backing_fmt.get("type") if backing_fmt is not None else None,
    )


def _norm(path: str) -> str:
    """One spelling per file (`/a//b/../c` is `/a/c`); symlinks are left alone (remote too)."""
    return os.path.normpath(path) if path.startswith("/") else path


class _Refresh:
    """One report's worth of work (memoised per path within the refresh)."""

    def __init__(self, collector: UsageCollector, domains: list[DomainInfo]) -> None:
        self.c = collector
        self.domains = domains
        self.images: dict[str, Image] = {}
        self.problems: list[str] = []
        self._stats: dict[str, tuple[int, int, str | None]] | None = None

    def stats(self) -> dict[str, tuple[int, int, str | None]]:
        if self._stats is None:
            running = [d.name for d in self.domains if d.state.active]
            self._stats = self.c.block_stats(running)
        return self._stats

    def image(self, path: str, fmt: str | None) -> Image:
        img = self.images.get(path)
        if img is not None:
            return img
        why: list[str] = []  # reported only when no source at all can tell
        img = self._local(path, fmt, why) if self.c.local else None
        if img is None:
            img = self.c.pool_image(path, why)
        if img is None:
            st = self.stats().get(path)
            if st is not None:
                capacity, physical, backing = st
                img = Image(path, fmt, capacity, physical, backing, None, "blockstats")
        if img is None:
            where = "locally, " if self.c.local else ""
            why.append(f"not found {where}in a storage pool or in running domains' block stats")
            self.problems.append(f"{path}: {'; '.join(why)}")
            img = Image(path, fmt, 0, 0, None, None, "missing")
        self.images[path] = img
        return img

    def _local(self, path: str, fmt: str | None, why: list[str]) -> Image | None:
        try:
            return self.c.reader.read(path, fmt)
        except FileNotFoundError:
            return None
        except OSError as err:
            why.append(str(err.strerror or err))
            return None

    def chain(self, path: str, fmt: str | None) -> tuple[str, ...]:
        out: list[str] = []
        seen: set[str] = set()
        nxt: str | None = _norm(path)
        while nxt is not None and nxt not in seen and len(out) < _MAX_CHAIN:
            seen.add(nxt)
            out.append(nxt)
            img = self.image(nxt, fmt)
            nxt, fmt = (_norm(img.backing) if img.backing else None), img.backing_format
        if nxt is not None:
            self.problems.append(f"{path}: backing chain loops or is deeper than {_MAX_CHAIN}")
        return tuple(out)

    def run(self) -> UsageReport:
        chains: dict[str, tuple[DiskChain, ...]] = {}
        for dom in self.domains:
            disks = []
            for disk in dom.disks:
                if disk.device != "disk" or not disk.path:
                    continue
                disks.append(DiskChain(disk.target, self.chain(disk.path, disk.format)))
            chains[dom.name] = tuple(disks)

        users: dict[str, set[str]] = {}
        for name, dom_disks in chains.items():
            for d in dom_disks:
                for p in d.chain:
                    users.setdefault(p, set()).add(name)

        def actual(paths: Iterable[str]) -> int:
            return sum(self.images[p].actual_bytes for p in set(paths))

        domains = []
        for dom in self.domains:
            paths = {p for d in chains[dom.name] for p in d.chain}
            owned = {p for p in paths if len(users[p]) == 1}
            domains.append(
                DomainUsage(
                    name=dom.name,
                    role=dom.meta.role,
                    disks=chains[dom.name],
                    owned_bytes=actual(owned),
                    shared_bytes=actual(paths - owned),
                )
            )
        templates = self._templates(chains, self._undefined_templates(chains))
        images = tuple(sorted(self.images.values(), key=lambda i: i.path))
        return UsageReport(
            host=self.c.hv.uri,
            images=images,
            templates=templates,
            domains=tuple(domains),
            total_actual_bytes=sum(i.actual_bytes for i in images),
            problems=tuple(dict.fromkeys(self.problems)),
        )

    def _undefined_templates(
        self, chains: dict[str, tuple[DiskChain, ...]]
    ) -> dict[str, tuple[DiskChain, ...]]:
        """Templates with an XML backup but no domain, that this host's domains use.

        Backups are kept on this machine for every host, so one counts here only when a domain
        of this host names it as its source or has one of its images in a backing chain.
        """
        names = {d.name for d in self.domains}
        sources = {d.meta.source for d in self.domains if d.meta.role == "clone"}
        in_use = {p for dom_disks in chains.values() for d in dom_disks for p in d.chain}
        out: dict[str, tuple[DiskChain, ...]] = {}
        for name, disks in self.c.backups():
            if name in names or name in out:
                continue
            own = [d for d in disks if d.device == "disk" and d.path]
            if name in sources or any(_norm(d.path or "") in in_use for d in own):
                out[name] = tuple(
                    DiskChain(d.target, self.chain(d.path or "", d.format)) for d in own
                )
        return out

    def _templates(
        self,
        chains: dict[str, tuple[DiskChain, ...]],
        undefined: dict[str, tuple[DiskChain, ...]],
    ) -> tuple[TemplateUsage, ...]:
        own_chains = {t.name: chains[t.name] for t in self.domains if t.is_template}
        defined = set(own_chains)
        own_chains.update(undefined)
        bases: dict[str, set[str]] = {
            name: {p for d in disks for p in d.chain} for name, disks in own_chains.items()
        }
        first_base = {
            name: (disks[0].path if disks else None) for name, disks in own_chains.items()
        }
        # A template known only from its clones' metadata (undefined, XML backup kept): its
        # base is the bottom of its thin clones' chains.
        for dom in self.domains:
            src = dom.meta.source
            if dom.meta.role != "clone" or not src or src in own_chains:
                continue
            bases.setdefault(src, set())
            first_base.setdefault(src, None)
            for d in chains[dom.name]:
                if len(d.chain) > 1 and dom.meta.mode != "full":
                    bases[src].add(d.chain[-1])
                    first_base[src] = first_base[src] or d.chain[-1]

        thin: dict[str, list[tuple[DiskChain, str]]] = {name: [] for name in bases}
        full: dict[str, list[DiskChain]] = {name: [] for name in bases}
        full_names: dict[str, list[str]] = {name: [] for name in bases}
        for dom in self.domains:
            if dom.is_template:
                continue
            reached: set[str] = set()
            for d in chains[dom.name]:
                # The nearest template in the chain owns the clone (a template of a template).
                owner = next((n for p in d.chain[1:] for n, b in bases.items() if p in b), None)
                if owner is not None:
                    thin[owner].append((d, dom.name))
                    reached.add(owner)
            src = dom.meta.source
            if dom.meta.role == "clone" and src in bases and src not in reached:
                full[src].extend(chains[dom.name])
                full_names[src].extend(dom.name for _ in chains[dom.name])

        out = []
        for name in sorted(bases):
            base_paths = bases[name]
            thin_disks = []
            thin_paths: set[str] = set()
            equivalent = 0
            for d, dom_name in thin[name]:
                cut = next(i for i, p in enumerate(d.chain) if p in base_paths)
                above = d.chain[:cut]
                thin_paths.update(above)
                thin_disks.append(CloneDisk(dom_name, d.path, self._sum(above)))
                whole = self._sum(d.chain)
                equivalent += min(whole, self.images[d.path].virtual_bytes or whole)
            full_disks = []
            full_paths: set[str] = set()
            for fd, dom_name in zip(full[name], full_names[name], strict=True):
                full_paths.update(fd.chain)
                full_disks.append(CloneDisk(dom_name, fd.path, self._sum(fd.chain)))
            out.append(
                TemplateUsage(
                    name=name,
                    base=first_base.get(name),
                    base_bytes=self._sum(base_paths),
                    thin=tuple(thin_disks),
                    full=tuple(full_disks),
                    thin_bytes=self._sum(thin_paths),
                    full_bytes=self._sum(full_paths),
                    full_equivalent_bytes=equivalent,
                    defined=name in defined,
                )
            )
        return tuple(out)

    def _sum(self, paths: Iterable[str]) -> int:
        return sum(self.images[p].actual_bytes for p in set(paths) if p in self.images)
