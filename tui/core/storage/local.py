"""The one place virtdeck changes image files: create, copy, overlay, chmod, commit, delete.

A LocalFiles is made for one operation on one hypervisor, and only when that hypervisor is
proved to be this machine (`Hypervisor.local`: a local socket and this host's name); for
another host it refuses in one line naming the operation and the host. Every method then
checks what it is about to touch: only regular files are changed or deleted (never a block
device, a directory or a device node), a new file is never written over an existing one, and
`qemu-img` runs with argument lists, never a shell.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

from tui.core import private
from tui.core.errors import InvalidInputError, OperationError
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress, no_progress
from tui.core.storage.qemuimg import QemuImg
from tui.core.text import has_control, printable

READ_ONLY = 0o444


class AlreadyExists(InvalidInputError):
    """A file virtdeck was about to create exists: it is someone else's, never overwritten."""


class RemoteHostError(InvalidInputError):
    """The operation needs image files on this machine, and the hypervisor is another host."""


def require_local(hv: Hypervisor, operation: str) -> None:
    if not hv.local:
        raise RemoteHostError(
            f"{operation} needs the image files on this machine, and {hv.uri} is another host: "
            "virtdeck does not change remote image files yet (run virtdeck on that host)"
        )


#: The largest "small file" read whole into memory (NVRAM variables are 128 KiB to 4 MiB).
SMALL_FILE_LIMIT = 64 << 20


def refuse_control(path: str, operation: str) -> None:
    """A path with a control character in it is never changed (see DiskKind.UNSAFE)."""
    if has_control(path):
        raise InvalidInputError(
            f"{operation}: {printable(path)} holds a control character; virtdeck changes no "
            "file by such a name"
        )


