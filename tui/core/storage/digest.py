"""Content digests of image files: sha256 over every byte of the file, a hole read as zeros.

The figure is the same whichever way the file is read: on this machine (read), on another host
over SSH (`sha256sum`), through libvirt's sparse volume download (the data hashed, each hole
hashed as that many zeros), or while a sparse stream carries it to another host. So a layer
streamed to another hypervisor can be proved to be the same file there, and a template's base
can be recognised on two hosts (tui.core.baseid) without sending it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import libvirt

from tui.core.errors import OperationError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.storage.qemuimg import last_line

PREFIX = "sha256:"
_ZERO = bytes(1 << 20)
_CHUNK = 1 << 20


class StreamDigest:
    """sha256 of a file fed as data and holes, in order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.length = 0

    def data(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self.length += len(chunk)

    def hole(self, n: int) -> None:
        self.length += n
        view = memoryview(_ZERO)
        while n > 0:
            k = min(n, len(_ZERO))
            self._h.update(view[:k])
            n -= k

    def hexdigest(self) -> str:
        return PREFIX + self._h.hexdigest()


class BackgroundDigest:
    """A StreamDigest fed from the stream's thread and computed on another: the next chunk
    travels while this one is hashed (hashlib lets go of the GIL on large buffers), so hashing
    what is sent adds no time to the copy. A context manager: its thread ends on the way out,
    whatever happened to the stream."""

    def __init__(self) -> None:
        self._digest = StreamDigest()
        self._queue: queue.Queue[bytes | int | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="stream-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, int):
                self._digest.hole(item)
            else:
                self._digest.data(item)

    def data(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hole(self, n: int) -> None:
        self._queue.put(n)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def __enter__(self) -> BackgroundDigest:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def file_digest(hv: Hypervisor, path: str, report: Callable[[int], None] | None = None) -> str:
    """The digest of the image file `path` on `hv`'s host: read here when `hv` is this
    machine, `sha256sum` over the URI's SSH, else downloaded through its storage pool."""
    if hv.local:
        return _local(path, report)
    from tui.core.storage.remote import RemoteFiles

    files = RemoteFiles(hv, "reading a checksum")
    if files.ssh is not None and path.startswith("/"):
        # openssl where the host has it: ~4x faster than coreutils' sha256sum (measured on
        # Debian 12: 0.25 s against 1.16 s for 200 MiB); the same figure.
        script = (
            'if command -v openssl >/dev/null 2>&1; then exec openssl dgst -sha256 -r "$1"; '
            'fi; exec sha256sum -- "$1"'
        )
        out = files.ssh.check(["sh", "-c", script, "sh", path], f"checksumming {path}")
        digest = out.split(" ", 1)[0].strip()
        if len(digest) != 64:
            raise OperationError(f"sha256sum of {path} on {hv.uri}: {last_line(out)}")
        return PREFIX + digest
    vol = files._volume(path)
    if vol is None:
        files.ensure_pool(os.path.dirname(path))
        vol = files._volume(path)
    if vol is None:
        raise OperationError(f"{path} is not a storage volume on {hv.uri}: cannot checksum it")
    return download_digest(hv, vol, report)


def _local(path: str, report: Callable[[int], None] | None) -> str:
    h = StreamDigest()
    try:
        with open(path, "rb", buffering=0) as fh:
            while True:
                chunk = fh.read(8 * _CHUNK)
                if not chunk:
                    break
                h.data(chunk)
                if report is not None:
                    report(h.length)
    except OSError as err:
        raise OperationError(f"cannot read {path}: {err.strerror}") from None
    return h.hexdigest()


def download_digest(hv: Hypervisor, vol: Any, report: Callable[[int], None] | None = None) -> str:
    """The digest of a pool volume, downloaded sparse (only its data crosses the wire)."""
    flag = getattr(libvirt, "VIR_STORAGE_VOL_GET_PHYSICAL", None)
    length = int(hv.call(vol.infoFlags, flag)[2]) if flag is not None else int(hv.call(vol.info)[2])
    st = hv.call(hv.conn.newStream, 0)
    h = StreamDigest()
    try:
        with hv.translating("downloading an image to checksum it"):
            vol.download(st, 0, length, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
            while True:
                got = st.recvFlags(_CHUNK, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
                if got == -3:
                    h.hole(st.recvHole(0))
                elif isinstance(got, int):
                    raise OperationError(f"download stream returned {got}")
                elif not got:
                    break
                else:
                    h.data(got)
                if report is not None:
                    report(h.length)
            st.finish()
    except BaseException:
        with contextlib.suppress(VirtdeckError):
            hv.call(st.abort)
        raise
    return h.hexdigest()
