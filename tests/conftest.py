"""Fixtures: a private test-driver hypervisor for fast tests, real libvirt daemons for system tests.

The system tier runs against two daemons (one session-scoped `system_hv` per daemon, test ids
like `lv9.0` / `lv11.3` from the daemon's real version): the host's own (qemu:///system) and the
other Debian release's, chrooted (scripts/other-libvirt.sh), so both of virtdeck's paths for
external snapshots are exercised: libvirt's own revert/delete (libvirt >= 9.9) and virtdeck's.
VIRTDECK_SYSTEM_DAEMONS chooses: `host`, `other`, or both (the default, comma-separated); an
item with a colon is a URI. System tests never skip: if a daemon does not answer, they fail and
say why. The virtualisation type (kvm or TCG) is probed, never assumed.
"""

from __future__ import annotations

import collections
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
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


REPO = Path(__file__).resolve().parent.parent
HOST_URI = "qemu:///system"
DAEMONS_ENV = "VIRTDECK_SYSTEM_DAEMONS"


@dataclass(frozen=True)
class Daemon:
    """One libvirt daemon of the system tier, probed once at collection."""

    label: str  # host, other, or the URI given
    uri: str
    id: str  # lv<major>.<minor>, from the daemon's real version
    error: str = ""  # why it cannot be used (the tests then fail with it)


def _other_uri() -> str:
    uri = os.environ.get("VIRTDECK_OTHER_URI", "")
    if uri:
        return uri
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "other-libvirt.sh"), "uri"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or "scripts/other-libvirt.sh uri failed")
    return proc.stdout.strip()


def _probe(label: str, uri: str) -> Daemon:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        hint = (
            "start it with 'bash scripts/other-libvirt.sh start' (as root), or run the tier "
            f"against the host's daemon only: {DAEMONS_ENV}=host"
            if label == "other"
            else "run scripts/host-setup.sh"
        )
        return Daemon(label, uri, f"{label}-down", f"{uri} does not answer ({err}): {hint}")
    try:
        v = conn.getLibVersion()
    finally:
        conn.close()
    return Daemon(label, uri, f"lv{v // 1_000_000}.{v // 1000 % 1000}")


@functools.cache
def system_daemons() -> tuple[Daemon, ...]:
    daemons = []
    for label in os.environ.get(DAEMONS_ENV, "host,other").split(","):
        label = label.strip()
        if label == "host":
            daemons.append(_probe(label, HOST_URI))
        elif label == "other":
            try:
                daemons.append(_probe(label, _other_uri()))
            except RuntimeError as err:
                daemons.append(Daemon(label, "", "other-none", str(err)))
        elif ":" in label:
            daemons.append(_probe(label, label))
        elif label:
            raise pytest.UsageError(f"{DAEMONS_ENV}: '{label}' is not host, other or a URI")
    if not daemons:
        raise pytest.UsageError(f"{DAEMONS_ENV} names no daemon")
    return tuple(daemons)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "system_hv" in metafunc.fixturenames:
        daemons = system_daemons()
        metafunc.parametrize(
            "system_hv", daemons, ids=[d.id for d in daemons], indirect=True, scope="session"
        )


@pytest.fixture(scope="session")
def system_hv(request: pytest.FixtureRequest) -> Iterator[Hypervisor]:
    """A real libvirt daemon (once per daemon of the tier). Fails (never skips) when it does
    not answer: .ci/run starts both."""
    daemon: Daemon = request.param
    if daemon.error:
        pytest.fail(daemon.error, pytrace=False)
    hv = Hypervisor.open(daemon.uri)
    sweep_stale(hv.conn)
    _seen[daemon.id] = _describe(hv)
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


@pytest.fixture(scope="session")
def host_hv() -> Iterator[Hypervisor]:
    """The host's own daemon only, for tests that reach it another way too (over the ssh rig,
    with virsh, through a dashboard started as the console script): those other ways lead to
    qemu:///system, not to the chrooted daemon."""
    hv = Hypervisor.open(HOST_URI)
    sweep_stale(hv.conn)
    yield hv
    hv.close()


