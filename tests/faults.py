"""Hosts that a test may hang, kill and restart: private QEMU session daemons behind sshd.

`QemuHost` is the session libvirtd of a user of its own (`vdfault1`..`vdfault4`, created when
missing, like the rigs' `vdtest`), serving `qemu:///session` with a dir pool, reached as
`qemu+ssh://vdfaultN@127.0.0.1:PORT/session` through the ssh rig: a remote host in every way
virtdeck can tell (storage through pools and `createXMLFrom`, keepalive over the ssh transport),
but one that only the run that started it ever stops, so SIGSTOP, SIGKILL and restarts never
reach a daemon another test run uses (never qemu:///system's libvirtd, never the chrooted
other-libvirt daemon, never the shared vdtest session daemon).

`template()` defines a sealed template whose disk is a raw volume of real (non-zero) data, so a
full clone is a copy that takes seconds and that a fault can land in the middle of.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

from tests import rigs
from tui.core import domxml
from tui.core.models import VirtdeckMeta

POOL = "vdt-fault-pool"

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # the rig's own calls: no stderr
TEMPLATE = VirtdeckMeta(role="template", sealed=True, created="2026-01-01T00:00:00+00:00")


class QemuHost:
    """A user's session libvirtd (stopped, killed, restarted by PID by the run that made it)."""

    def __init__(self, user: str, ssh: rigs.SshRig) -> None:
        self.user = user
        self.home = Path(rigs.ensure_user(user).pw_dir)
        self.root = self.home / ".cache"
        self.ssh = ssh
        # Without XDG_RUNTIME_DIR libvirt puts the session socket under ~/.cache/libvirt, where
        # virt-ssh-helper on the far side of the ssh connection looks for it too.
        self.socket = self.root / "libvirt" / "libvirt-sock"
        self.pool_dir = self.home / "pool"
        self.local_uri = f"qemu+unix:///session?socket={self.socket}"
        self.uri = ssh.uri(user, "/session")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.stopped = False
        self.fresh = True

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "LIBVIRT_AUTOSTART": "0",
        }

    def _daemons(self) -> list[int]:
        """PIDs of this user's libvirtd processes (the user exists for these runs only)."""
        uid = rigs.ensure_user(self.user).pw_uid
        out = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                mine = proc.name.isdigit() and proc.stat().st_uid == uid
                # a zombie is no daemon (its parent, runuser, may be a stopped one left by an
                # interrupted run, and never reap it)
                if (
                    mine
                    and (proc / "comm").read_text().strip() == "libvirtd"
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                ):
                    out.append(int(proc.name))
        return out

    def _no_autostart(self) -> None:
        # A client reconnecting over ssh while the daemon is down would have virt-ssh-helper
        # start a session daemon of its own (it exits after 120 s idle): not in these hosts.
        # bash sources ~/.bashrc for commands sshd runs, before Debian's interactive check.
        rc = self.home / ".bashrc"
        line = "export LIBVIRT_AUTOSTART=0  # virtdeck fault rig\n"
        text = rc.read_text() if rc.exists() else ""
        if line not in text:
            rc.write_text(line + text)

    def start(self) -> None:
        self._no_autostart()
        for stale in self._daemons():  # left by a run that was killed, or autostarted
            with contextlib.suppress(ProcessLookupError):
                os.kill(stale, signal.SIGCONT)
                os.kill(stale, signal.SIGKILL)
        rigs._wait("old libvirtd gone", lambda: not self._daemons(), 10)
        argv = ["runuser", "-u", self.user, "--", "/usr/sbin/libvirtd", "--timeout", "0"]
        self.proc = subprocess.Popen(
            argv, env=self._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ok = ["virsh", "-c", self.local_uri, "version"]
        rigs._wait("private qemu libvirtd", lambda: _quiet(ok) == 0, 60)
        rigs._wait("one libvirtd", lambda: len(self._daemons()) == 1, 30)
        self.pid = self._daemons()[0]
        self.stopped = False
        self._ensure_pool()

    def _ensure_pool(self) -> None:
        conn = libvirt.open(self.local_uri)
        try:
            self.pool_dir.mkdir(exist_ok=True)
            shutil.chown(self.pool_dir, self.user, self.user)
            try:
                pool = conn.storagePoolLookupByName(POOL)
            except libvirt.libvirtError:
                pool = conn.storagePoolDefineXML(
                    f"<pool type='dir'><name>{POOL}</name>"
                    f"<target><path>{self.pool_dir}</path></target></pool>"
                )
            if not pool.isActive():
                pool.create()
            pool.setAutostart(1)
            _refresh(pool)
            if self.fresh:
                self.fresh = False
                # the user exists for these runs only: what an earlier (killed) run left goes
                for dom in conn.listAllDomains():
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                for vol in pool.listAllVolumes():
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
        finally:
            conn.close()

    # -- faults -----------------------------------------------------------------------------

    def hang(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def wake(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def restart(self) -> None:
        """SIGKILL and start again (state on disk survives: the pool, defined domains)."""
        self._kill()
        self.start()

    def _kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pid = 0
        rigs._stop(self.proc)
        self.proc = None
        for pid in self._daemons():  # one a client autostarted meanwhile, if any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stopped = False

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._kill()

    def transports(self) -> list[int]:
        """PIDs of the ssh clients carrying a connection to this host (killing one drops the
        connection the way a network failure does)."""
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            mine = f"{self.user}@127.0.0.1".encode() in argv and str(self.ssh.port).encode() in argv
            if argv and argv[0].endswith(b"ssh") and mine:
                out.append(int(proc.name))
        return out

    # -- fixtures on the host ---------------------------------------------------------------

    def conn(self) -> libvirt.virConnect:
        return libvirt.open(self.local_uri)

    def template(self, name: str, size_mib: int) -> str:
        """A sealed template with one raw disk of `size_mib` MiB of non-zero data; its path."""
        path = self.pool_dir / f"{name}.img"
        block = (b"virtdeck-fault-" * 70000)[: 1 << 20]
        with open(path, "wb") as f:
            for _ in range(size_mib):
                f.write(block)
        shutil.chown(path, self.user, self.user)
        path.chmod(0o444)
        xml = (
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>"
        )
        root = domxml.parse(xml)
        domxml.write_meta(root, TEMPLATE)
        conn = self.conn()
        try:
            _refresh(conn.storagePoolLookupByName(POOL))
            conn.defineXML(domxml.to_string(root))
        finally:
            conn.close()
        return str(path)

    def plain(self, name: str) -> str:
        """A shut-off domain with a small qcow2 disk (internal snapshots work on it)."""
        path = self.pool_dir / f"{name}.qcow2"
        subprocess.run(
            ["runuser", "-u", self.user, "--", "qemu-img", "create", "-q", "-f", "qcow2",
             str(path), "64M"],
            check=True, capture_output=True,
        )  # fmt: skip
        xml = (
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>"
        )
        conn = self.conn()
        try:
            _refresh(conn.storagePoolLookupByName(POOL))
            conn.defineXML(xml)
        finally:
            conn.close()
        return str(path)

    def snapshots(self, name: str) -> list[str]:
        conn = self.conn()
        try:
            return list(conn.lookupByName(name).snapshotListNames())
        finally:
            conn.close()

    def inventory(self) -> tuple[set[str], set[str]]:
        """(domain names, volume names in the pool), read through the local socket."""
        conn = self.conn()
        try:
            pool = conn.storagePoolLookupByName(POOL)
            with contextlib.suppress(libvirt.libvirtError):  # a copy still running
                pool.refresh()
            return {d.name() for d in conn.listAllDomains()}, set(pool.listVolumes())
        finally:
            conn.close()


def _refresh(pool: libvirt.virStoragePool) -> None:
    """Re-scan the pool; a full copy an earlier test cut off may still be running in the
    daemon ('pool has asynchronous jobs running'): its list is then as fresh as it gets."""
    with contextlib.suppress(libvirt.libvirtError):
        pool.refresh()


def _quiet(argv: list[str]) -> int:
    return subprocess.run(argv, capture_output=True).returncode


def unique(prefix: str = "vdt") -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def qemu_host(ssh: rigs.SshRig, user: str = "vdfault1") -> Iterator[QemuHost]:
    host = QemuHost(user, ssh)
    try:
        host.start()
        yield host
    finally:
        host.stop()
        shutil.rmtree(host.pool_dir, ignore_errors=True)
