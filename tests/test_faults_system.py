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
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


@pytest.mark.parametrize("run", range(RUNS))
def test_full_clone_to_a_host_that_hangs_ends_in_one_line_within_keepalive_and_recover_clears(
    fault_host: faults.QemuHost, big_template: str, state: dict[str, str], run: int
) -> None:
    """The issue's first reproduction (exit 139 on SIGCONT, silent for 30 s): SIGSTOP once the
    copy is under way; virtdeck must end with one line within keepalive's deadline, without a
    crash, keeping the journal for `recover`; after SIGCONT `recover` leaves nothing."""
    before = fault_host.inventory()
    clone = faults.unique("cl")
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "tui", "-c", fault_host.uri,
         "clone", big_template, clone, "--full"],
        cwd=REPO, env=state, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    vol = fault_host.pool_dir / f"{clone}.img"
    deadline = time.monotonic() + 60
    while not vol.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vol.exists(), "the copy never started"
    fault_host.hang()
    stopped = time.monotonic()
    try:
        _out, err = proc.communicate(timeout=KEEPALIVE_S + MARGIN_S + 30)
        elapsed = time.monotonic() - stopped
    finally:
        fault_host.wake()
    assert proc.returncode == 1, f"exit {proc.returncode}: {err[-3000:]}"
    assert "Fatal Python error" not in err and "Traceback" not in err, err[-3000:]
    assert elapsed <= KEEPALIVE_S + MARGIN_S, f"ended {elapsed:.1f} s after SIGSTOP"
    last = err.strip().splitlines()[-1]
    assert last.startswith("virtdeck: ") and "keepalive" in last, last
    assert "'virtdeck recover'" in last, last  # the host is gone: the journal stays, it says so
    assert _journals(state), "the journal was lost"
    # The host is back: recover undoes it (libvirt may still be finishing the copy it started).
    for attempt in range(20):
        rec = _virtdeck(state, "-c", fault_host.uri, "recover", "--yes")
        assert rec.returncode >= 0 and "Traceback" not in rec.stderr, rec.stderr
        if not _journals(state):
            break
        time.sleep(1 + attempt)
    assert not _journals(state), rec.stderr
    assert fault_host.inventory() == before


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
