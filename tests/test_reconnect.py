"""The daemon restarts under a running virtdeck: it says so, reconnects by itself, and says so.

A private, unprivileged daemon (its own socket, serving the test driver) is killed and
started again, so the system daemon other tests use is never touched. The daemon is the
monolithic libvirtd where the release ships it, else the modular QEMU daemon virtqemud
(chosen at run time from what is installed; libvirt's test driver is built into libvirt.so,
which every daemon links, so either serves test:///default).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tui.app import VirtdeckApp
from tui.core.hypervisor import Hypervisor
from tui.widgets.domains import DomainsTable

# (binary, its socket's name under $XDG_RUNTIME_DIR/libvirt), monolithic first
DAEMONS = (("/usr/sbin/libvirtd", "libvirt-sock"), ("/usr/sbin/virtqemud", "virtqemud-sock"))


def installed_daemon() -> tuple[str, str] | None:
    return next(((b, s) for b, s in DAEMONS if os.access(b, os.X_OK)), None)


class PrivateDaemon:
    def __init__(self, root: Path, binary: str, socket: str) -> None:
        self.root = root
        root.chmod(0o777)
        self.binary = binary
        self.socket = root / "libvirt" / socket
        self.uri = f"test+unix:///default?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.root),
            "XDG_RUNTIME_DIR": str(self.root),
            "XDG_CONFIG_HOME": str(self.root / "cfg"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
        }
        argv = [self.binary, "--timeout", "0"]
        if os.getuid() == 0:  # root always gets the privileged daemon: run it as nobody
            argv = ["runuser", "-u", "nobody", "--", *argv]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(100):
            if (
                subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True).returncode
                == 0
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"private {os.path.basename(self.binary)} did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # runuser forwards the signal; the pid file names the daemon if it survived it
        pid_file = self.root / "libvirt" / f"{os.path.basename(self.binary)}.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            pid_file.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def daemon() -> Iterator[PrivateDaemon]:
    found = installed_daemon()
    if found is None:
        pytest.fail("neither libvirtd nor virtqemud is installed: run scripts/host-setup.sh")
    root = Path(f"/tmp/vdt-daemon-{os.getpid()}")
    root.mkdir(exist_ok=True)
    d = PrivateDaemon(root, *found)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_daemon_restart_is_reported_and_survived(daemon: PrivateDaemon) -> None:
    hv = Hypervisor.open(daemon.uri)
    app = VirtdeckApp([hv], poll_interval=0.3)
    async with app.run_test(size=(140, 45)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen.query_one(DomainsTable).row_count == 1

        daemon.stop()
        for _ in range(100):
            await pilot.pause(0.1)
            if daemon.uri in app.lost:
                break
        assert daemon.uri in app.lost
        assert any("lost" in n.message for n in app._notifications)

        daemon.start()
        for _ in range(100):
            await pilot.pause(0.1)
            if daemon.uri not in app.lost:
                break
        assert daemon.uri not in app.lost
        assert any(n.message == f"reconnected to {daemon.uri}" for n in app._notifications)
        await app.workers.wait_for_complete()
        await pilot.pause(0.5)
        assert app.screen.query_one(DomainsTable).row_count == 1
        assert hv.domains()[0].name == "test"
    hv.close()
