"""Test rigs on this machine: sshd on loopback, a second hypervisor, a hung one.

- `SshRig`: sshd on 127.0.0.1 on a free port, with its own host key, a key pair for root and
  the test user, StrictModes off; URIs carry `keyfile=` and `no_verify=1`, so the real
  user's ~/.ssh is never read or written.
- `SessionRig`: an unprivileged user (`vdtest`, created when missing) whose `qemu:///session`
  daemon serves a second, independent hypervisor with a dir pool and a host identity of its
  own (`host_uuid`: a live-migration peer of the host's daemon, over loopback), reached over
  that sshd as `qemu+ssh://vdtest@127.0.0.1:PORT/session`.
- `PrivateDaemon`: an unprivileged libvirtd on its own socket serving the test driver; `stop()`
  it with SIGSTOP (by PID) and it is a hung host.

Set-up is idempotent (the user, the keys, the pool are reused); each rig stops only the
processes it started, by PID. Usable outside pytest (benchmarks): `with ssh_rig() as ssh: ...`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

RIG_DIR = Path("/var/tmp/virtdeck-rig")
TEST_USER = "vdtest"
POOL_NAME = "vdtest-pool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str, user: str | None = None, env: dict[str, str] | None = None) -> str:
    if user is not None:
        argv = ("runuser", "-u", user, "--", *argv)
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _wait(what: str, ok: object, timeout: float = 30.0) -> None:
    from tests.waiting import wait_until

    wait_until(ok, timeout, f"{what} came up")  # type: ignore[arg-type]


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM until continued
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- sshd -----------------------------------------------------------------------------------


class SshRig:
    """sshd on 127.0.0.1:port with key auth for root and TEST_USER (one key pair)."""

    def __init__(self, root: Path = RIG_DIR) -> None:
        self.root = root
        self.port = 0
        self.key = root / "id_ed25519"
        self.proc: subprocess.Popen[bytes] | None = None

    def setup(self) -> None:
        """Idempotent: directory, host key, client key, authorized keys, the test user."""
        if not Path("/usr/sbin/sshd").exists():
            raise RuntimeError("sshd is missing: run scripts/host-setup.sh (openssh-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        _keygen(self.root / "ssh_host_ed25519_key")
        _keygen(self.key)
        ensure_user(TEST_USER)
        (self.root / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (self.root / "authorized_keys").chmod(0o644)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory

    def start(self) -> None:
        self.setup()
        self.port = free_port()
        config = self.root / f"sshd_config.{os.getpid()}"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
            f"HostKey {self.root / 'ssh_host_ed25519_key'}\n"
            f"PidFile {self.root / f'sshd.{os.getpid()}.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxStartups 100:30:200\nMaxSessions 100\nLogLevel ERROR\n"
            "Subsystem sftp internal-sftp\n"
        )
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / f"sshd.{os.getpid()}.log", "wb"),  # noqa: SIM115
        )
        _wait("sshd", lambda: self.ssh("root", "true").returncode == 0)

    def ssh_argv(self, user: str) -> list[str]:
        return [
            "ssh", "-i", str(self.key), "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1",
        ]  # fmt: skip

    def ssh(self, user: str, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ssh_argv(user), *command], capture_output=True, text=True, timeout=30
        )

    def uri(self, user: str, path: str) -> str:
        """qemu+ssh URI with this rig's key; no_verify=1 skips known_hosts checks."""
        return f"qemu+ssh://{user}@127.0.0.1:{self.port}{path}?keyfile={self.key}&no_verify=1"

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        for name in (f"sshd_config.{os.getpid()}", f"sshd.{os.getpid()}.pid"):
            (self.root / name).unlink(missing_ok=True)
        log = self.root / f"sshd.{os.getpid()}.log"
        if log.exists() and not log.stat().st_size:
            log.unlink()


def _keygen(path: Path) -> None:
    """An ed25519 key pair at `path` unless there is one; made under a temporary name and
    renamed, so two test runs starting at once never see half a key."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtdeck-rig", "-f", str(tmp))
    os.replace(f"{tmp}.pub", f"{path}.pub")
    os.replace(tmp, path)


def ensure_user(name: str) -> pwd.struct_passwd:
    """The unprivileged test user (created when missing). Its password field is '*' (no
    password, but not locked: sshd without PAM refuses key logins to a locked '!' account)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run("useradd", "--create-home", "--shell", "/bin/bash", name)
    shadow = Path("/etc/shadow").read_text()
    if f"\n{name}:!" in "\n" + shadow:
        _run("usermod", "-p", "*", name)
    return pwd.getpwnam(name)


# -- a second hypervisor: the test user's qemu:///session ------------------------------------


