"""Template identity across hosts: a content digest of each disk's base, layer by layer.

A template's base is recognised on another hypervisor by what it holds, not by its name or
path: `sha256` of every layer file (tui.core.storage.digest), lowest layer first, per disk,
kept in virtdeck's <metadata> (`VirtdeckMeta.base_identity`). It is computed once: when a
template is made (after sealing, the base read once), and when `template copy` streams the
base (hashed as it passes; the copy carries the same identity, and a source that had none
gets it too). A template made before identities were recorded gets one on demand
(`ensure()`: reads its base once; plans say how many bytes that reads).

`migrate` rebases a clone's own layers onto a base on the target only when both identities
are known and equal; an unknown identity is never taken for a match.

A layer copied by `template copy` into another directory is rebased there (its header names
the new backing path), so its file no longer hashes to the identity: the identity is the one
recorded when the base was streamed and verified, carried with the template, not a figure read
from the file again.
"""

from __future__ import annotations

from collections.abc import Sequence

from tui.core import domxml
from tui.core.catalog import own_images
from tui.core.errors import NotFoundError
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress, no_progress
from tui.core.storage import Resolver
from tui.core.storage.digest import file_digest

Identity = tuple[tuple[str, tuple[str, ...]], ...]


def layers(hv: Hypervisor, xml: str) -> list[tuple[str, list[str], int]]:
    """(disk target, layer paths lowest first, bytes of those files) of a template's disks."""
    resolver = Resolver(hv, ssh=True)
    out = []
    for disk in own_images(domxml.disks(domxml.parse(xml))):
        assert disk.path is not None
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target}: {chain.problem}")
        paths = [img.path for img in reversed(chain.links)]
        size = sum(img.actual_bytes or img.virtual_bytes or 0 for img in chain.links)
        out.append((disk.target, paths, size))
    return out


def cost(hv: Hypervisor, xml: str) -> int:
    """Bytes read to compute an identity (each layer file once)."""
    return sum(size for _t, _p, size in layers(hv, xml))


def compute(hv: Hypervisor, xml: str, progress: Progress = no_progress) -> Identity:
    """Read every layer of the template's base once and digest it."""
    seen: dict[str, str] = {}
    out = []
    for target, paths, _size in layers(hv, xml):
        for path in paths:
            if path not in seen:
                progress(f"checksumming {path} (the template's identity)", None)
                seen[path] = file_digest(hv, path)
        out.append((target, tuple(seen[p] for p in paths)))
    return tuple(out)


def record(hv: Hypervisor, name: str, identity: Identity) -> None:
    """Keep `identity` in the defined template `name`'s metadata."""
    hv.update_meta(name, f"recording the base identity of '{name}'", base_identity=identity)
    hv.invalidate()


def of_xml(xml: str) -> Identity | None:
    return domxml.read_meta(domxml.parse(xml)).base_identity


def ensure(
    hv: Hypervisor, name: str, progress: Progress = no_progress, *, keep: bool = True
) -> tuple[Identity, bool]:
    """(identity, computed now) of the defined template `name`: the recorded one, else read
    from its base (and recorded, with `keep`)."""
    xml = hv.xml(name, inactive=True)
    found = of_xml(xml)
    if found is not None:
        return found, False
    identity = compute(hv, xml, progress)
    if keep:
        record(hv, name, identity)
    return identity, True


def disk_layers(identity: Identity | None, target: str) -> tuple[str, ...] | None:
    for disk, digests in identity or ():
        if disk == target:
            return digests
    return None


def find_base(identity: Identity | None, digests: Sequence[str]) -> str | None:
    """The disk target of `identity` whose base is exactly `digests` (None: none, or unknown)."""
    if not digests:
        return None
    for disk, layers_ in identity or ():
        if tuple(layers_) == tuple(digests):
            return disk
    return None


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]
