"""Files virtdeck writes for itself (audit log, undo journals, XML backups, staged keys).

They are opened without following a symbolic link (O_NOFOLLOW), created 0600, and only in a
directory that is ours: a real directory (not a link), owned by this user (or root), that no
group or other user can write (someone who can would swap a file for a link between our
check and our write). Anything else is refused in one line (`UnsafeFileError`), before a
byte is written.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from tui.core.errors import OperationError


class UnsafeFileError(OperationError):
    """A file or directory of virtdeck's own is not safe to write (a link, someone else's)."""


def check_dir(directory: Path, *, create: bool = True) -> None:
    """Make `directory` (0700) if it is missing, then refuse it unless it is ours."""
    if create:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            pass  # a link or a file in its place: refused below
        except OSError as err:
            raise UnsafeFileError(f"cannot create {directory}: {err.strerror}") from None
    try:
        st = os.lstat(directory)
    except OSError as err:
        raise UnsafeFileError(f"{directory}: {err.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError(f"{directory} is a symbolic link; virtdeck writes only in its own")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFileError(f"{directory} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeFileError(f"{directory} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o022:
        raise UnsafeFileError(
            f"{directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            "virtdeck writes its own files only where no one else can"
        )


def open_private(path: Path, flags: int) -> int:
    """A descriptor of `path` (a regular file of ours, mode 0600) in a checked directory."""
    check_dir(path.parent)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:  # the last component is a symbolic link
            raise UnsafeFileError(
                f"{path} is a symbolic link; virtdeck does not write through it"
            ) from None
        raise UnsafeFileError(f"cannot open {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise UnsafeFileError(f"{path} belongs to uid {st.st_uid}, not to this user")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(path: str) -> dict[str, int] | None:
    """What this file is (device, inode, change time), not following a link; None if gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return {"dev": st.st_dev, "ino": st.st_ino, "ctime": st.st_ctime_ns}


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The bytes of a file the user named (a key, the config), at most `limit` of them: the
    size is checked on the open file before reading, and no more than limit + 1 bytes are
    ever read (a FIFO, /dev/zero or a huge sparse file cannot fill memory). ValueError says
    what is wrong; OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"is {st.st_size} bytes, more than the {limit} allowed")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise ValueError(f"grew past the {limit} bytes allowed while being read")
    return b"".join(chunks)
