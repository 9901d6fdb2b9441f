"""A host that hangs, drops or resumes never crashes virtdeck (issue 19).

Hosts here are private session daemons of their own users behind the ssh rig (tests/faults.py):
only this run stops, kills or restarts them. Every virtdeck runs in a fresh interpreter with
faulthandler on, so a crash is a failed assertion (exit status < 0) and not a lost test run.
The full-length soak is benchmarks/soak_faults.py; the two reproductions at the issue's length:

    VIRTDECK_REPRO_RUNS=20 .venv/bin/python -m pytest -m system tests/test_faults_system.py \
        -k "hangs or dashboard"
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import faults, rigs, soak
from tui.core.connection import KEEPALIVE_COUNT, KEEPALIVE_INTERVAL
from tui.core.errors import ConnectError
from tui.core.hypervisor import Hypervisor

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system

# The README's promise: a dead or hung host is an error after about 9 s (a ping every 3 s,
# dropped after two unanswered); the margin covers a loaded machine.
KEEPALIVE_S = KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)
MARGIN_S = 4.0
RUNS = int(os.environ.get("VIRTDECK_REPRO_RUNS", "3"))


@pytest.fixture(scope="module")
def fault_host(ssh_rig: rigs.SshRig) -> Iterator[faults.QemuHost]:
    with faults.qemu_host(ssh_rig, "vdfault1") as host:
        yield host


@pytest.fixture(scope="module")
def big_template(fault_host: faults.QemuHost) -> str:
    """A template with 1 GiB of data: a full clone copies for seconds."""
    name = faults.unique("tpl")
    fault_host.template(name, 1024)
    return name


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cfg" / "virtdeck").mkdir(parents=True)
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "st"),
            "XDG_CONFIG_HOME": str(tmp_path / "cfg")}  # fmt: skip


def _virtdeck(
    env: dict[str, str], *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "tui", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _journals(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["XDG_STATE_HOME"]) / "virtdeck" / "journal").glob("*.json"))


class Lines:
    """A process's stderr read as it comes, each line with the time it arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.got: list[tuple[float, str]] = []
        assert proc.stderr is not None
        stream = proc.stderr
        self.thread = threading.Thread(target=lambda: self._read(stream), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.got.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float) -> float:
        """When the first line containing `text` arrived (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.got):
                if text in line:
                    return t
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} within {timeout:g} s: {self.text()[-3000:]}")

    def text(self) -> str:
        self.thread.join(5)
        return "\n".join(line for _, line in self.got)


def _popen(env: dict[str, str], *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "tui", *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# How long a reproduction keeps the daemon stopped (the issue: 25-30 s; shorter in the tier).
STOP_S = float(os.environ.get("VIRTDECK_REPRO_STOP", "14"))


def _clone_cut_off(
    host: faults.QemuHost, template: str, env: dict[str, str], *extra: str
) -> tuple[subprocess.Popen[str], Lines, float, float]:
    """A full clone, its daemon SIGSTOPped once the copy is under way: (the process, its
    stderr, when the daemon stopped, when the one-line error came)."""
    clone = faults.unique("cl")
    proc = _popen(env, "-c", host.uri, *extra, "clone", template, clone, "--full")
    lines = Lines(proc)
    vol = host.pool_dir / f"{clone}.img"
    deadline = time.monotonic() + 60
    while not vol.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vol.exists(), f"the copy never started: {lines.text()[-2000:]}"
    host.hang()
    stopped = time.monotonic()
    try:
        error = lines.wait_for("keepalive", KEEPALIVE_S + MARGIN_S + 30)
    except BaseException:
        host.wake()
        proc.kill()
        raise
    return proc, lines, stopped, error


@pytest.mark.parametrize("run", range(RUNS))
def test_full_clone_to_a_host_that_hangs_ends_in_one_line_and_undoes_itself_after_sigcont(
    fault_host: faults.QemuHost, big_template: str, state: dict[str, str], run: int
) -> None:
    """The issue's first reproduction (exit 139 on SIGCONT, silent for 30 s): SIGSTOP once the
    copy is under way; virtdeck must say so in one line within keepalive's deadline, without a
    crash, wait for the host, and once SIGCONT lets it answer, undo its work itself (no
    domain, disk or journal left)."""
    before = fault_host.inventory()
    proc, lines, stopped, error = _clone_cut_off(fault_host, big_template, state)
    try:
        assert error - stopped <= KEEPALIVE_S + MARGIN_S, f"{error - stopped:.1f} s after SIGSTOP"
        lines.wait_for("waiting up to 60 s", 5)
        time.sleep(max(0.0, stopped + STOP_S - time.monotonic()))
        assert proc.poll() is None, f"it did not wait: {lines.text()[-2000:]}"
    finally:
        fault_host.wake()
    woke = time.monotonic()
    proc.wait(timeout=90)
    err = lines.text()
    assert proc.returncode == 1, f"exit {proc.returncode}: {err[-3000:]}"
    assert "Fatal Python error" not in err and "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if "keepalive" in line]
    assert len(said) == 1 and said[0].startswith("virtdeck: "), err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "answered again" in last and "undid '" in last, last
    undone = lines.wait_for("answered again", 1) - woke
    print(f"error {error - stopped:.1f} s after SIGSTOP; undone {undone:.1f} s after SIGCONT")
    assert not _journals(state), "a journal was left"
    assert fault_host.inventory() == before


def test_ctrl_c_while_waiting_for_the_host_leaves_the_journal_to_recover(
    fault_host: faults.QemuHost, big_template: str, state: dict[str, str]
) -> None:
    before = fault_host.inventory()
    proc, lines, _stopped, _error = _clone_cut_off(fault_host, big_template, state)
    try:
        lines.wait_for("Ctrl-C leaves it to 'virtdeck recover'", 5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler says where it waits
            proc.wait(timeout=10)
            raise AssertionError(f"Ctrl-C did not end it: {lines.text()[-4000:]}") from None
    finally:
        fault_host.wake()
    err = lines.text()
    assert proc.returncode == 130, f"exit {proc.returncode}: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("virtdeck: interrupted while waiting: 'virtdeck recover' undoes"), last
    assert _journals(state), "the journal was lost"
    _recover_all(fault_host, state)
    assert fault_host.inventory() == before


def _recover_all(host: faults.QemuHost, env: dict[str, str]) -> str:
    """`recover --yes` until no journal is left (libvirt may still finish a copy it started)."""
    out = ""
    for attempt in range(20):
        rec = _virtdeck(env, "-c", host.uri, "recover", "--yes")
        assert rec.returncode >= 0 and "Traceback" not in rec.stderr, rec.stderr
        out += rec.stdout + rec.stderr
        if not _journals(env):
            return out
        time.sleep(1 + attempt)
    raise AssertionError(f"journals left: {out[-2000:]}")


def _snapshot_cut_off(
    host: faults.QemuHost, domain: str, env: dict[str, str]
) -> tuple[str, list[str]]:
    """`snapshot create` whose daemon is SIGSTOPped as the request goes out (right after its
    'taking ... snapshot' line), so the connection is lost while libvirt works and the daemon
    takes the snapshot when it resumes. Tried until that happened (the stop can also land
    after the daemon answered, or before it read the request and then it never takes it):
    (the snapshot's name, the command's stderr lines)."""
    tries = []
    for attempt in range(6):
        snap = f"s{attempt}-{faults.unique('x')[-6:]}"
        proc = _popen(env, "-c", host.uri, "--undo-wait", "0", "snapshot", "create", domain, snap)
        lines = Lines(proc)
        try:
            lines.wait_for("taking internal snapshot", 30)
            host.hang()
            proc.wait(timeout=KEEPALIVE_S + MARGIN_S + 10)
        finally:
            host.wake()
        err = lines.text()
        assert "Traceback" not in err and proc.returncode in (0, 1), err[-3000:]
        if proc.returncode == 0:
            tries.append("answered before the stop")
            host.conn().lookupByName(domain).snapshotLookupByName(snap).delete(0)
            continue
        assert " lost" in err and _journals(env), err[-3000:]
        deadline = time.monotonic() + 20
        while snap not in host.snapshots(domain) and time.monotonic() < deadline:
            time.sleep(0.2)
        if snap in host.snapshots(domain):
            print(f"the stop landed while libvirt worked after {attempt + 1} tries: {tries}")
            return snap, err.splitlines()
        tries.append("the daemon never took it")
        _recover_all(host, env)
    raise AssertionError(f"the stop never landed while libvirt worked: {tries}")


@pytest.mark.parametrize("run", range(RUNS))
def test_a_snapshot_the_daemon_took_after_the_connection_was_lost_is_recovered_by_its_mark(
    fault_host: faults.QemuHost, state: dict[str, str], run: int
) -> None:
    """The soak's one leftover: the daemon took the snapshot after the client had lost the
    connection. Its description carries the operation's token (the journal has it), or the
    journal has its creation time, which proves to `recover` that it is this operation's:
    recover deletes it."""
    domain = faults.unique("sn")
    fault_host.plain(domain)
    snap, _err = _snapshot_cut_off(fault_host, domain, state)
    (journal,) = _journals(state)
    action = json.loads(journal.read_text())["undo"][-1]
    xml = fault_host.conn().lookupByName(domain).snapshotLookupByName(snap).getXMLDesc(0)
    # Either proof is there: the mark (the stop landed before the reply), or the identity
    # journalled (the stop landed after it, while the mark was being taken off).
    proofs = (f"virtdeck-operation: {action['args']['token']}" in xml, action["identity"])
    assert any(proofs), (xml, action)
    out = _recover_all(fault_host, state)
    assert snap not in fault_host.snapshots(domain), out
    assert "rolled back" in out, out


def test_a_snapshot_taken_again_under_that_name_by_another_is_kept(
    fault_host: faults.QemuHost, state: dict[str, str]
) -> None:
    """The negative: after the daemon took the lost operation's snapshot, another process
    deleted it and took one under the same name: recover keeps that one and says why."""
    domain = faults.unique("sn")
    fault_host.plain(domain)
    snap, _err = _snapshot_cut_off(fault_host, domain, state)
    conn = fault_host.conn()
    try:
        dom = conn.lookupByName(domain)
        dom.snapshotLookupByName(snap).delete(0)
        dom.snapshotCreateXML(f"<domainsnapshot><name>{snap}</name></domainsnapshot>", 0)
        created = dom.snapshotLookupByName(snap).getXMLDesc(0)
    finally:
        conn.close()
    out = _recover_all(fault_host, state)
    # Either proof keeps it: the stop landed before the reply (no creation time journalled:
    # the mark decides), or after it, while the mark was being taken off (the creation time
    # journalled differs from the new snapshot's).
    assert "does not carry this operation's mark" in out or "was taken again since" in out, out
    conn = fault_host.conn()
    try:
        assert conn.lookupByName(domain).snapshotLookupByName(snap).getXMLDesc(0) == created
    finally:
        conn.close()


def test_a_snapshot_taken_without_faults_keeps_the_operators_description(
    fault_host: faults.QemuHost, state: dict[str, str]
) -> None:
    """The token is on the snapshot only while the call is in flight: afterwards its
    description is the operator's (or none), and it is still the current snapshot."""
    domain = faults.unique("sn")
    fault_host.plain(domain)
    for snap, description in (("a", "before the upgrade"), ("b", "")):
        argv = ["snapshot", "create", domain, snap] + (
            ["--description", description] if description else []
        )
        proc = _virtdeck(state, "-c", fault_host.uri, *argv)
        assert proc.returncode == 0, proc.stderr
        conn = fault_host.conn()
        try:
            s = conn.lookupByName(domain).snapshotLookupByName(snap)
            xml, current = s.getXMLDesc(0), s.isCurrent(0)
        finally:
            conn.close()
        assert "virtdeck-operation" not in xml, xml
        assert (f"<description>{description}</description>" in xml) == bool(description), xml
        assert current
    assert not _journals(state)


