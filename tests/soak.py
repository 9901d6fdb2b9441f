"""The fault soak: the dashboard and CLI operations against up to three hosts while faults land
at random moments (tests/test_faults_system.py runs a few cycles; benchmarks/soak_faults.py the
full length).

Hosts are private session daemons (tests/faults.py), so only daemons this run started get
faults. Each cycle picks a host, starts one CLI operation on it (`clone --full`, `template copy`
to another host, `snapshot create`, `ls`) in a fresh interpreter with faulthandler on, and at a
random moment injects one fault: SIGSTOP (for 1-14 s, then SIGCONT), a kill of the ssh process
carrying the CLI's connection (half of the time the dashboard's to that host too), or a daemon
restart (SIGKILL, start). The third host is reached through the latency proxy
(tests/latency_proxy.py, 10 ms each way by default): every call to it is slow, faults or not.
Then it checks:

- no crash (exit status negative, "Fatal Python error") and no traceback, on stdout or stderr;
- the command ended within its deadline (keepalive, the stop, and a margin);
- nothing left: after `virtdeck recover --yes`, the host has exactly the domains, volumes and
  snapshots it had before the cycle (what a successful operation made is removed by the soak and
  must have existed), and no journal remains.

Meanwhile the dashboard (tests/fault_probe.py, the console script's way, headless) watches all
hosts; at the end every host must answer again without a badge, and the process must not crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from tests import faults, rigs

REPO = Path(__file__).resolve().parents[1]
OPS = ("clone", "copy", "snapshot", "ls")
FAULTS = ("stop", "transport", "restart")
CLI_DEADLINE = 90.0  # keepalive (9 s) + the longest stop (14 s) + a copy + the undo, with margin


@dataclass
class Cycle:
    n: int
    host: str
    op: str
    fault: str
    rc: int = 0
    seconds: float = 0.0
    in_flight: bool = False  # the fault landed while the command ran
    undid_itself: bool = False  # cut off, it waited for the host and undid its work (the CLI)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    cycles: list[Cycle] = field(default_factory=list)
    dashboard: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return sum(1 for c in self.cycles if not c.problems)

    def summary(self) -> str:
        by_fault = {f: sum(1 for c in self.cycles if c.fault.startswith(f)) for f in FAULTS}
        failed = [c for c in self.cycles if c.problems]
        landed = sum(1 for c in self.cycles if c.in_flight)
        undid = sum(1 for c in self.cycles if c.undid_itself)
        return (
            f"fault soak: {self.survived}/{len(self.cycles)} cycles survived, "
            f"{landed} with the fault landing while the command ran, {undid} undone by the "
            "command itself once the host answered again "
            f"({', '.join(f'{k} {v}' for k, v in by_fault.items())}); "
            f"{len(failed)} failed; at the end (recover --json, inventories, dashboard): "
            f"{'clean' if not self.problems else self.problems}"
        )


def _crashed(text: str) -> bool:
    return "Fatal Python error" in text or "Traceback (most recent call last)" in text


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid:
                out.append(int(proc.name))
    return out


def _transport(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == "ssh":
                out.append(child)
    return out


def _kill_transport(pid: int, user: str = "") -> bool:
    """Kill the ssh clients the process `pid` started (its connections' transports; with
    `user`, only those to that host)."""
    killed = False
    for child in _transport(pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if user and f"{user}@127.0.0.1".encode() not in argv:
                continue
            os.kill(child, signal.SIGKILL)
            killed = True
    return killed


class Soak:
    def __init__(self, ssh: rigs.SshRig, hosts: list[faults.QemuHost], seed: int) -> None:
        self.ssh = ssh
        self.hosts = hosts
        self.rng = random.Random(seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="vdt-soak-"))
        (self.tmp / "config" / "virtdeck").mkdir(parents=True)
        (self.tmp / "config" / "virtdeck" / "config.toml").write_text("poll_interval = 1\n")
        self.state = self.tmp / "state"
        self.dashboard_pid = 0
        self.templates: dict[str, str] = {}
        self.plains: dict[str, str] = {}
        for h in hosts:
            self.templates[h.uri] = faults.unique("tpl")
            h.template(self.templates[h.uri], 512)
            self.plains[h.uri] = faults.unique("snap")
            h.plain(self.plains[h.uri])

    def env(self, state: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "XDG_CONFIG_HOME": str(self.tmp / "config"),
            "XDG_STATE_HOME": str(state or self.state),
        }

    def cli(self, uri: str, *argv: str, timeout: float = CLI_DEADLINE) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "tui", "-c", uri, *argv],
            cwd=REPO, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def leftovers(self, initial: dict[str, tuple[set[str], set[str], list[str]]]) -> list[str]:
        """The end of the run: `virtdeck recover --json` lists nothing, and every host has the
        domains, volumes and snapshots it had before the first cycle."""
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-m", "tui", "recover", "--json"],
            cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        problems = []
        if proc.returncode != 0 or json.loads(proc.stdout or "null") != []:
            problems.append(f"recover --json at the end: exit {proc.returncode}: "
                            f"{proc.stdout[-1000:]}{proc.stderr[-1000:]}")  # fmt: skip
        for h in self.hosts:
            with contextlib.suppress(libvirt.libvirtError):
                now = self.snapshot_of(h)
                if now != initial[h.uri]:
                    problems.append(f"{h.user} at the end: left {_diff(initial[h.uri], now)}")
        return problems

    def journals(self) -> list[str]:
        d = self.state / "virtdeck" / "journal"
        return sorted(p.name for p in d.glob("*.json")) if d.exists() else []

    def snapshot_of(self, host: faults.QemuHost) -> tuple[set[str], set[str], list[str]]:
        doms, vols = host.inventory()
        return doms, vols, host.snapshots(self.plains[host.uri])

    # -- one cycle --------------------------------------------------------------------------

    def cycle(self, n: int, log: Callable[[str], None]) -> Cycle:
        host = self.rng.choice(self.hosts)
        op = self.rng.choice(OPS)
        fault = self.rng.choice(FAULTS)
        others = [h for h in self.hosts if h is not host]
        if op == "copy" and not others:
            op = "clone"
        c = Cycle(n, host.user, op, fault)
        before = {h.uri: self.snapshot_of(h) for h in self.hosts}
        # what a successful operation made: removed by the soak (and it must be there)
        made: Callable[[], None] | None = None
        proc_uri = host.uri
        if op == "clone":
            name = faults.unique("cl")
            argv = ["clone", self.templates[host.uri], name, "--full"]
            made = lambda: self._remove(host, name)  # noqa: E731
        elif op == "copy":
            source = self.rng.choice(others)
            tpl = self.templates[source.uri]
            argv = ["template", "copy", tpl, "--to", host.uri]
            made = lambda: self._remove(host, tpl)  # noqa: E731
            c.host = f"{source.user}->{host.user}"
            proc_uri = source.uri
        elif op == "snapshot":
            snap = f"s{n}"
            argv = ["snapshot", "create", self.plains[host.uri], snap]
            made = lambda: self._unsnap(host, snap)  # noqa: E731
        else:
            argv = ["ls"]
        t0 = time.monotonic()
        proc = self.cli(proc_uri, *argv)
        # Faults land once the command is talking to the host (its ssh transport exists), at a
        # random moment within what the operation usually takes.
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 15 and not _transport(proc.pid):
            time.sleep(0.02)
        spread = {"ls": 0.4, "snapshot": 0.8}.get(op, 2.5)
        time.sleep(self.rng.uniform(0.0, spread))
        stopped_for = 0.0
        c.in_flight = proc.poll() is None
        if fault == "stop":
            stopped_for = self.rng.uniform(1.0, 14.0)
            host.hang()
            time.sleep(stopped_for)
            host.wake()
        elif fault == "transport":
            c.in_flight = _kill_transport(proc.pid)
            if self.dashboard_pid and self.rng.random() < 0.5:  # the dashboard's too, at times
                c.fault = "transport+dashboard"
                _kill_transport(self.dashboard_pid, host.user)
        else:
            host.restart()
        try:
            out, err = proc.communicate(timeout=CLI_DEADLINE)
        except subprocess.TimeoutExpired:
            # faulthandler's dump of every thread says where it hung
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            c.problems.append(f"hung past {CLI_DEADLINE:g} s: {err[-3000:]}")
        c.seconds = round(time.monotonic() - t0, 1)
        c.rc = proc.returncode
        c.undid_itself = "answered again after" in err
        if proc.returncode < 0 or _crashed(out + err):
            c.problems.append(f"crash (exit {proc.returncode}): {err[-3000:]}")
        elif proc.returncode not in (0, 1):
            c.problems.append(f"exit {proc.returncode}: {err[-600:]}")
        elif proc.returncode == 1 and not err.strip().splitlines()[-1].startswith("virtdeck: "):
            c.problems.append(f"no one-line error: {err[-600:]}")
        # Recover what the failure left, then the host must be as it was.
        if proc.returncode == 0 and made is not None:
            try:
                made()
            except libvirt.libvirtError as e:
                c.problems.append(f"exit 0 but its result is not there: {e}")
        self._recover(c, [host] + ([] if op != "copy" else [h for h in others]))
        for h in self.hosts:
            now = self.snapshot_of(h)
            if now != before[h.uri]:
                c.problems.append(f"{h.user}: left {_diff(before[h.uri], now)}")
        if self.journals():
            c.problems.append(f"journal left: {self.journals()}")
        what = "ok" if not c.problems else "FAILED " + "; ".join(p[:300] for p in c.problems)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        log(
            f"cycle {n}: {c.op} on {c.host}, {fault}"
            + (f" {stopped_for:.1f} s" if stopped_for else "")
            + ("" if c.in_flight else " (after the command ended)")
            + f": exit {c.rc} after {c.seconds} s ({last[:140]})"
            + (" (undid itself)" if c.undid_itself else "")
            + f" -> {what}"
        )
        return c

    def _remove(self, host: faults.QemuHost, name: str) -> None:
        conn = host.conn()
        try:
            dom = conn.lookupByName(name)
            disks = [
                line.split("'")[1]
                for line in dom.XMLDesc(0).splitlines()
                if "<source file=" in line
            ]
            dom.undefine()
            for path in disks:
                conn.storageVolLookupByPath(path).delete(0)
        finally:
            conn.close()

    def _unsnap(self, host: faults.QemuHost, snap: str) -> None:
        conn = host.conn()
        try:
            conn.lookupByName(self.plains[host.uri]).snapshotLookupByName(snap).delete(0)
        finally:
            conn.close()

    def _recover(self, c: Cycle, hosts: list[faults.QemuHost]) -> None:
        for h in hosts:
            if h.stopped:
                h.wake()
        for attempt in range(20):
            if not self.journals():
                return
            uris = [a for h in hosts for a in ("-c", h.uri)]
            proc = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-m", "tui", *uris, "recover", "--yes"],
                cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if proc.returncode < 0 or _crashed(proc.stdout + proc.stderr):
                c.problems.append(f"recover crashed: {proc.stderr[-2000:]}")
                return
            time.sleep(1 + attempt)  # a copy libvirt still finishes keeps its pool busy


def _diff(
    before: tuple[set[str], set[str], list[str]], now: tuple[set[str], set[str], list[str]]
) -> str:
    parts = []
    for label, b, a in zip(("domains", "volumes", "snapshots"), before, now, strict=True):
        extra, gone = set(a) - set(b), set(b) - set(a)
        if extra:
            parts.append(f"{label} +{sorted(extra)}")
        if gone:
            parts.append(f"{label} -{sorted(gone)}")
    return ", ".join(parts)


SUMMARY: list[str] = []  # printed by tests/conftest.py in the test run's summary


def run(
    cycles: int,
    *,
    hosts: int = 3,
    seed: int = 19,
    log: Callable[[str], None] = print,
    ssh: rigs.SshRig | None = None,
    budget: float | None = None,
    latency_ms: float = 10.0,
) -> Report:
    """`cycles` fault cycles against `hosts` private hosts (users vdfault2.., vdfault1 is the
    fault tests' own), the dashboard watching them all."""
    report = Report()
    with contextlib.ExitStack() as stack:
        if ssh is None:
            ssh = stack.enter_context(rigs.ssh_rig())
        rig_hosts = [
            stack.enter_context(faults.qemu_host(ssh, f"vdfault{i + 2}")) for i in range(hosts)
        ]
        if latency_ms and len(rig_hosts) > 1:
            # the last host is far away: its ssh goes through the latency proxy
            far = rig_hosts[-1]
            port = stack.enter_context(rigs.latency_proxy(ssh.port, latency_ms))
            far.uri = far.uri.replace(f":{ssh.port}/", f":{port}/")
            log(f"{far.user} reached with {latency_ms:g} ms added each way")
        soak = Soak(ssh, rig_hosts, seed)
        stop_file = soak.tmp / "stop"
        dash_state = soak.tmp / "dash-state"
        dash = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "tests.fault_probe",
             "--watch", "86400", "--until", str(stop_file),
             *[a for h in rig_hosts for a in ("-c", h.uri)]],
            cwd=REPO, env=soak.env(dash_state), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        soak.dashboard_pid = dash.pid
        initial = {h.uri: soak.snapshot_of(h) for h in rig_hosts}
        try:
            start = time.monotonic()
            for n in range(1, cycles + 1):
                report.cycles.append(soak.cycle(n, log))
                if dash.poll() is not None:
                    break
                if budget is not None and time.monotonic() - start > budget:
                    log(f"time budget of {budget:g} s spent after {n} cycles")
                    break
        finally:
            stop_file.touch()
            try:
                out, err = dash.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                dash.send_signal(signal.SIGABRT)
                out, err = dash.communicate(timeout=30)
                report.problems.append(f"dashboard hung: {err[-3000:]}")
        report.problems += soak.leftovers(initial)
        if dash.returncode != 0 or _crashed(err):
            report.problems.append(f"dashboard exit {dash.returncode}: {err[-3000:]}")
        else:
            report.dashboard = json.loads(out.strip().splitlines()[-1])
            if report.dashboard.get("badges_left"):
                report.problems.append(f"badges left: {report.dashboard['badges_left']}")
    log(report.summary())
    return report
