"""Disk usage of a hypervisor: backing chains, what each domain owns and shares, and what thin
clones save against full copies. A base shared by many clones is counted once in every total.

Where the numbers come from, per image path: the storage resolver (tui.core.storage.resolver):
this machine's file read in-process when the hypervisor is proved to be this machine, else a
libvirt storage volume, else a running domain's bulk block stats. An image none of them knows
is reported with source "missing", sizes None (unknown, never 0) and a problem line; every
total that would include it is None too.

How the totals are defined:
- a thin clone is a non-template domain with a disk whose backing chain reaches an image of a
  template; its cost is the images of that chain above the template's (its overlays);
- a full clone is a domain virtdeck recorded as a clone of the template (meta role "clone",
  source = template) whose chains do not reach it; its cost is its whole chains;
- `full_equivalent_bytes` is what the thin clones would cost as full copies: per thin disk, the
  allocation of its whole chain (base included) capped at the disk's virtual size, which is what
  `qemu-img convert` of that chain allocates at most;
- `saved_bytes` = full_equivalent_bytes - thin_bytes (the base is needed by full clones too).
- a clone whose chain cannot be read (a remote host without a pool for it) is counted by what
  its metadata says it is (thin or full), with unknown sizes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tui.core import domxml
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskInfo, DomainInfo
from tui.core.storage import Resolver
from tui.core.storage.qemuimg import QemuImg
from tui.core.storage.reader import Image, ImageReader
from tui.core.storage.resolver import Pass, parse_block_stats
from tui.core.units import total

__all__ = [
    "CloneDisk",
    "DiskChain",
    "DomainUsage",
    "Image",
    "TemplateUsage",
    "UsageCollector",
    "UsageReport",
    "parse_block_stats",
]

#: Templates known only from an XML backup: (name, disks) pairs.
BackupSource = Callable[[], list[tuple[str, tuple[DiskInfo, ...]]]]


@dataclass(frozen=True)
class CloneDisk:
    """One disk of a clone: its top image and the bytes that clone pays for it."""

    domain: str
    path: str
    actual_bytes: int | None

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
    owned_bytes: int | None
    shared_bytes: int | None

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
    base_bytes: int | None
    thin: tuple[CloneDisk, ...]
    full: tuple[CloneDisk, ...]
    thin_bytes: int | None
    full_bytes: int | None
    full_equivalent_bytes: int | None
    defined: bool = True  # False: known only from its clones' metadata

    @property
    def saved_bytes(self) -> int | None:
        if self.full_equivalent_bytes is None or self.thin_bytes is None:
            return None
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
    total_actual_bytes: int | None
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
    """Builds UsageReports for one hypervisor, keeping the resolver's caches between refreshes.

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
        self.backups = backups or (lambda: saved_templates(hv))
        self.resolver = Resolver(hv, qemu_img=qemu_img, reader=reader, local=local)
        self._lock = threading.Lock()

    @property
    def local(self) -> bool:
        return self.resolver.local

    @property
    def reader(self) -> ImageReader:
        return self.resolver.reader

    @property
    def pool_lookups(self) -> int:
        return self.resolver.pool_lookups

    @property
    def blockstats_calls(self) -> int:
        return self.resolver.blockstats_calls

    def report(self, domains: Sequence[DomainInfo] | None = None) -> UsageReport:
        """A fresh report; `domains` saves a listing when the caller just made one."""
        with self._lock:
            return _Refresh(self, list(self.hv.domains() if domains is None else domains)).run()


def saved_templates(hv: Hypervisor | None = None) -> list[tuple[str, tuple[DiskInfo, ...]]]:
    """The templates virtdeck keeps an XML backup of (of `hv`; see tui.core.templates)."""
    from tui.core.templates import backup_templates

    try:
        return [(b.name, domxml.disks(b.root)) for b in backup_templates(hv=hv)]
    except OSError:
        return []