@pytest.mark.timeout(120 + 60 * RUNS)
def test_dashboard_shows_the_badge_and_recovers_after_sigcont(
    fault_host: faults.QemuHost, big_template: str, state: dict[str, str]
) -> None:
    """The issue's second reproduction (segfault in listAllDomains within ~10 s of SIGCONT, 2 of
    5 cycles): the dashboard as the console script starts it, RUNS hang/resume cycles with a 1 s
    poll, so a refresh is in flight when the daemon stops and when it resumes."""
    Path(state["XDG_CONFIG_HOME"], "virtdeck", "config.toml").write_text("poll_interval = 1\n")
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "tests.fault_probe",
         "--hang", str(fault_host.pid), "--cycles", str(RUNS), "--stopped", "12",
         "-c", fault_host.uri],
        cwd=REPO, env=state, capture_output=True, text=True, timeout=60 + 90 * RUNS,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["cycles"]) == RUNS
    print(f"dashboard hang/resume cycles: {result['cycles']}")
    for cycle in result["cycles"]:
        assert cycle["badge"] <= KEEPALIVE_S + MARGIN_S, result
        assert cycle["recovered"] <= 35, result  # backoff is at most 30 s
    assert result["badges_left"] == {}
    assert result["rows"] >= 1
    assert list(result["generations"].values())[0] >= 2  # it did reconnect


