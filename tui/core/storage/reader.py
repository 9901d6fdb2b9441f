"""Local image facts (format, virtual size, real allocation, backing file) read cheaply, cached.

A usage refresh looks at every image of every domain every few seconds, so spawning
`qemu-img info` per image (~10-20 ms each) is too slow at a few hundred images. For the two
formats virtdeck makes, the facts are read in-process:

- qcow2: the header (magic, virtual size) and its header extensions (backing file format),
  plus the backing file name the header points to;
- raw: the virtual size is the file size;
- both: the real allocation is `st_blocks * 512`, exactly what `qemu-img info` calls
  actual-size and what `du -B1` prints.

Header facts are cached by (path, st_mtime_ns, st_size, st_ino); the allocation comes from the
one `stat` a refresh makes anyway, so a warm refresh costs one `stat` per image. Anything else
(vmdk, vdi, qcow2 with an external data file, block devices...) falls back to
`qemu-img info -U --backing-chain --output=json`, cached by the same key.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Any

from tui.core.errors import OperationError
from tui.core.storage.qemuimg import QemuImg

QCOW2_MAGIC = b"QFI\xfb"
_EXT_END = 0x00000000
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_MAX_HEADER_READ = 2 * 1024 * 1024

# Magic numbers of formats qemu probes; a file without a known magic is raw (qemu does the same).
_OTHER_MAGICS = (
    (0, b"KDMV"),  # vmdk
    (0, b"# Disk DescriptorFile"),  # vmdk descriptor
    (0, b"QED\x00"),
    (0, b"vhdxfile"),
    (0, b"conectix"),  # vpc
    (0, b"LUKS\xba\xbe"),
    (0, b"WithoutFreeSpace"),  # parallels
    (0, b"WithouFreSpacExt"),  # parallels
    (0, b"Bochs Virtual HD Image"),
    (64, b"\x7f\x10\xda\xbe"),  # vdi
)


@dataclass(frozen=True)
class Image:
    """One image file on its hypervisor: a link of a backing chain.

    `source` says where the numbers came from: "file" (read in-process on this machine),
    "qemu-img", "pool" (libvirt storage volume), "blockstats" (a running domain's bulk block
    stats) or "missing" (nobody could tell). Unknown is not zero: a size nobody could read is
    None, and `reason` says why.
    """

    path: str
    format: str | None
    virtual_bytes: int | None
    actual_bytes: int | None
    backing: str | None = None
    backing_format: str | None = None
    source: str = "file"
    read_only: bool | None = None
    reason: str | None = None

    @property
    def known(self) -> bool:
        return self.source != "missing"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_bytes": self.virtual_bytes,
            "actual_bytes": self.actual_bytes,
            "backing": self.backing,
            "backing_format": self.backing_format,
            "source": self.source,
            "read_only": self.read_only,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class _Header:
    """The cached part of an image's facts: everything but the allocation."""

    format: str | None
    virtual_bytes: int
    backing: str | None
    backing_format: str | None
    source: str


_Key = tuple[int, int, int]


class _NotParsed(Exception):
    """This image needs qemu-img."""


def resolve_backing(image_path: str, backing: str) -> str:
    """qemu resolves a relative backing file name against the overlay's directory."""
    if os.path.isabs(backing) or _is_protocol(backing):
        return backing
    return os.path.normpath(os.path.join(os.path.dirname(image_path), backing))


def _is_protocol(name: str) -> bool:
    return name.startswith("json:") or "://" in name


def probe_format(head: bytes) -> str | None:
    """'qcow2', 'raw', or None when some other format qemu knows (left to qemu-img)."""
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    for offset, magic in _OTHER_MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return None
    return "raw"


