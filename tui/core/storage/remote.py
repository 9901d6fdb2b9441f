"""Image files of another host: libvirt's storage pools first, SSH only for what libvirt lacks.

A RemoteFiles offers the methods operations use on LocalFiles, for a hypervisor that is not
this machine, without touching a single local file:

- through libvirt's own remote protocol (storage pools): whether an image exists, its mode,
  free space (`pool.info`), thin overlays (`pool.createXML` with a `<backingStore>`), full
  copies (`createXMLFrom`, progress by polling the new volume's `info()`), deletion
  (`vol.delete`). An image directory no active pool covers gets a directory pool defined
  (and started, autostarted) for it, as virt-manager does; plans say so beforehand
  (`pool_notes`).
- over SSH to the very target of the `qemu+ssh://` URI (user, host, port, keyfile,
  no_verify; BatchMode, a connect timeout), with argument lists quoted by `shlex`: what
  libvirt has no API for — chmod (a template's read-only base), `qemu-img commit/rebase/
  measure`, copying a small non-image file (NVRAM), virt-sysprep. On a transport without SSH
  (`qemu+tls://`, `qemu+tcp://`) those steps are refused with the reason.

SSH children run through tui.core.procs, so cancelling an operation ends them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import re
import shlex
import socket
import stat
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import libvirt

from tui.core import procs
from tui.core.errors import NotFoundError, OperationError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress, no_progress
from tui.core.storage.local import (
    SMALL_FILE_LIMIT,
    AlreadyExists,
    RemoteHostError,
    refuse_control,
)
from tui.core.storage.qemuimg import QemuImg, last_line

READ_ONLY = 0o444
SSH_CONNECT_TIMEOUT = 10
SSH_SHARED_IDLE = 10  # s: a shared connection ends this long after its last command
SSH_SHARED_SESSIONS = 8  # commands at once over one shared connection (sshd: MaxSessions 10)
_SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
_POLL_INTERVAL = 0.5


@dataclass(frozen=True)
class SshTarget:
    """Where a `qemu+ssh://` URI's daemon lives, as ssh(1) reaches it."""

    host: str
    user: str | None = None
    port: int | None = None
    keyfile: str | None = None
    no_verify: bool = False
    known_hosts: str | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def options(self) -> list[str]:
        argv = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
                "-o", "LogLevel=ERROR"]  # fmt: skip
        if self.port:
            argv += ["-p", str(self.port)]
        if self.keyfile:
            argv += ["-i", self.keyfile]
        if self.no_verify:
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        elif self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return argv

    def argv(self, command: Sequence[str], *, control: str | None = None) -> list[str]:
        """ssh argv running `command` on the host (one shell-quoted string, no injection);
        `control`: over the shared connection whose socket that is (a new connection of
        its own when that connection has gone)."""
        shared = ["-o", "ControlMaster=no", "-o", f"ControlPath={control}"] if control else []
        return ["ssh", *self.options(), *shared, self.destination, shlex.join(command)]

    def master_argv(self, control: str) -> list[str]:
        """ssh argv of a shared connection (in the background once authenticated) that ends
        SSH_SHARED_IDLE seconds after its last command."""
        return ["ssh", *self.options(), "-o", "ControlMaster=yes", "-o", f"ControlPath={control}",
                "-o", f"ControlPersist={SSH_SHARED_IDLE}", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", "-N", "-f", self.destination]  # fmt: skip


class _Shared:
    """One SSH connection per host shared by virtdeck's commands (OpenSSH's ControlMaster):
    a migration runs half a dozen short commands on the target, and a new connection costs
    ~0.2 s each on loopback (more across a network) where a shared one costs milliseconds.

    The sockets live in a directory only this user can enter; a connection is made for
    exactly one set of ssh options (so one made without host key checks never serves a
    command that asked for them), started in the background after authenticating, and ends
    by itself SSH_SHARED_IDLE seconds after its last command (it outlives virtdeck by at most
    that). A command that cannot use it (no private directory, the connection failed or
    went, SSH_SHARED_SESSIONS commands already on it: sshd allows 10 by default) connects on
    its own, as before. VIRTDECK_SSH_SHARED=0 turns it off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._busy: dict[str, int] = {}
        self._failed: dict[str, tuple[float, OperationError]] = {}  # when and why, per socket

    @staticmethod
    def _directory() -> str | None:
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        path = os.path.join(base, f"virtdeck-ssh-{os.getuid()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        private = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
        return path if private and not st.st_mode & 0o077 else None

    @staticmethod
    def _alive(control: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(control)
            except OSError:
                return False
        return True

    def _start(self, target: SshTarget, control: str) -> bool:
        if self._alive(control):
            return True
        # Another virtdeck may be starting the same connection: one at a time (a second
        # master that finds the socket taken would go on as a plain connection, for ever).
        fd = os.open(control + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._alive(control) or self._start_master(target, control)
        finally:
            os.close(fd)

    def _start_master(self, target: SshTarget, control: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)  # a connection that was killed left its socket (ours: private)
        with tempfile.TemporaryFile() as err:
            # Its stderr is a file, not a pipe: the connection in the background keeps it.
            proc = procs.popen(target.master_argv(control), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
            try:
                proc.wait()
            finally:
                procs.finish(proc)
            if proc.returncode == 255:  # (a host that does not answer: once, not twice)
                err.seek(0)
                why = last_line(err.read().decode(errors="replace"))
                raise OperationError(f"ssh to {target.destination} failed: {why}")
        return proc.returncode == 0 and self._alive(control)

    @contextlib.contextmanager
    def use(self, target: SshTarget) -> Iterator[str | None]:
        """The control socket for one command (None: the command connects on its own)."""
        if os.environ.get("VIRTDECK_SSH_SHARED", "1") == "0":
            yield None
            return
        directory = self._directory()
        if directory is None:
            yield None
            return
        key = hashlib.sha256("\0".join([*target.options(), target.destination]).encode())
        control = os.path.join(directory, key.hexdigest()[:24])
        with self._lock:
            host_lock = self._host_locks.setdefault(control, threading.Lock())
            full = self._busy.get(control, 0) >= SSH_SHARED_SESSIONS
            if not full:
                self._busy[control] = self._busy.get(control, 0) + 1
        if full:
            yield None
            return
        try:
            asked = time.monotonic()
            with host_lock:
                failed = self._failed.get(control)
                if failed is not None and failed[0] >= asked:
                    raise failed[1]  # it failed while this one waited: not 10 s more each
                try:
                    ok = self._start(target, control)
                except OperationError as err:
                    self._failed[control] = (time.monotonic(), err)
                    raise
            yield control if ok else None
        finally:
            with self._lock:
                self._busy[control] -= 1


_SHARED = _Shared()


def ssh_target(uri: str) -> SshTarget | None:
    """The SSH target of a `qemu+ssh://` (or libssh) URI; None for any other transport."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if transport not in _SSH_TRANSPORTS or not parts.hostname:
        return None
    if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        return None  # never an ssh option smuggled in as a host or user name
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return SshTarget(
        host=parts.hostname,
        user=unquote(parts.username) if parts.username else None,
        port=parts.port,
        keyfile=query.get("keyfile"),
        no_verify=query.get("no_verify", "0") not in ("", "0"),
        known_hosts=query.get("known_hosts"),
    )


def no_ssh_reason(uri: str) -> str:
    transport = urlsplit(uri).scheme.partition("+")[2] or "tls"
    return (
        f"{uri} is reached over {transport}, not SSH, and libvirt has no API for it "
        "(use a qemu+ssh:// URI for this host)"
    )


class Ssh:
    """Commands on the hypervisor over SSH, as children that end with the operation."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        with _SHARED.use(self.target) as control:
            proc = procs.run(self.target.argv(argv, control=control))
        if proc.returncode == 255:
            raise OperationError(
                f"ssh to {self.target.destination} failed: {last_line(proc.stderr)}"
            )
        return subprocess.CompletedProcess(list(argv), proc.returncode, proc.stdout, proc.stderr)

    def run_bytes(
        self, argv: Sequence[str], data: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """run() with bytes: `data` on the command's standard input, its output as it is."""
        with _SHARED.use(self.target) as control:
            proc = procs.run_bytes(self.target.argv(argv, control=control), data)
        err = proc.stderr.decode(errors="replace")
        if proc.returncode == 255:
            raise OperationError(f"ssh to {self.target.destination} failed: {last_line(err)}")
        return proc

    def check(self, argv: Sequence[str], what: str) -> str:
        proc = self.run(argv)
        if proc.returncode != 0:
            raise OperationError(f"{what} on {self.target.host}: {last_line(proc.stderr)}")
        return proc.stdout

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None]) -> int:
        """Run `argv` on the host, handing each output line to `on_line` (virt-sysprep)."""
        with _SHARED.use(self.target) as control:
            return procs.stream(self.target.argv(argv, control=control), on_line)


