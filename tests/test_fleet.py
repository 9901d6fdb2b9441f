"""Several hypervisors: events that really arrive, a hung host that blocks nothing.

The rig (tests/rigs.py, fixtures in conftest.py): qemu:///system, the same daemon over sshd on
127.0.0.1 as root, the test user's qemu:///session over ssh (an independent hypervisor), and a
private libvirtd (test driver) that a test stops with SIGSTOP by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import rigs
from tests.lab import SystemLab, domain_xml
from tests.waiting import wait_for as _until
from tui.app import VirtdeckApp
from tui.cli import build_app, setup
from tui.core.models import DomainState
from tui.widgets.domains import DomainsTable

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty XDG_CONFIG_HOME for this test (the real user's config is never read)."""
    home = tmp_path / "config"
    (home / "virtdeck").mkdir(parents=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def write_config(home: Path, text: str) -> None:
    (home / "virtdeck" / "config.toml").write_text(text)


def _virtdeck(
    *argv: str, env: dict[str, str], timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tui", *argv],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
    )  # fmt: skip
    return proc, time.monotonic() - t


# -- events -----------------------------------------------------------------------------------


def test_events_reach_the_dashboard_started_like_the_console_script(
    host_lab: SystemLab, config_home: Path
) -> None:
    """A fresh interpreter (no event loop registered by a fixture) builds the app the way
    `virtdeck` does; with a 60 s poll, the suspend must show within 0.5 s: only an event can."""
    name = host_lab.define("ev")
    host_lab.hv.start(name)
    write_config(config_home, "poll_interval = 60\n")
    probe = subprocess.run(
        [sys.executable, "-m", "tests.dashboard_probe", name, "-c", "qemu:///system"],
        capture_output=True, text=True, cwd=REPO, timeout=90,
        env={**os.environ, "XDG_CONFIG_HOME": str(config_home)},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["poll_interval"] == 60
    assert result["before"] == "running"
    assert result["after"] == "paused"
    assert result["elapsed"] is not None and result["elapsed"] <= 0.5, result


def test_keepalive_is_on_for_connections_virtdeck_opens(hung_daemon: rigs.PrivateDaemon) -> None:
    """Measured, not asked: a call on a connection virtdeck opened to a daemon that then hangs
    ends with "lost" within keepalive's ~9 s (without virtdeck's setKeepAlive it would wait for
    the daemon forever, and this test fails at its deadline)."""
    import threading

    from tui.core.errors import ConnectError
    from tui.core.hypervisor import KEEPALIVE_COUNT, KEEPALIVE_INTERVAL, Hypervisor

    hv = Hypervisor.open(hung_daemon.uri)
    promised = KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)
    outcome: list[tuple[str, float]] = []

    def call() -> None:
        t0 = time.monotonic()
        try:
            hv.domains()
            outcome.append(("answered", time.monotonic() - t0))
        except ConnectError as err:
            outcome.append((str(err), time.monotonic() - t0))

    hung_daemon.hang()
    try:
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(promised + 4)
    finally:
        hung_daemon.wake()
    try:
        assert outcome, f"no error within {promised + 4} s: keepalive is off"
        why, took = outcome[0]
        assert "lost" in why and took <= promised + 4, (why, took)
    finally:
        hv.close()


# -- a hung host in the CLI -------------------------------------------------------------------


def test_ls_answers_for_the_healthy_hosts_while_one_hangs(
    ssh_root_uri: str, session_uri: str, hung_daemon: rigs.PrivateDaemon, host_lab: SystemLab,
    config_home: Path,
) -> None:  # fmt: skip
    name = host_lab.define("ls")
    hung_daemon.hang()
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    uris = ["qemu:///system", ssh_root_uri, session_uri, hung_daemon.uri]
    argv = [a for uri in uris for a in ("-c", uri)]
    proc, elapsed = _virtdeck("--connect-timeout", "3", *argv, "ls", env=env)
    assert elapsed <= 3 + 1, f"ls took {elapsed:.1f} s with a 3 s deadline"
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and hung_daemon.uri in errors[0] and "no answer" in errors[0]
    rows = proc.stdout.splitlines()
    assert rows[0].split()[:2] == ["HOST", "NAME"]
    assert any(r.startswith("qemu:///system ") and name in r for r in rows)
    assert any(r.startswith(ssh_root_uri) and name in r for r in rows)  # same daemon over ssh
    assert not any(hung_daemon.uri in r for r in rows)


def test_an_unreachable_uri_does_not_sink_the_others(config_home: Path, test_uri: str) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    proc, _ = _virtdeck(
        "-c", test_uri, "-c", "qemu+unix:///system?socket=/nonexistent", "ls", "--json", env=env
    )
    assert proc.returncode == 1
    assert {d["name"] for d in json.loads(proc.stdout)} == {
        "alpha",
        "beta",
        "gamma",
        "template-web",
    }
    assert proc.stderr.count("\n") == 1 and "/nonexistent" in proc.stderr


# -- a hung host in the dashboard -------------------------------------------------------------


@pytest.fixture
def fleet_uris(
    ssh_root_uri: str, session_uri: str, hung_daemon: rigs.PrivateDaemon, config_home: Path
) -> list[str]:
    """System, system over ssh, session over ssh and the private daemon, with a config of
    2 s deadlines and 1 s polls (the dashboard is built the way `virtdeck` builds it)."""
    write_config(config_home, "poll_interval = 1\n[timeouts]\nconnect = 2\nanswer = 2\n")
    return ["qemu:///system", ssh_root_uri, session_uri, hung_daemon.uri]


def _rows(app: VirtdeckApp) -> dict[tuple[str, str], object]:
    table = app.screen.query_one(DomainsTable)
    return {(d.host, d.name): d for d in table.domains.values()}


def _session_domain_xml(name: str) -> str:
    return domain_xml(name, [], virt_type="qemu", macs=())


async def test_dashboard_starts_with_a_hung_host_and_gets_it_back(
    fleet_uris: list[str], hung_daemon: rigs.PrivateDaemon, session_rig: rigs.SessionRig,
    host_lab: SystemLab,
) -> None:  # fmt: skip
    uris = fleet_uris
    hung_daemon.hang()
    argv = [a for uri in uris for a in ("-c", uri)]
    t0 = time.monotonic()
    args, settings = setup(argv)
    app = build_app(args, settings)
    assert time.monotonic() - t0 < settings.connect_timeout + 1
    extra = host_lab.name("sess")
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            healthy = [app.hosts[uri] for uri in uris[:3]]
            await _until(pilot, lambda: all(h.last_answer for h in healthy), 15,
                         "answers from the healthy hosts")  # fmt: skip
            assert hung_daemon.uri in app.lost
            header = str(app.screen.query_one("#hosts").render())
            assert "NO ANSWER" in header.upper() or "UNREACHABLE" in header.upper()
            # keys work while the hung host is still stopped
            await pilot.press("o")
            await pilot.pause()
            assert app.screen.query_one(DomainsTable).sort_column == "state"
            # a change on a healthy host shows (an event from the session daemon over ssh)
            xml = Path(host_lab.dir / "sess.xml")
            xml.write_text(_session_domain_xml(extra))
            xml.chmod(0o644)
            session_rig.virsh("define", str(xml))
            await _until(pilot, lambda: (uris[2], extra) in _rows(app), 5,
                         "a domain defined on the session host")  # fmt: skip
            assert hung_daemon.uri in app.lost
            # the host wakes: it comes back by itself
            hung_daemon.wake()
            await _until(pilot, lambda: hung_daemon.uri not in app.lost, 40,
                         "the woken host reconnected")  # fmt: skip
            await _until(pilot, lambda: (hung_daemon.uri, "test") in _rows(app), 10,
                         "the woken host's rows")  # fmt: skip
    finally:
        session_rig._virsh("undefine", extra)
        for hv in app.hypervisors:
            hv.close(timeout=1)


async def test_a_host_hanging_later_is_greyed_and_the_others_keep_updating(
    fleet_uris: list[str], hung_daemon: rigs.PrivateDaemon, host_lab: SystemLab
) -> None:
    uris = fleet_uris
    name = host_lab.define("later")
    args, settings = setup([a for uri in uris for a in ("-c", uri)])
    app = build_app(args, settings)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            await _until(pilot, lambda: (hung_daemon.uri, "test") in _rows(app), 15,
                         "the private daemon's domain")  # fmt: skip
            hung_daemon.hang()
            await _until(pilot, lambda: hung_daemon.uri in app.lost, 15,
                         "the hung host marked as not answering")  # fmt: skip
            table = app.screen.query_one(DomainsTable)
            assert "no answer for" in table.stale[hung_daemon.uri]
            key = f"{hung_daemon.uri}|" + _rows(app)[(hung_daemon.uri, "test")].uuid  # type: ignore[attr-defined]
            assert "no answer for" in str(table.get_row(key))
            # a healthy host keeps updating: start a domain there
            host_lab.hv.start(name)
            await _until(
                pilot,
                lambda: (
                    getattr(_rows(app).get(("qemu:///system", name)), "state", None)
                    is DomainState.RUNNING
                ),
                5,
                "the started domain shown as running",
            )
            assert hung_daemon.uri in app.lost
            hung_daemon.wake()
            await _until(pilot, lambda: hung_daemon.uri not in app.lost, 40,
                         "the woken host answering again")  # fmt: skip
            assert hung_daemon.uri not in app.screen.query_one(DomainsTable).stale
    finally:
        for hv in app.hypervisors:
            hv.close(timeout=1)