def parse_qcow2(path: str, read: Any) -> tuple[int, str | None, str | None]:
    """(virtual size, backing file name as written, backing format) from a qcow2 header.

    `read(offset, length)` returns bytes of the file. Raises _NotParsed for what qemu-img must
    handle (an external data file, a damaged header).
    """
    head = read(0, 4096)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise _NotParsed("not a qcow2 header")
    version, bf_offset, bf_size, cluster_bits, size = struct.unpack_from(">IQIIQ", head, 4)
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise _NotParsed(f"qcow2 version {version}")
    if version == 3:
        if len(head) < 104:
            raise _NotParsed("short qcow2 v3 header")
        (incompat,) = struct.unpack_from(">Q", head, 72)
        (header_length,) = struct.unpack_from(">I", head, 100)
        if incompat & _INCOMPAT_DATA_FILE:
            raise _NotParsed("external data file")
    else:
        header_length = 72
    # Header extensions live in the first cluster, after the header and before the backing name.
    cluster = 1 << cluster_bits
    needed = max(bf_offset + bf_size if bf_offset else 0, header_length + 8)
    if needed > len(head):
        head = read(0, min(cluster, _MAX_HEADER_READ, max(needed, 4096)))
    backing_format = None
    pos = header_length
    end = min(len(head), cluster)
    while pos + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", head, pos)
        if ext_type == _EXT_END:
            break
        data = head[pos + 8 : pos + 8 + ext_len]
        if ext_type == _EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8", "replace")
        elif ext_type == _EXT_DATA_FILE:
            raise _NotParsed("external data file")
        pos += 8 + (ext_len + 7) // 8 * 8
    backing = None
    if bf_offset and bf_size:
        raw = head[bf_offset : bf_offset + bf_size]
        if len(raw) != bf_size:
            raw = read(bf_offset, bf_size)
        if len(raw) != bf_size:
            raise _NotParsed("backing file name beyond the end of the file")
        backing = raw.decode("utf-8", "surrogateescape")
    return size, backing, backing_format


class ImageReader:
    """Reads local image facts, in-process when it can; thread-safe; keeps its cache."""

    def __init__(self, qemu_img: QemuImg | None = None) -> None:
        self.qemu_img = qemu_img or QemuImg()
        self._cache: dict[str, tuple[_Key, _Header]] = {}
        self._lock = threading.Lock()
        #: counters for tests and the benchmark
        self.parsed = 0
        self.qemu_img_calls = 0
        self.hits = 0

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def read(self, path: str, format_hint: str | None = None) -> Image:
        """Facts of the local file `path` (OSError when it cannot be stat'ed or opened).

        `format_hint` is the format the domain XML or the overlay's header declares; it is
        trusted over probing (a raw disk whose guest wrote a qcow2 header stays raw), as qemu
        does.
        """
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "is a directory, not an image", path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key and _compatible(cached[1], format_hint):
            self.hits += 1
            header = cached[1]
        else:
            header = self._read_header(path, st, format_hint)
            with self._lock:
                self._cache[path] = (key, header)
        actual = st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else header.virtual_bytes
        return Image(
            path=path,
            format=header.format,
            virtual_bytes=header.virtual_bytes,
            actual_bytes=actual,
            backing=resolve_backing(path, header.backing) if header.backing else None,
            backing_format=header.backing_format,
            source=header.source,
            read_only=st.st_mode & 0o222 == 0,
        )

    def _read_header(self, path: str, st: os.stat_result, format_hint: str | None) -> _Header:
        if stat.S_ISREG(st.st_mode) and format_hint in (None, "qcow2", "raw"):
            try:
                with open(path, "rb") as f:

                    def read(offset: int, length: int) -> bytes:
                        f.seek(offset)
                        return f.read(length)

                    fmt = format_hint or probe_format(read(0, 512))
                    if fmt == "raw":
                        self.parsed += 1
                        return _Header("raw", st.st_size, None, None, "file")
                    if fmt == "qcow2":
                        size, backing, backing_format = parse_qcow2(path, read)
                        self.parsed += 1
                        return _Header("qcow2", size, backing, backing_format, "file")
            except _NotParsed:
                pass
        return self._qemu_img_header(path, format_hint)

    def _qemu_img_header(self, path: str, format_hint: str | None) -> _Header:
        self.qemu_img_calls += 1
        try:
            chain = self.qemu_img.info(path, backing_chain=True)
        except (ValueError, OperationError) as err:
            raise OSError(f"{path}: {err}") from None
        entries = chain if isinstance(chain, list) else [chain]
        if not entries or not isinstance(entries[0], dict):
            raise OSError(f"{path}: qemu-img info gave no facts")
        headers = [
            _Header(
                format=e.get("format"),
                virtual_bytes=int(e.get("virtual-size", 0)),
                backing=e.get("full-backing-filename") or e.get("backing-filename"),
                backing_format=e.get("backing-filename-format"),
                source="qemu-img",
            )
            for e in entries
            if isinstance(e, dict)
        ]
        # The rest of the chain came with it: cache those links too, each under its own key.
        for prev, header in zip(headers, headers[1:], strict=False):
            if prev.backing and not _is_protocol(prev.backing):
                try:
                    st = os.stat(prev.backing)
                except OSError:
                    break
                with self._lock:
                    self._cache[prev.backing] = ((st.st_mtime_ns, st.st_size, st.st_ino), header)
        return headers[0]


def _compatible(header: _Header, format_hint: str | None) -> bool:
    return format_hint is None or header.format == format_hint