@pytest.fixture
def host_lab(host_hv: Hypervisor) -> Iterator[SystemLab]:
    """A lab on the host's own daemon (see host_hv)."""
    lab = SystemLab(host_hv)
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
def _private_state(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Each test has its own $XDG_STATE_HOME (virtdeck's undo journals and audit log), and
    leaves no journal: a finished or rolled-back operation must not leave one behind. A system
    test's audit records are also appended to the run's audit log (checked at the end).
    A MonkeyPatch of its own: a test's `monkeypatch.undo()` must not send the rest of the test
    to the operator's real state directory."""
    state = tmp_path_factory.mktemp("state")
    system = _tier(request.node).startswith("system")
    audit_log = state / "virtdeck" / "audit.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(state))
        if system:  # (also where a test's child processes with a state dir of their own write)
            mp.setenv("VIRTDECK_AUDIT_LOG", str(audit_log))
        else:
            mp.delenv("VIRTDECK_AUDIT_LOG", raising=False)
        yield
    if system:
        _collect_audit(audit_log, tmp_path_factory)
    left = sorted(p.name for p in (state / "virtdeck" / "journal").glob("*.json"))
    assert not left, f"operations left journals behind: {left}"


# -- the system tier's audit trail: one log for the run, read back with `virtdeck log` --------

_audit: dict[str, Any] = {"path": None, "records": 0}


def _collect_audit(log: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tui.core import audit

    if _audit["path"] is None:
        _audit["path"] = tmp_path_factory.getbasetemp() / "audit-system-tier.log"
    lines = [
        line
        for p in audit.files(log)
        for line in p.read_text().splitlines(keepends=True)
        if line.strip()
    ]
    with open(_audit["path"], "a") as fh:
        fh.writelines(lines)
    _audit["records"] += len(lines)


def _check_audit() -> list[str]:
    """`virtdeck log --json` on the run's log lists every operation the system tests
    performed, each with a result; a summary line, or the lines saying what is wrong."""
    import json
    import sys

    path = _audit["path"]
    if path is None:
        return []
    proc = subprocess.run(
        [sys.executable, "-m", "tui", "log", "--json"],
        capture_output=True, text=True, env={**os.environ, "VIRTDECK_AUDIT_LOG": str(path)},
    )  # fmt: skip
    problems = []
    if proc.returncode != 0 or proc.stderr:
        problems.append(f"virtdeck log --json: exit {proc.returncode}: {proc.stderr.strip()}")
    listed = json.loads(proc.stdout or "[]")
    if len(listed) != _audit["records"]:
        problems.append(f"{_audit['records']} records written, {len(listed)} listed")
    results = collections.Counter(str(r.get("result")) for r in listed)
    if not set(results) <= {"ok", "failed", "interrupted", "undone"}:
        problems.append(f"records without a valid result: {dict(results)}")
    anonymous = [r.get("operation") for r in listed if not r.get("domains")]
    if anonymous:  # every operation and lifecycle verb names the domains it acts on
        problems.append(f"operations that name no domain: {anonymous[:5]}")
    if any(t.startswith("system") for t in _tier_tests) and not listed:
        problems.append("the system tier ran but recorded no operation")
    counts = ", ".join(f"{n} {r}" for r, n in sorted(results.items()))
    summary = f"audit: `virtdeck log --json` lists {len(listed)} operations ({counts}): {path}"
    return [f"AUDIT CHECK FAILED: {p}" for p in problems] or [summary]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _audit["lines"] = _check_audit()
    if any(line.startswith("AUDIT CHECK FAILED") for line in _audit["lines"]):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- what the system tier exercised, printed at the end --------------------------------------

_seen: dict[str, str] = {}  # daemon id -> versions and external snapshot path
_ext_calls: collections.Counter[tuple[str, str, str]] = collections.Counter()
_tier_time: collections.Counter[str] = collections.Counter()
_tier_tests: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def _describe(hv: Hypervisor) -> str:
    from tui.core.models import version_string
    from tui.core.snapshots import libvirt_handles_external

    native = libvirt_handles_external(hv)
    path = (
        "libvirt-native revert/delete (<externalSnapshot/>)"
        if native
        else "virtdeck's own revert/delete (no <externalSnapshot/>)"
    )
    return (
        f"{hv.uri}: libvirt {version_string(hv.lib_version())}, "
        f"QEMU {version_string(hv.conn.getVersion())}, {hv.virt_type()}; external snapshots: {path}"
    )


@pytest.fixture(scope="session", autouse=True)
def _count_external_snapshot_paths() -> Iterator[None]:
    """Count external-snapshot reverts and deletes by host and by who did them."""
    from tui.core import snapshots

    def counting(verb: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(hv: Hypervisor, plan: Any, *args: Any, **kwargs: Any) -> Any:
            if plan.kind != snapshots.INTERNAL:
                _ext_calls[(hv.uri, verb, plan.method)] += 1
            return fn(hv, plan, *args, **kwargs)

        return wrapper

    originals = snapshots.revert, snapshots.delete
    snapshots.revert = counting("revert", snapshots.revert)  # type: ignore[assignment]
    snapshots.delete = counting("delete", snapshots.delete)  # type: ignore[assignment]
    yield
    snapshots.revert, snapshots.delete = originals  # type: ignore[assignment]


def _tier(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    daemon = callspec.params.get("system_hv") if callspec else None
    if isinstance(daemon, Daemon):
        return f"system {daemon.id}"
    return "system" if item.get_closest_marker("system") else "fast"


_tier_of: dict[str, str] = {}  # test node id -> tier


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    tier = _tier_of[item.nodeid] = _tier(item)
    start = time.monotonic()
    try:
        return (yield)
    finally:
        _tier_time[tier] += time.monotonic() - start


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        _tier_tests[_tier_of.get(report.nodeid, "?")][report.outcome] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _tier_time:
        return
    tr = terminalreporter
    tr.section("tiers")
    for tier in sorted(_tier_time):
        counts = ", ".join(f"{n} {o}" for o, n in sorted(_tier_tests.get(tier, {}).items()))
        tr.write_line(f"{tier:16} {_tier_time[tier]:7.1f} s  ({counts or 'no tests'})")
    for line in _audit.get("lines", []):
        tr.write_line(line)
    soak = sys.modules.get("tests.soak")
    for line in getattr(soak, "SUMMARY", []):
        tr.write_line(line)
    for daemon in system_daemons() if _seen else ():
        if daemon.id not in _seen:
            continue
        tr.write_line(f"{daemon.id}: {_seen[daemon.id]}")
        done = [
            f"{verb} by {method}: {n}"
            for (uri, verb, method), n in sorted(_ext_calls.items())
            if uri == daemon.uri
        ]
        tr.write_line(f"{' ' * len(daemon.id)}  exercised: {'; '.join(done) or 'nothing external'}")
