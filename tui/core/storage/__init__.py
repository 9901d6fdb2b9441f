"""The storage layer: every disk known by kind and place, and the only code that touches images.

- `tui.core.models.DiskKind` / `DiskInfo`: what each disk of a domain is (file, pool volume,
  block device, network disk, host directory, empty drive); only FILE disks have an image path.
- `resolver`: image facts (format, sizes, chain, read-only) from the cheapest honest source,
  cached per hypervisor; unknown stays unknown (None, with the reason), never 0.
- `graph`: one dependency graph (chains, who uses an image, what a removal frees).
- `local`: the one backend that changes image files, only on a hypervisor proved to be this
  machine; `qemuimg` and `reader` are its tools.

No `os.unlink`, `os.chmod` or `qemu-img` call lives outside this package.
"""

from tui.core.storage.graph import Freed, ImageUser, Owner, StorageGraph
from tui.core.storage.local import LocalFiles, RemoteHostError, require_local
from tui.core.storage.reader import Image, ImageReader
from tui.core.storage.resolver import Chain, Resolver, canonical

__all__ = [
    "Chain",
    "Freed",
    "Image",
    "ImageReader",
    "ImageUser",
    "LocalFiles",
    "Owner",
    "RemoteHostError",
    "Resolver",
    "StorageGraph",
    "canonical",
    "require_local",
]
