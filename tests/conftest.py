"""Fixtures: a private test-driver hypervisor for fast tests, the real libvirtd for system tests.

System tests never skip: if qemu:///system does not answer, they fail and say why. The
virtualisation type (kvm or TCG) is probed, never assumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import rigs
from tests.lab import SystemLab, sweep_stale
from tui.core.hypervisor import Hypervisor
from tui.core.models import VirtdeckMeta
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml

os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")

SAMPLE = [
    DomainSpec("alpha", "running", vcpus=2, memory_mib=1024,
               disks=(DiskSpec("/var/tmp/vd-alpha.qcow2"),), macs=("52:54:00:aa:00:01",)),
    DomainSpec("beta", "shutoff", disks=(DiskSpec("/var/tmp/vd-beta.qcow2"),)),
    DomainSpec("gamma", "paused", memory_mib=256),
    DomainSpec("template-web", "shutoff",
               disks=(DiskSpec("/var/tmp/vd-web.qcow2"),),
               meta=VirtdeckMeta(role="template", sealed=True, operations=("ssh-hostkeys",))),
]  # fmt: skip


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    """A private test-driver hypervisor with four sample domains (fresh state per test)."""
    path = tmp_path / "node.xml"
    path.write_text(node_xml(SAMPLE))
    return f"test://{path}"


@pytest.fixture
def test_hv(test_uri: str) -> Iterator[Hypervisor]:
    hv = Hypervisor.open(test_uri)
    yield hv
    hv.close()


@pytest.fixture(scope="session")
def system_hv() -> Iterator[Hypervisor]:
    """The real libvirtd. Fails (never skips) when it does not answer: .ci/run starts it."""
    hv = Hypervisor.open("qemu:///system")
    sweep_stale(hv.conn)
    yield hv
    hv.close()


@pytest.fixture
def lab(system_hv: Hypervisor) -> Iterator[SystemLab]:
    """Domains and images under a unique prefix, removed after the test whatever happens."""
    lab = SystemLab(system_hv)
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture(scope="session", autouse=True)
def _libvirt_event_loop() -> None:
    """libvirt wants its event loop registered before connections that deliver events."""
    from tui.core.hypervisor import start_event_loop

    start_event_loop()


# -- the fleet rig (tests/rigs.py): sshd on loopback, a second hypervisor, a hung host ---------


@pytest.fixture(scope="session")
def ssh_rig() -> Iterator[rigs.SshRig]:
    """sshd on 127.0.0.1 (free port, key auth for root and the test user), for the session."""
    with rigs.ssh_rig() as rig:
        yield rig


@pytest.fixture(scope="session")
def ssh_root_uri(ssh_rig: rigs.SshRig) -> str:
    """qemu:///system reached over ssh as root: qemu+ssh://root@127.0.0.1:PORT/system?..."""
    return ssh_rig.uri("root", "/system")


@pytest.fixture(scope="session")
def session_rig(ssh_rig: rigs.SshRig) -> Iterator[rigs.SessionRig]:
    with rigs.session_rig(ssh_rig) as rig:
        yield rig


@pytest.fixture(scope="session")
def session_uri(session_rig: rigs.SessionRig) -> str:
    """A second, independent hypervisor: the test user's qemu:///session over ssh, with a dir
    pool (rigs.POOL_NAME)."""
    return session_rig.uri


@pytest.fixture
def hung_daemon() -> Iterator[rigs.PrivateDaemon]:
    """A private libvirtd (test driver, one domain); `.hang()` SIGSTOPs it, `.wake()` resumes."""
    with rigs.private_daemon() as daemon:
        yield daemon


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test has its own $XDG_STATE_HOME (virtdeck's undo journals), and leaves none:
    a finished or rolled-back operation must not leave a journal behind."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    yield
    left = sorted(p.name for p in (state / "virtdeck" / "journal").glob("*.json"))
    assert not left, f"operations left journals behind: {left}"