class SessionRig:
    """TEST_USER's own libvirtd (qemu:///session), with a dir pool under its home."""

    def __init__(self, ssh: SshRig) -> None:
        self.ssh_rig = ssh
        self.user = ensure_user(TEST_USER)
        self.home = Path(self.user.pw_dir)
        self.pool_dir = self.home / "pool"
        self.proc: subprocess.Popen[bytes] | None = None
        self.uri = ""

    @property
    def local_uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket}"

    @property
    def socket(self) -> Path:
        # Without XDG_RUNTIME_DIR (no systemd, no pam_systemd in the ssh session) libvirt puts
        # the session socket under ~/.cache/libvirt; the daemon is started the same way.
        return self.home / ".cache" / "libvirt" / "libvirt-sock"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "USER": TEST_USER,
            "LOGNAME": TEST_USER,
            "LIBVIRT_AUTOSTART": "0",  # virsh must not spawn a daemon that exits after 120 s
        }

    def _virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", TEST_USER, "--", "virsh", "-c", "qemu:///session", *args],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=60,
        )

    def _own_host_uuid(self) -> None:
        """A host identity of its own in the daemon's libvirtd.conf (read at its start): with
        the machine's (SMBIOS) identity libvirt refuses a live migration between the two
        daemons as one "to the same host"."""
        conf = self.home / ".config" / "libvirt" / "libvirtd.conf"
        text = conf.read_text() if conf.exists() else ""
        if "host_uuid" in text:
            return
        import uuid

        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            text + f'\n# virtdeck test rig: a host of its own\nhost_uuid = "{uuid.uuid4()}"\n'
        )
        for path in (self.home / ".config", conf.parent, conf):
            shutil.chown(path, TEST_USER, TEST_USER)

    def start(self) -> None:
        self._own_host_uuid()
        if self._virsh("version").returncode != 0:
            # a session daemon of an earlier run may still answer; else start our own
            self.proc = subprocess.Popen(
                ["runuser", "-u", TEST_USER, "--", "/usr/sbin/libvirtd", "--timeout", "0"],
                env=self._env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait("the session libvirtd", lambda: self._virsh("version").returncode == 0, 60)
        self._ensure_pool()
        self.uri = self.ssh_rig.uri(TEST_USER, "/session")

    def _ensure_pool(self) -> None:
        if self._virsh("pool-info", POOL_NAME).returncode != 0:
            self.pool_dir.mkdir(exist_ok=True)
            shutil.chown(self.pool_dir, TEST_USER, TEST_USER)
            out = self._virsh("pool-define-as", POOL_NAME, "dir", "--target", str(self.pool_dir))
            if out.returncode != 0:
                raise RuntimeError(f"pool-define-as: {out.stderr.strip()}")
        self._virsh("pool-autostart", POOL_NAME)
        info = self._virsh("pool-info", POOL_NAME).stdout
        if "running" not in info:
            out = self._virsh("pool-start", POOL_NAME)
            if out.returncode != 0:
                raise RuntimeError(f"pool-start: {out.stderr.strip()}")

    def virsh(self, *args: str) -> str:
        out = self._virsh(*args)
        if out.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def stop(self) -> None:
        """Stop the daemon if this rig started it (by PID; runuser forwards the signal)."""
        _stop(self.proc)
        self.proc = None


# -- a hung host ----------------------------------------------------------------------------


class PrivateDaemon:
    """An unprivileged libvirtd (test driver) on its own socket; hang() stops it by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o777)
        self.socket = root / "libvirt" / "libvirt-sock"
        self.uri = f"test+unix:///default?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the daemon itself (runuser's child when run as root)

    def start(self) -> None:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root),
            "XDG_RUNTIME_DIR": str(self.root),
            "XDG_CONFIG_HOME": str(self.root / "cfg"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
        }
        argv = ["/usr/sbin/libvirtd", "--timeout", "0"]
        if os.getuid() == 0:  # root always gets the privileged daemon: run it as nobody
            argv = ["runuser", "-u", "nobody", "--", *argv]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ok = ["virsh", "-c", self.uri, "version"]
        _wait("private libvirtd", lambda: subprocess.run(ok, capture_output=True).returncode == 0)
        pid_file = self.root / "libvirt" / "libvirtd.pid"
        _wait("libvirtd pid file", pid_file.exists)
        self.pid = int(pid_file.read_text().strip())

    def hang(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def wake(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
        _stop(self.proc)
        self.proc = None
        if self.pid:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = 0
        self.socket.unlink(missing_ok=True)


# -- context managers (pytest fixtures wrap these) -------------------------------------------


@contextlib.contextmanager
def ssh_rig() -> Iterator[SshRig]:
    rig = SshRig()
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


@contextlib.contextmanager
def session_rig(ssh: SshRig) -> Iterator[SessionRig]:
    rig = SessionRig(ssh)
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


@contextlib.contextmanager
def private_daemon(name: str = "hung") -> Iterator[PrivateDaemon]:
    d = PrivateDaemon(Path(f"/tmp/vdt-{name}-{os.getpid()}"))
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(d.root, ignore_errors=True)


@contextlib.contextmanager
def latency_proxy(target_port: int, delay_ms: float) -> Iterator[int]:
    """A port on 127.0.0.1 forwarding to `target_port` with `delay_ms` each way (a subprocess,
    stopped by PID afterwards)."""
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.latency_proxy", str(port), str(target_port), str(delay_ms)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