def test_keepalive_ends_a_call_to_a_hung_host_in_the_promised_time(
    fault_host: faults.QemuHost,
) -> None:
    """README: 'a host that dies or hangs turns into an error after about 9 s'. Measured on a
    connection virtdeck opened (no setKeepAlive here: without virtdeck's, the call would wait
    for the daemon forever), through a call in flight and the ones queued behind it."""
    hv = Hypervisor.open(fault_host.uri)
    assert hv.alive
    results: dict[int, tuple[str, float]] = {}

    def call(i: int) -> None:
        t0 = time.monotonic()
        try:
            hv.domains()
            results[i] = ("answered", time.monotonic() - t0)
        except ConnectError as err:
            results[i] = (str(err), time.monotonic() - t0)

    fault_host.hang()
    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(KEEPALIVE_S + MARGIN_S + 2)
    finally:
        fault_host.wake()
    try:
        assert len(results) == 3, f"still waiting after {KEEPALIVE_S + MARGIN_S + 2:g} s"
        for why, took in results.values():
            assert "lost" in why, why
            assert KEEPALIVE_S - 3 <= took <= KEEPALIVE_S + MARGIN_S, f"{why} after {took:.1f} s"
        assert not hv.alive
        # A daemon that resumes: the next connect is a new generation, and it answers.
        generation = hv.generation
        hv.ensure_connected(10)
        assert hv.generation == generation + 1 and hv.domains() is not None
    finally:
        hv.close()


@pytest.mark.timeout(900)
def test_fault_soak_short(ssh_rig: rigs.SshRig) -> None:
    """A few cycles of the soak (benchmarks/soak_faults.py runs it at length): CLI operations on
    three hosts with faults landing at random moments, the dashboard watching; no crash, no hang,
    nothing left."""
    cycles = int(os.environ.get("VIRTDECK_SOAK_CYCLES", "6"))
    report = soak.run(cycles, hosts=3, seed=19, ssh=ssh_rig)
    soak.SUMMARY.append(report.summary())
    failed = [c for c in report.cycles if c.problems]
    assert not failed, "\n".join(f"cycle {c.n}: {c.problems}" for c in failed)
    assert not report.problems, report.problems