def _regular(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OperationError(f"{what}: {path} does not exist") from None
    except OSError as err:
        raise OperationError(f"{what}: {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OperationError(f"{what}: {path} is {kind}; virtdeck only changes image files")
    return st


class LocalFiles:
    """Image files of a hypervisor proved to be this machine, for one named operation."""

    def __init__(self, hv: Hypervisor, operation: str, *, qemu_img: QemuImg | None = None) -> None:
        require_local(hv, operation)
        self.operation = operation
        self.qemu_img = qemu_img or QemuImg()

    # -- reading ----------------------------------------------------------------------------

    @staticmethod
    def lexists(path: str) -> bool:
        return os.path.lexists(path)

    @staticmethod
    def is_dir(path: str) -> bool:
        return os.path.isdir(path)

    def mode(self, path: str) -> int:
        return stat.S_IMODE(_regular(path, self.operation).st_mode)

    @staticmethod
    def file_size(path: str) -> int | None:
        return os.stat(path).st_size if os.path.isfile(path) else None

    @staticmethod
    def pool_notes(paths: object) -> list[str]:
        """Nothing to tell: local image directories need no storage pool."""
        return []

    @staticmethod
    def link_target(path: str) -> str | None:
        """Where a symbolic link at `path` leads (resolved), or None if it is not one."""
        return os.path.realpath(path) if os.path.islink(path) else None

    @staticmethod
    def identity(path: str) -> dict[str, Any] | None:
        """What the file at `path` is (device, inode, change time; a link itself, never
        followed), recorded by an undo journal right after a step made it; None if gone."""
        return private.identity(path)

    @staticmethod
    def free_bytes(directory: str) -> int:
        """The space a user (not root) can write: f_bavail (the blocks reserved for root are
        not counted; the guests' QEMU processes do not run as root)."""
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize

    @staticmethod
    def free_note(directory: str) -> str | None:
        return None  # statvfs: the figure is exact

    @staticmethod
    def device(directory: str) -> int:
        return os.stat(directory).st_dev

    def measure(self, path: str, fmt: str) -> int:
        """Bytes a sparse copy needs (`qemu-img measure`: allocated clusters)."""
        return self.qemu_img.measure(path, fmt)

    # -- changing ---------------------------------------------------------------------------

    def _new(self, path: str) -> None:
        refuse_control(path, self.operation)
        if os.path.lexists(path):
            raise AlreadyExists(f"{path} already exists; virtdeck never overwrites a file")
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise InvalidInputError(f"{parent} is not a directory")

    def create_overlay(self, path: str, backing: str, backing_fmt: str) -> None:
        """A new qcow2 overlay whose backing file (absolute, with its format) is `backing`."""
        self._new(path)
        _regular(backing, self.operation)
        self.qemu_img.create_overlay(path, backing, backing_fmt)

    def copy(
        self,
        src: str,
        dst: str,
        *,
        src_fmt: str,
        dst_fmt: str,
        progress: Progress = no_progress,
        label: str = "copying",
    ) -> None:
        """A full, independent copy of `src` and its chain (sparse stays sparse)."""
        self._new(dst)
        _regular(src, self.operation)
        self.qemu_img.convert(
            src, dst, src_fmt=src_fmt, dst_fmt=dst_fmt, progress=progress, label=label
        )

    def export_snapshot(self, src: str, snapshot: str, dst: str) -> None:
        """The state of internal snapshot `snapshot` of `src` into the new file `dst`."""
        self._new(dst)
        _regular(src, self.operation)
        try:
            self.qemu_img.export_snapshot(src, snapshot, dst)
        except BaseException:
            if os.path.lexists(dst):
                os.unlink(dst)
            raise

    def write_new(self, path: str, data: bytes) -> None:
        """A new small file (a cloud-init seed: it holds keys) with `data`, mode 0600; never
        over an existing one; a partial file is removed."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(path)
            raise

    def copy_file(self, src: str, dst: str) -> None:
        """Copy a small file byte for byte (a template's NVRAM variables) to the new file
        `dst`, mode 0600 as libvirt keeps NVRAM (it hands it to QEMU's user at start). Never
        overwrites; a partial copy is removed."""
        _regular(src, self.operation)
        try:
            with open(src, "rb") as fin:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    with os.fdopen(fd, "wb") as fout:
                        shutil.copyfileobj(fin, fout, 1024 * 1024)
                        fout.flush()
                        os.fsync(fout.fileno())
                except BaseException:
                    os.unlink(dst)
                    raise
        except FileExistsError:
            raise AlreadyExists(f"{dst} appeared meanwhile; nothing was kept") from None
        except OSError as err:
            raise OperationError(f"copying {src} to {dst}: {err.strerror}") from None

    def read_small(self, path: str, limit: int = SMALL_FILE_LIMIT) -> bytes:
        """The bytes of a small regular file (NVRAM variables)."""
        st = _regular(path, self.operation)
        if st.st_size > limit:
            raise OperationError(f"{self.operation}: {path} is larger than {limit} bytes")
        try:
            with open(path, "rb") as fh:
                return fh.read(limit + 1)
        except OSError as err:
            raise OperationError(f"reading {path}: {err.strerror}") from None

    def write_small(self, path: str, data: bytes) -> None:
        """A new small file `path` holding `data` (write_new, with its errors said as one
        line)."""
        refuse_control(path, self.operation)
        try:
            self.write_new(path, data)
        except FileExistsError:
            raise AlreadyExists(
                f"{path} already exists; virtdeck never overwrites a file"
            ) from None
        except OSError as err:
            raise OperationError(f"writing {path}: {err.strerror}") from None

    def commit(self, path: str, fmt: str = "qcow2") -> None:
        """Write the overlay `path` into its backing file (a shut-off domain's disk)."""
        _regular(path, self.operation)
        self.qemu_img.commit(path, fmt)

    def rebase_unsafe(self, path: str, backing: str, backing_fmt: str) -> None:
        _regular(path, self.operation)
        _regular(backing, self.operation)
        self.qemu_img.rebase_unsafe(path, backing, backing_fmt)

    def make_read_only(self, path: str) -> int:
        """chmod 0444; returns the mode it had (for undo)."""
        refuse_control(path, self.operation)
        old = stat.S_IMODE(_regular(path, self.operation).st_mode)
        os.chmod(path, READ_ONLY)
        return old

    def restore_mode(self, path: str, mode: int) -> None:
        _regular(path, self.operation)
        os.chmod(path, mode)

    def delete(self, path: str) -> bool:
        """Delete an image file; False when it was already gone. Refuses anything but a
        regular file (a symlink is removed, never what it points to)."""
        refuse_control(path, self.operation)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise OperationError(
                f"{self.operation}: {path} is not a regular file; virtdeck never deletes it"
            )
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise OperationError(
                f"{self.operation}: cannot delete {path}: {err.strerror}"
            ) from None
        return True

    def delete_quietly(self, paths: list[str], progress: Progress = no_progress) -> list[str]:
        """Delete what can be deleted (undo and clean-up paths); returns what is left."""
        left = []
        for path in paths:
            try:
                self.delete(path)
            except OperationError as err:
                progress(str(err), None)
                left.append(path)
        return left


def write_private(path: str, text: str) -> None:
    """A new file of virtdeck's own on this machine that only its owner can read (a template's
    XML backup holds the secure XML); never written over an existing one."""
    fd = private.open_private(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    except BaseException:
        remove_private(path)
        raise


def remove_private(path: str) -> bool:
    """Remove a file of virtdeck's own (an XML backup); False when it was not there."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:
        raise OperationError(f"cannot remove {path}: {err.strerror}") from None
    return True
