"""The storage layer: every disk known by kind and place, and the only code that touches images.

- `tui.core.models.DiskKind` / `DiskInfo`: what each disk of a domain is (file, pool volume,
  block device, network disk, host directory, empty drive); only FILE disks have an image path.
- `resolver`: image facts (format, sizes, chain, read-only) from the cheapest honest source,
  cached per hypervisor; unknown stays unknown (None, with the reason), never 0.
- `graph`: one dependency graph (chains, who uses an image, what a removal frees).
- `local`: the backend that changes image files on a hypervisor proved to be this machine;
  `qemuimg` and `reader` are its tools.
- `remote`: the backend for another host: its storage pools through libvirt's remote
  protocol, and SSH to the URI's own target for what libvirt has no API for.
- `files_for(hv, operation)`: the one chooser between them.

No `os.unlink`, `os.chmod` or `qemu-img` call lives outside this package.
"""

from tui.core.hypervisor import Hypervisor
from tui.core.storage.graph import Freed, ImageUser, Owner, StorageGraph
from tui.core.storage.local import LocalFiles, RemoteHostError, require_local
from tui.core.storage.qemuimg import QemuImg
from tui.core.storage.reader import Image, ImageReader
from tui.core.storage.remote import RemoteFiles
from tui.core.storage.resolver import Chain, Resolver, canonical

#: What operations change image files through: this machine's files, or another host's pools.
Files = LocalFiles | RemoteFiles


def files_for(
    hv: Hypervisor, operation: str, *, qemu_img: QemuImg | None = None, define_pools: bool = True
) -> Files:
    """The backend for `hv`: LocalFiles when it is proved to be this machine, else RemoteFiles
    (storage pools, and SSH where the URI has it; steps that need SSH refuse without it)."""
    if hv.local:
        return LocalFiles(hv, operation, qemu_img=qemu_img)
    return RemoteFiles(hv, operation, define_pools=define_pools)


__all__ = [
    "Files",
    "RemoteFiles",
    "files_for",
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