@dataclass(frozen=True)
class _Pool:
    pool: Any  # virStoragePool
    name: str
    path: str


class RemoteFiles:
    """Image files of a hypervisor on another host, for one named operation."""

    def __init__(self, hv: Hypervisor, operation: str, *, define_pools: bool = True) -> None:
        self.hv = hv
        self.operation = operation
        self.define_pools = define_pools
        target = ssh_target(hv.uri)
        self.ssh = Ssh(target) if target is not None else None
        self.qemu_img = QemuImg(runner=self._run_argv) if self.ssh else None
        self._pools: list[_Pool] | None = None
        self._refreshed: set[str] = set()
        self.defined_pools: list[str] = []

    # -- plumbing ---------------------------------------------------------------------------

    def _need_ssh(self, what: str) -> Ssh:
        if self.ssh is None:
            raise RemoteHostError(f"{self.operation}: {what}: {no_ssh_reason(self.hv.uri)}")
        return self.ssh

    def _run_argv(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return self._need_ssh(f"running {argv[0]}").run(argv)

    def _sh(self, script: str, *args: str, what: str) -> subprocess.CompletedProcess[str]:
        return self._need_ssh(what).run(["sh", "-c", script, "sh", *args])

    def pools(self) -> list[_Pool]:
        """Active pools whose volumes are files in one directory (dir, fs, netfs)."""
        if self._pools is None:
            found = []
            pools = self.hv.call(
                self.hv.conn.listAllStoragePools,
                libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE,
                what="listing storage pools",
            )
            for pool in pools:
                try:
                    root = ET.fromstring(self.hv.call(pool.XMLDesc, 0))
                    name = self.hv.call(pool.name)
                except VirtdeckError:
                    continue
                path = root.findtext("target/path")
                if root.get("type") in ("dir", "fs", "netfs") and path:
                    found.append(_Pool(pool, name, posixpath.normpath(path.strip())))
            self._pools = found
        return self._pools

    def pool_of(self, directory: str) -> _Pool | None:
        directory = posixpath.normpath(directory)
        for p in self.pools():
            if p.path == directory:
                return p
        return None

    def pool_notes(self, paths: Sequence[str]) -> list[str]:
        """What the plan must tell: the directories that get a storage pool defined."""
        notes = []
        for directory in dict.fromkeys(posixpath.dirname(p) for p in paths):
            if self.pool_of(directory) is None:
                notes.append(
                    f"define and start a directory storage pool for {directory} on "
                    f"{self.hv.uri} (libvirt then manages its images, as virt-manager does)"
                )
        return notes

    def ensure_pool(self, directory: str) -> _Pool:
        found = self.pool_of(directory)
        if found is not None:
            return found
        if not self.define_pools:
            raise RemoteHostError(
                f"{self.operation}: {directory} on {self.hv.uri} is in no storage pool"
            )
        directory = posixpath.normpath(directory)
        with self.hv.translating(f"defining a storage pool for {directory}"):
            existing = {p.name(): p for p in self.hv.conn.listAllStoragePools(0)}
            pool = None
            for p in existing.values():
                root = ET.fromstring(p.XMLDesc(0))
                path = root.findtext("target/path")
                if path and posixpath.normpath(path.strip()) == directory:
                    pool = p  # defined but inactive: start it
            if pool is None:
                base = re.sub(r"[^A-Za-z0-9_.-]", "_", posixpath.basename(directory)) or "images"
                name, n = base, 1
                while name in existing:
                    n += 1
                    name = f"{base}-{n}"
                xml = (
                    f"<pool type='dir'><name>{_esc(name)}</name><target>"
                    f"<path>{_esc(directory)}</path></target></pool>"
                )
                pool = self.hv.conn.storagePoolDefineXML(xml, 0)
                with contextlib.suppress(libvirt.libvirtError):
                    pool.setAutostart(1)
            if not pool.isActive():
                pool.create(0)
            name = pool.name()
        self.defined_pools.append(name)
        self._pools = None
        found = self.pool_of(directory)
        if found is None:
            raise OperationError(f"the storage pool '{name}' for {directory} did not start")
        self._refreshed.add(found.name)  # starting a pool scans it
        return found

    def _refresh(self, p: _Pool, force: bool = False) -> None:
        if force or p.name not in self._refreshed:
            # A pool busy building a volume refuses; its list is then as fresh as it gets.
            with contextlib.suppress(VirtdeckError):
                self.hv.call(p.pool.refresh, 0)
            self._refreshed.add(p.name)

    def _volume(self, path: str, *, fresh: bool = True) -> Any | None:
        """The volume at `path` (its directory's pool re-scanned first), or None."""
        p = self.pool_of(posixpath.dirname(path))
        if p is None:
            return None
        self._refresh(p, force=fresh)
        try:
            return self.hv.call(p.pool.storageVolLookupByName, posixpath.basename(path))
        except NotFoundError:
            return None
        except VirtdeckError:
            with contextlib.suppress(NotFoundError, VirtdeckError):
                return self.hv.call(self.hv.conn.storageVolLookupByPath, path)
            return None

    def _regular_volume(self, path: str) -> Any:
        vol = self._volume(path)
        if vol is None:
            raise OperationError(f"{self.operation}: {path} does not exist on {self.hv.uri}")
        vtype = self.hv.call(vol.info)[0]
        if vtype != libvirt.VIR_STORAGE_VOL_FILE:
            raise OperationError(
                f"{self.operation}: {path} is not a regular file; virtdeck only changes image files"
            )
        return vol

    # -- reading ----------------------------------------------------------------------------

    def lexists(self, path: str) -> bool:
        if self._volume(path) is not None:
            return True
        if self.ssh is None:
            return False
        proc = self._sh('test -e "$1" || test -L "$1"', path, what="checking a path")
        return proc.returncode == 0

    def is_dir(self, path: str) -> bool:
        if self.pool_of(path) is not None:
            return True
        if self.ssh is None:
            return False
        return self._sh('test -d "$1"', path, what="checking a directory").returncode == 0

    def mode(self, path: str) -> int:
        vol = self._volume(path)
        if vol is not None:
            if self.hv.call(vol.info)[0] != libvirt.VIR_STORAGE_VOL_FILE:
                raise OperationError(
                    f"{self.operation}: {path} is not a regular file; virtdeck only changes "
                    "image files"
                )
            mode = ET.fromstring(self.hv.call(vol.XMLDesc, 0)).findtext("target/permissions/mode")
            if mode and mode.strip():
                return int(mode.strip(), 8)
        proc = self._sh('test -f "$1" && ! test -L "$1" && stat -c %a "$1"', path,
                        what=f"reading the mode of {path}")  # fmt: skip
        if proc.returncode != 0:
            raise OperationError(f"{self.operation}: {path} is not a regular file on the host")
        return int(proc.stdout.strip(), 8)

    def file_size(self, path: str) -> int | None:
        vol = self._volume(path, fresh=False)
        if vol is not None:
            return int(self.hv.call(vol.info)[1])
        if self.ssh is None:
            return None
        proc = self._sh('test -f "$1" && stat -c %s "$1"', path, what=f"reading {path}")
        return int(proc.stdout.strip()) if proc.returncode == 0 else None

    def link_target(self, path: str) -> str | None:
        """Where a symbolic link at `path` leads on the host (over SSH), or None."""
        if self.ssh is None:
            return None
        proc = self._sh('test -L "$1" && readlink -f -- "$1"', path, what=f"reading {path}")
        return proc.stdout.rstrip("\n") or None if proc.returncode == 0 else None

    def identity(self, path: str) -> dict[str, Any] | None:
        """What the file at `path` is, for an undo journal: device, inode and change time
        over SSH; else the volume's key and change time from its pool; None if gone."""
        if self.ssh is not None:
            proc = self._sh('stat -c "%d %i %z" -- "$1"', path, what=f"reading {path}")
            fields = proc.stdout.strip().split(" ", 2)
            if proc.returncode == 0 and len(fields) == 3 and fields[1].isdigit():
                return {"dev": int(fields[0]), "ino": int(fields[1]), "ctime": fields[2]}
            return None
        vol = self._volume(path)
        if vol is None:
            return None
        root = ET.fromstring(self.hv.call(vol.XMLDesc, 0))
        return {"key": root.findtext("key"), "ctime": root.findtext("target/timestamps/ctime")}

    def free_bytes(self, directory: str) -> int:
        """The space a user (not root) can write in `directory` on the host: statfs's
        f_bavail over SSH. Without SSH, the pool's figure, which libvirt takes from f_bfree
        and so counts the blocks reserved for root (`free_note` says so in the plan)."""
        if self.ssh is not None:
            proc = self._sh('stat -f -c "%a %S" -- "$1"', directory,
                            what=f"free space in {directory}")  # fmt: skip
            fields = proc.stdout.split()
            if proc.returncode != 0 or len(fields) != 2 or not all(f.isdigit() for f in fields):
                raise OperationError(f"cannot read the free space of {directory} on the host")
            return int(fields[0]) * int(fields[1])
        p = self.pool_of(directory)
        if p is None:
            raise RemoteHostError(f"{self.operation}: free space in {directory}: "
                                  f"{no_ssh_reason(self.hv.uri)}")  # fmt: skip
        self._refresh(p)
        return int(self.hv.call(p.pool.info, what=f"free space in {directory}")[3])

    def free_note(self, directory: str) -> str | None:
        """What the plan must say about the free-space figure when it is an estimate."""
        if self.ssh is not None:
            return None
        return (
            f"free space in {directory} is the storage pool's figure on {self.hv.uri}: it may "
            "count blocks reserved for root (no SSH to ask the host for what a user can write)"
        )

    def device(self, directory: str) -> int:
        """An identity of the filesystem `directory` is on (pool, or st_dev over SSH)."""
        p = self.pool_of(directory)
        if p is not None and self.ssh is None:
            key = self.hv.call(p.pool.UUIDString)
        elif self.ssh is not None:
            proc = self._sh('stat -c %d "$1"', directory, what=f"reading {directory}")
            key = proc.stdout.strip() if proc.returncode == 0 else directory
        else:
            key = directory
        return int.from_bytes(hashlib.sha1(str(key).encode()).digest()[:8], "big")

    def measure(self, path: str, fmt: str) -> int:
        if self.qemu_img is None:
            vol = self._regular_volume(path)
            return int(self.hv.call(vol.info)[2])
        return self.qemu_img.measure(path, fmt)

    # -- changing ---------------------------------------------------------------------------

    def _new(self, path: str) -> _Pool:
        refuse_control(path, self.operation)
        p = self.ensure_pool(posixpath.dirname(path))
        if self.lexists(path):
            raise AlreadyExists(f"{path} already exists; virtdeck never overwrites a file")
        return p

    def create_overlay(self, path: str, backing: str, backing_fmt: str) -> None:
        """A qcow2 volume backed by `backing` (absolute path and format recorded)."""
        p = self._new(path)
        capacity = self._capacity(backing, backing_fmt)
        xml = (
            f"<volume><name>{_esc(posixpath.basename(path))}</name>"
            f"<capacity unit='bytes'>{capacity}</capacity>"
            "<target><format type='qcow2'/></target>"
            f"<backingStore><path>{_esc(backing)}</path>"
            f"<format type='{_esc(backing_fmt)}'/></backingStore></volume>"
        )
        self.hv.call(p.pool.createXML, xml, 0, what=f"creating the overlay {path}")

    def write_new(self, path: str, data: bytes) -> None:
        """A new small volume (a cloud-init seed: it holds keys) with `data`, mode 0600,
        uploaded through the storage pool (no SSH needed); never over an existing file."""
        self._send(path, len(data), iter((data,)), mode="0600")

    def upload(
        self,
        local: str,
        path: str,
        progress: Progress = no_progress,
        *,
        on_block: Callable[[bytes], None] | None = None,
    ) -> None:
        """A new volume at `path` with the bytes of the file `local` of this machine, sent
        through libvirt (no SSH needed); never over an existing file."""
        size = os.path.getsize(local)
        label = f"uploading {posixpath.basename(path)}"

        def blocks() -> Iterator[bytes]:
            sent = 0
            with open(local, "rb") as fh:
                while block := fh.read(1 << 20):
                    if on_block is not None:
                        on_block(block)
                    yield block
                    sent += len(block)
                    progress(label, sent / size if size else None)

        self._send(path, size, blocks())

    def _send(self, path: str, size: int, blocks: Iterator[bytes], mode: str = "") -> None:
        """Create the volume `path` of `size` bytes and stream `blocks` into it; a failure or
        an interrupt removes the volume."""
        p = self._new(path)
        perms = f"<permissions><mode>{mode}</mode></permissions>" if mode else ""
        xml = (
            f"<volume><name>{_esc(posixpath.basename(path))}</name>"
            f"<capacity unit='bytes'>{size}</capacity><allocation unit='bytes'>0</allocation>"
            f"<target><format type='raw'/>{perms}</target></volume>"
        )
        vol = self.hv.call(p.pool.createXML, xml, 0, what=f"creating {path}")
        stream = self.hv.call(self.hv.conn.newStream, 0)
        try:
            with self.hv.translating(f"uploading {path}"):
                vol.upload(stream, 0, size, 0)
                for block in blocks:
                    view = memoryview(block)
                    while view:
                        view = view[stream.send(bytes(view)) :]
                stream.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            with contextlib.suppress(Exception):
                vol.delete(0)
            raise

    def _capacity(self, path: str, fmt: str) -> int:
        vol = self._volume(path, fresh=False) or self._volume(path)
        if vol is not None:
            return int(self.hv.call(vol.info)[1])
        if self.qemu_img is not None:
            return int(self.qemu_img.info(path)["virtual-size"])
        raise OperationError(f"{self.operation}: {path} is in no storage pool on {self.hv.uri}")

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
        """A full copy of `src` and its chain made by libvirt on the host (`createXMLFrom`:
        qemu-img convert there, sparse stays sparse); progress from the new volume's
        allocation. libvirt cannot stop the copy half-way: an interrupt waits for it to end,
        then the undo removes it."""
        p = self._new(dst)
        self.ensure_pool(posixpath.dirname(src))
        src_vol = self._regular_volume(src)
        _t, capacity, allocation = self.hv.call(src_vol.info)
        name = posixpath.basename(dst)
        xml = (
            f"<volume><name>{_esc(name)}</name><capacity unit='bytes'>{int(capacity)}</capacity>"
            f"<target><format type='{_esc(dst_fmt)}'/></target></volume>"
        )
        result: list[BaseException | None] = [None]
        # The copy runs on a connection of its own (its gate held for the whole copy), the
        # progress poll on the shared one: one call in flight per connection, so keepalive
        # ends both within its deadline when the host hangs (see tui.core.hypervisor).
        with self.hv.dedicated() as own:
            what = f"copying {src} to {dst}"
            own_pool = self.hv.call(own.storagePoolLookupByName, p.pool.name(), what=what)
            own_src = self.hv.call(own.storageVolLookupByKey, src_vol.key(), what=what)

            def work() -> None:
                try:
                    self.hv.call(own_pool.createXMLFrom, xml, own_src, 0, what=what)
                except BaseException as err:  # handed to the waiting thread
                    result[0] = err

            thread = threading.Thread(target=work, name=f"copy {name}", daemon=True)
            thread.start()
            expected = max(int(allocation), 1)
            interrupted: BaseException | None = None
            while thread.is_alive():
                thread.join(_POLL_INTERVAL)
                if interrupted is not None or not thread.is_alive():
                    continue
                try:
                    done = 0
                    with contextlib.suppress(VirtdeckError):
                        vol = self.hv.call(p.pool.storageVolLookupByName, name)
                        done = int(self.hv.call(vol.info)[2])
                    progress(label, min(done / expected, 0.99))
                except BaseException as err:  # an interrupt: let libvirt finish, then unwind
                    interrupted = err
        if interrupted is not None:
            raise interrupted
        if result[0] is not None:
            raise result[0]
        progress(label, 1.0)

    def copy_file(self, src: str, dst: str) -> None:
        """Copy a small file (a template's NVRAM) on the host to the new file `dst`, 0600;
        never over an existing one."""
        script = (
            'test -f "$1" || exit 3; if test -e "$2" || test -L "$2"; then exit 17; fi; '
            'umask 077; set -C; cat -- "$1" > "$2" || { rm -f -- "$2"; exit 1; }'
        )
        proc = self._sh(script, src, dst, what=f"copying {src}")
        if proc.returncode == 17:
            raise AlreadyExists(f"{dst} appeared meanwhile; nothing was kept")
        if proc.returncode == 3:
            raise OperationError(f"{self.operation}: {src} does not exist on the host")
        if proc.returncode != 0:
            raise OperationError(f"copying {src} to {dst} on the host: {last_line(proc.stderr)}")

    def read_small(self, path: str, limit: int = SMALL_FILE_LIMIT) -> bytes:
        """The bytes of a small regular file on the host (NVRAM variables), over SSH."""
        script = (
            'test -f "$1" && ! test -L "$1" || exit 3; '
            'test "$(stat -c %s -- "$1")" -le "$2" || exit 4; cat -- "$1"'
        )
        ssh = self._need_ssh(f"reading {path}")
        proc = ssh.run_bytes(["sh", "-c", script, "sh", path, str(limit)])
        if proc.returncode == 3:
            raise OperationError(f"{self.operation}: {path} is not a regular file on the host")
        if proc.returncode == 4:
            raise OperationError(f"{self.operation}: {path} is larger than {limit} bytes")
        if proc.returncode != 0:
            raise OperationError(
                f"reading {path} on the host: {last_line(proc.stderr.decode(errors='replace'))}"
            )
        return bytes(proc.stdout)

    def write_small(self, path: str, data: bytes) -> None:
        """A new small file `path` on the host holding `data`, mode 0600, over SSH; never over
        an existing file (a partial one is removed)."""
        refuse_control(path, self.operation)
        script = (
            'if test -e "$1" || test -L "$1"; then exit 17; fi; '
            'umask 077; set -C; cat > "$1" || { rm -f -- "$1"; exit 1; }'
        )
        proc = self._need_ssh(f"writing {path}").run_bytes(["sh", "-c", script, "sh", path], data)
        if proc.returncode == 17:
            raise AlreadyExists(f"{path} already exists; virtdeck never overwrites a file")
        if proc.returncode != 0:
            raise OperationError(
                f"writing {path} on the host: {last_line(proc.stderr.decode(errors='replace'))}"
            )

    def commit(self, path: str, fmt: str = "qcow2") -> None:
        self._need_ssh("qemu-img commit (no libvirt API before 9.9)")
        assert self.qemu_img is not None
        self.qemu_img.commit(path, fmt)

    def rebase_unsafe(self, path: str, backing: str, backing_fmt: str) -> None:
        self._need_ssh("qemu-img rebase (no libvirt API)")
        assert self.qemu_img is not None
        self.qemu_img.rebase_unsafe(path, backing, backing_fmt)

    def make_read_only(self, path: str) -> int:
        """chmod 0444 on the host (libvirt cannot change an existing volume's mode); returns
        the mode it had."""
        refuse_control(path, self.operation)
        old = self.mode(path)
        self._chmod(path, READ_ONLY)
        return old

    def restore_mode(self, path: str, mode: int) -> None:
        self._chmod(path, mode)

    def _chmod(self, path: str, mode: int) -> None:
        script = 'test -f "$2" && ! test -L "$2" || exit 3; chmod "$1" "$2"'
        proc = self._sh(script, f"{mode:o}", path, what=f"changing the mode of {path}")
        if proc.returncode != 0:
            raise OperationError(
                f"{self.operation}: cannot change the mode of {path} on the host: "
                f"{last_line(proc.stderr) if proc.returncode != 3 else 'not a regular file'}"
            )
        self._refreshed.clear()

    def delete(self, path: str) -> bool:
        """Delete an image on the host (`vol.delete`); False when it was already gone. Refuses
        anything but a regular file."""
        refuse_control(path, self.operation)
        directory = posixpath.dirname(path)
        p = self.pool_of(directory)
        if p is None and self._is_image_dir(path):
            p = self.ensure_pool(directory)
        if p is not None:
            vol = self._volume(path)
            if vol is not None:
                try:
                    vtype = self.hv.call(vol.info)[0]
                except VirtdeckError:
                    # libvirt cannot stat it (e.g. a backing file it may not read): the URI's
                    # SSH target deletes that very path, after checking it is a regular file.
                    if self.ssh is None:
                        raise
                    vtype = None
                if vtype is not None:
                    if vtype != libvirt.VIR_STORAGE_VOL_FILE:
                        raise OperationError(
                            f"{self.operation}: {path} is not a regular file; virtdeck never "
                            "deletes it"
                        )
                    self.hv.call(vol.delete, 0, what=f"deleting {path}")
                    return True
            elif self.ssh is None:
                return False
        script = (
            'if test -L "$1" || test -f "$1"; then rm -f -- "$1" && exit 0; exit 1; fi; '
            'if test -e "$1"; then exit 4; fi; exit 5'
        )
        proc = self._sh(script, path, what=f"deleting {path}")
        if proc.returncode == 5:
            return False
        if proc.returncode == 4:
            raise OperationError(
                f"{self.operation}: {path} is not a regular file; virtdeck never deletes it"
            )
        if proc.returncode != 0:
            raise OperationError(
                f"{self.operation}: cannot delete {path}: {last_line(proc.stderr)}"
            )
        return True

    def _is_image_dir(self, path: str) -> bool:
        """Image directories get a pool; libvirt's own state directories (NVRAM, saves) not."""
        return self.define_pools and not path.startswith("/var/lib/libvirt/qemu/")

    def delete_quietly(self, paths: list[str], progress: Progress = no_progress) -> list[str]:
        left = []
        for path in paths:
            try:
                self.delete(path)
            except (OperationError, RemoteHostError) as err:
                progress(str(err), None)
                left.append(path)
        return left


def _esc(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
    )


def run_on_host(hv: Hypervisor) -> Callable[[Sequence[str], Callable[[str], None]], int]:
    """A line runner (tui.core.templates.Sysprep) that runs its argv on `hv`'s host."""
    target = ssh_target(hv.uri)
    if target is None:
        raise RemoteHostError(f"virt-sysprep: {no_ssh_reason(hv.uri)}")
    ssh = Ssh(target)

    def runner(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
        status = ssh.stream(argv, on_line)
        if status == 127:
            raise FileNotFoundError(argv[0])
        return status

    return runner
