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

from collections.abc import Sequence
from typing import Any, Protocol

from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress
from tui.core.storage.graph import Freed, ImageUser, Owner, StorageGraph
from tui.core.storage.local import LocalFiles, RemoteHostError, require_local
from tui.core.storage.qemuimg import QemuImg
from tui.core.storage.reader import Image, ImageReader
from tui.core.storage.remote import RemoteFiles
from tui.core.storage.resolver import Chain, Resolver, canonical


class Files(Protocol):
    """What operations read and change image files through: LocalFiles (this machine) or
    RemoteFiles (another host's pools, and SSH), as `files_for` chooses. Every method refuses
    what is not an image file virtdeck may touch (tui.core.storage.local.refuse_control)."""

    operation: str

    @property
    def qemu_img(self) -> QemuImg | None: ...

    # reading
    def lexists(self, path: str) -> bool: ...
    def is_dir(self, path: str) -> bool: ...
    def mode(self, path: str) -> int: ...
    def file_size(self, path: str) -> int | None: ...
    def link_target(self, path: str) -> str | None: ...
    def identity(self, path: str) -> dict[str, Any] | None: ...
    def free_bytes(self, directory: str) -> int: ...
    def free_note(self, directory: str) -> str | None: ...
    def device(self, directory: str) -> int: ...
    def measure(self, path: str, fmt: str) -> int: ...
    def pool_notes(self, paths: Sequence[str]) -> list[str]: ...
    def read_small(self, path: str, limit: int = ...) -> bytes: ...

    # changing
    def create_overlay(self, path: str, backing: str, backing_fmt: str) -> None: ...
    def copy(
        self,
        src: str,
        dst: str,
        *,
        src_fmt: str,
        dst_fmt: str,
        progress: Progress = ...,
        label: str = ...,
    ) -> None: ...
    def copy_file(self, src: str, dst: str) -> None: ...
    def write_new(self, path: str, data: bytes) -> None: ...
    def write_small(self, path: str, data: bytes) -> None: ...
    def commit(self, path: str, fmt: str = ...) -> None: ...
    def rebase_unsafe(self, path: str, backing: str, backing_fmt: str) -> None: ...
    def make_read_only(self, path: str) -> int: ...
    def restore_mode(self, path: str, mode: int) -> None: ...
    def delete(self, path: str) -> bool: ...
    def delete_quietly(self, paths: list[str], progress: Progress = ...) -> list[str]: ...


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