class _Refresh:
    """One report's worth of work: one resolver pass (memoised per path)."""

    def __init__(self, collector: UsageCollector, domains: list[DomainInfo]) -> None:
        self.c = collector
        self.domains = domains
        running = [d.name for d in domains if d.state.active]
        self.session: Pass = collector.resolver.session(running)
        self.images = self.session.images
        self.problems = self.session.problems
        self.incomplete: set[str] = set()  # domains with a chain that could not be read whole

    def chain(self, path: str, fmt: str | None, owner: str = "") -> tuple[str, ...]:
        chain = self.session.chain(path, fmt)
        if not chain.complete and owner:
            self.incomplete.add(owner)
        return chain.paths

    def run(self) -> UsageReport:
        chains: dict[str, tuple[DiskChain, ...]] = {}
        for dom in self.domains:
            disks = []
            for disk in dom.disks:
                if disk.device != "disk" or not disk.path:
                    continue  # only image files: a block or network disk has no chain here
                disks.append(DiskChain(disk.target, self.chain(disk.path, disk.format, dom.name)))
            chains[dom.name] = tuple(disks)

        users: dict[str, set[str]] = {}
        for name, dom_disks in chains.items():
            for d in dom_disks:
                for p in d.chain:
                    users.setdefault(p, set()).add(name)

        def actual(paths: Iterable[str]) -> int | None:
            return total(self.images[p].actual_bytes for p in set(paths))

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
            total_actual_bytes=total(i.actual_bytes for i in images),
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
            if name in sources or any(self.c.resolver.canonical(d.path or "") in in_use
                                      for d in own):  # fmt: skip
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
            if (
                dom.meta.role == "clone"
                and src in bases
                and src not in reached
                and dom.meta.complete
            ):
                if dom.name in self.incomplete and dom.meta.mode != "full":
                    # Its chain could not be read: trust its metadata, sizes unknown.
                    thin[src].extend((d, dom.name) for d in chains[dom.name])
                else:
                    full[src].extend(chains[dom.name])
                    full_names[src].extend(dom.name for _ in chains[dom.name])

        return tuple(
            self._usage_of(
                name, bases[name], first_base.get(name), thin[name],
                list(zip(full[name], full_names[name], strict=True)), name in defined,
            )
            for name in sorted(bases)
        )  # fmt: skip

    def _usage_of(
        self,
        name: str,
        base_paths: set[str],
        base: str | None,
        thin: list[tuple[DiskChain, str]],
        full: list[tuple[DiskChain, str]],
        defined: bool,
    ) -> TemplateUsage:
        """One template's figures: its base counted once, each thin clone's own layers, each
        full clone's whole chain, what the thin ones would take as full copies."""
        thin_disks = []
        thin_paths: set[str] = set()
        equivalent: int | None = 0
        for d, dom_name in thin:
            cut = next((i for i, p in enumerate(d.chain) if p in base_paths), None)
            if cut is None:  # an unreadable chain (see above): nothing is known of it
                thin_paths.add(d.path)
                thin_disks.append(CloneDisk(dom_name, d.path, None))
                equivalent = None
                continue
            above = d.chain[:cut]
            thin_paths.update(above)
            thin_disks.append(CloneDisk(dom_name, d.path, self._sum(above)))
            whole = self._sum(d.chain)
            virtual = self.images[d.path].virtual_bytes
            if equivalent is not None and whole is not None:
                equivalent += min(whole, virtual or whole)
            else:
                equivalent = None
        full_disks = []
        full_paths: set[str] = set()
        for fd, dom_name in full:
            full_paths.update(fd.chain)
            full_disks.append(CloneDisk(dom_name, fd.path, self._sum(fd.chain)))
        return TemplateUsage(
            name=name,
            base=base,
            base_bytes=self._sum(base_paths),
            thin=tuple(thin_disks),
            full=tuple(full_disks),
            thin_bytes=self._sum(thin_paths),
            full_bytes=self._sum(full_paths),
            full_equivalent_bytes=equivalent,
            defined=defined,
        )

    def _sum(self, paths: Iterable[str]) -> int | None:
        return total(self.images[p].actual_bytes if p in self.images else None
                      for p in set(paths))  # fmt: skip
