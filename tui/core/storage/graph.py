"""One dependency graph of the images of a hypervisor: chains, who uses an image, who depends
on it, and what a removal frees.

Read once per question from libvirt (every domain's live and inactive definitions, and the
templates virtdeck keeps only as XML backups) and from the images themselves (through the
resolver, so it works on facts, never on guesses). `rm`, templates, usage and snapshot
revert/delete all ask it instead of walking chains of their own.

Only FILE disks have chains: a block device, a network disk or an empty drive is never a link
of anything (its source string may name an unrelated local file).
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import libvirt

from tui.core import domxml
from tui.core.errors import NotFoundError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskInfo, DiskKind
from tui.core.storage.resolver import Chain, Pass, Resolver


@dataclass(frozen=True)
class Owner:
    """A domain (its live and inactive disks), or a template known only from its XML backup."""

    name: str
    disks: tuple[DiskInfo, ...]
    defined: bool = True


@dataclass(frozen=True)
class ImageUser:
    """A domain (or an undefined template's backup) that reads an image."""

    name: str
    image: str  # the image it reads (canonical path)
    how: str  # "backing" (it builds on it, e.g. a thin clone) or "disk" (uses the very file)
    defined: bool = True

    def __str__(self) -> str:
        return self.name if self.defined else f"{self.name} (undefined template)"


@dataclass(frozen=True)
class OwnedChain:
    owner: str
    defined: bool
    disk: DiskInfo
    chain: Chain


@dataclass(frozen=True)
class Freed:
    """What removing some images frees: files to delete, and files kept with the reason."""

    delete: tuple[str, ...]
    kept: tuple[tuple[str, str], ...]  # (path, why)


def domain_owners(hv: Hypervisor) -> list[Owner]:
    """Every domain with the disks of its live and (when it differs) inactive definition.

    Fresh XML, not the inventory cache: a clone defined a moment ago by another client counts.
    """
    owners: list[Owner] = []
    for dom in hv.call(hv.conn.listAllDomains, 0, what="listing domains"):
        try:
            with hv.translating("listing domains"):
                name = dom.name()
                xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
                if dom.isActive():
                    xmls.append(dom.XMLDesc(0))
        except NotFoundError:
            continue  # undefined since the list call
        disks: dict[tuple[str, str | None], DiskInfo] = {}
        for xml in xmls:
            for d in domxml.disks(domxml.parse(xml)):
                disks.setdefault((d.target, d.path or d.source), d)
        owners.append(Owner(name, tuple(disks.values())))
    return owners


class StorageGraph:
    """Who uses which image on one hypervisor, as read at one moment."""

    def __init__(
        self, resolver: Resolver, owners: Sequence[Owner], *, running: Iterable[str] = ()
    ) -> None:
        self.resolver = resolver
        self.session: Pass = resolver.session(running)
        self.owners = list(owners)
        self.chains: list[OwnedChain] = []
        for owner in self.owners:
            for disk in owner.disks:
                if disk.kind == DiskKind.FILE and disk.path:
                    chain = self.session.chain(disk.path, disk.format)
                    self.chains.append(OwnedChain(owner.name, owner.defined, disk, chain))
        self._loose: dict[str, Chain] = {}
        self._scanned: set[str] = set()

    @classmethod
    def read(
        cls,
        hv: Hypervisor,
        *,
        resolver: Resolver | None = None,
        extra_owners: Iterable[Owner] = (),
    ) -> StorageGraph:
        owners = domain_owners(hv)
        names = {o.name for o in owners}
        owners += [o for o in extra_owners if o.name not in names]
        return cls(resolver or Resolver(hv), owners)

    @property
    def problems(self) -> list[str]:
        return list(dict.fromkeys(self.session.problems))

    def canonical(self, path: str) -> str:
        return self.resolver.canonical(path)

    def chain(self, path: str, fmt: str | None = None) -> Chain:
        return self.session.chain(path, fmt)

    def chain_paths(self, path: str, fmt: str | None = None) -> tuple[str, ...]:
        return self.session.chain(path, fmt).paths

    # -- who uses what ----------------------------------------------------------------------

    def users(self, images: Iterable[str], *, exclude: str | None = None) -> list[ImageUser]:
        """Every owner other than `exclude` whose disks are, or build on, one of `images`."""
        wanted = {self.canonical(p) for p in images}
        out: list[ImageUser] = []
        seen: set[tuple[str, str]] = set()
        for oc in self.chains:
            if oc.owner == exclude:
                continue
            for i, path in enumerate(oc.chain.paths):
                if path in wanted and (oc.owner, path) not in seen:
                    seen.add((oc.owner, path))
                    out.append(ImageUser(oc.owner, path, "disk" if i == 0 else "backing",
                                         oc.defined))  # fmt: skip
        return out

    def scan(self, directories: Iterable[str]) -> None:
        """Also know the images lying in these directories of this machine (overlays made by
        hand or by other tools): a file whose chain reaches an image keeps it alive."""
        if not self.resolver.local:
            self._scan_pools(directories)
            return
        for directory in directories:
            if directory in self._scanned:
                continue
            self._scanned.add(directory)
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    path = self.canonical(entry.path)
                    if path not in self._loose:
                        self._loose[path] = self.session.chain(entry.path)

    def _scan_pools(self, directories: Iterable[str]) -> None:
        """On another host: the volumes of the pools that are these directories."""
        hv = self.resolver.hv
        wanted = {os.path.normpath(d) for d in directories} - self._scanned
        if not wanted:
            return
        self._scanned |= wanted
        try:
            pools = hv.call(
                hv.conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
            )
            for pool in pools:
                root = ET.fromstring(hv.call(pool.XMLDesc, 0))
                target = root.findtext("target/path")
                if not target or os.path.normpath(target.strip()) not in wanted:
                    continue
                with contextlib.suppress(VirtdeckError):
                    hv.call(pool.refresh, 0)
                for vol in hv.call(pool.listAllVolumes, 0):
                    path = self.canonical(hv.call(vol.path))
                    if path not in self._loose:
                        self._loose[path] = self.session.chain(path)
        except VirtdeckError:
            return  # the chains of the domains still protect what they use

    def children(self, path: str) -> set[str]:
        """Known images whose backing file is `path`."""
        out: set[str] = set()
        for chain in [oc.chain for oc in self.chains] + list(self._loose.values()):
            paths = chain.paths
            for upper, lower in zip(paths, paths[1:], strict=False):
                if lower == path:
                    out.add(upper)
        return out

    # -- what a removal frees ---------------------------------------------------------------

    def freed(
        self,
        before: Iterable[str],
        *,
        exclude: str,
        keep: Iterable[str] = (),
        own_tops: Iterable[str] = (),
        read_only_is_shared: bool = False,
    ) -> Freed:
        """Files in the chains of `before` (existing image files of this machine, nearest
        first) that nothing else needs once the owner `exclude` lets them go.

        Kept: what `keep` chains reach; what any other owner's disks reach; what an image
        lying beside them builds on; with `read_only_is_shared`, a read-only link (a template's
        base) and everything under it, unless it is one of `own_tops` (the owner's own disks).
        """
        tops = {self.canonical(p) for p in own_tops}
        order: list[str] = []
        why: dict[str, str] = {}
        for root in before:
            below_shared = False
            for img in self.session.chain(root).links:
                path = img.path
                if path not in order:
                    order.append(path)
                if path not in tops and read_only_is_shared and img.read_only:
                    below_shared = True
                if below_shared:
                    why.setdefault(path, "read-only: a template's base or under one")
        for root in keep:
            for path in self.session.chain(root).paths:
                why.setdefault(path, "still in use")
        for oc in self.chains:
            if oc.owner != exclude:
                for path in oc.chain.paths:
                    why.setdefault(path, f"used by {oc.owner}" + ("" if oc.defined else
                                   " (undefined template)"))  # fmt: skip
        self.scan({os.path.dirname(p) for p in order if p.startswith("/")})
        candidates = {p for p in order if p not in why}
        for path, chain in self._loose.items():
            if path in candidates:
                continue
            for lower in chain.paths[1:]:
                if lower in candidates:
                    why.setdefault(lower, f"backs {path}")
        candidates = {p for p in order if p not in why}
        changed = True
        while changed:  # a candidate something outside the candidates builds on stays
            changed = False
            for c in sorted(candidates):
                outside = sorted(u for u in self.children(c) if u not in candidates)
                if outside:
                    candidates.discard(c)
                    why[c] = f"backs {outside[0]}"
                    changed = True
        delete = []
        for path in order:
            if path in candidates and self._deletable(path):
                delete.append(path)
        kept = tuple((p, why[p]) for p in order if p in why and self._exists(p))
        return Freed(tuple(delete), kept)

    def _exists(self, path: str) -> bool:
        return self.session.image(path).known

    def _deletable(self, path: str) -> bool:
        """An image file of this hypervisor: read here when it is this machine; a pool
        volume or a file qemu-img read over SSH on another host (never a block-stats guess)."""
        img = self.session.image(path)
        if self.resolver.local:
            return img.known and img.source in ("file", "qemu-img")
        return img.known and img.source in ("pool", "ssh")
