"""A refresh over three hypervisors costs about the slowest one, not the sum.

Hosts (tests/rigs.py, all on this machine, over sshd on 127.0.0.1): qemu:///system as root
twice (two ssh ports) and the test user's qemu:///session. Real hosts are not 0.05 ms away, so
each ssh connection goes through a proxy adding LATENCY_MS each way (tests/latency_proxy.py;
the loopback interface itself is left alone). One refresh = `Hypervisor.domains()`
(inventory, states, stats). The fleet refresh runs the hosts in parallel
(tui.core.fleet.on_each, what `virtdeck ls` does; the dashboard gives each host its own worker
the same way). Aim: fleet <= 1.2x the slowest single host. Also printed: the libvirt calls that
reach a daemon per host per refresh (counted by forwarding the real connection through a
counter), and the same run without the added latency.

    .venv/bin/python benchmarks/bench_fleet.py      # as root (starts sshd; stops it after)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libvirt  # noqa: E402

from tests import rigs  # noqa: E402
from tui.core.fleet import connect_all, on_each  # noqa: E402
from tui.core.hypervisor import Hypervisor, start_event_loop  # noqa: E402

REPEAT = 30
LATENCY_MS = 5.0
LOCAL_CALLS = {"name", "UUIDString", "UUID", "ID", "connect"}  # answered from the handle


class Counting:
    def __init__(self, target: Any, counter: list[str]) -> None:
        self._target, self._counter = target, counter

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not callable(value) or attr in LOCAL_CALLS:
            return value

        def call(*args: Any) -> Any:
            self._counter.append(attr)
            return wrap(value(*args), self._counter)

        return call


def wrap(result: Any, counter: list[str]) -> Any:
    if isinstance(result, libvirt.virDomain):
        return Counting(result, counter)
    if isinstance(result, list | tuple):
        return type(result)(wrap(r, counter) for r in result)
    return result


def median_ms(fn: Any) -> float:
    samples = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def round_trips(hv: Hypervisor) -> int:
    calls: list[str] = []
    real = hv._conn
    hv._conn = Counting(real, calls)
    try:
        hv.domains()
    finally:
        hv._conn = real
    return len(calls)


def run(uris: list[str], names: list[str]) -> None:
    hvs, failures = connect_all(uris, timeout=10)
    if failures:
        raise SystemExit(f"bench_fleet: {failures}")
    for hv in hvs:
        hv.domains()  # the first refresh reads each domain's XML once
    print(f"{'host':<22} {'domains':>7} {'refresh ms':>11} {'round trips/tick':>17}")
    singles = []
    for name, hv in zip(names, hvs, strict=True):
        ms = median_ms(hv.domains)
        singles.append(ms)
        n = len(hv.domains())
        print(f"{name:<22} {n:>7} {ms:>11.2f} {round_trips(hv):>17}")
    fleet = median_ms(lambda: on_each(hvs, lambda hv: hv.domains(), timeout=10))
    slowest, total = max(singles), sum(singles)
    print(f"{'all 3 in parallel':<22} {'':>7} {fleet:>11.2f}")
    print(
        f"fleet / slowest single host: {fleet / slowest:.2f}x (aim <= 1.2x); "
        f"fleet / sum of the three: {fleet / total:.2f}x"
    )
    for hv in hvs:
        hv.close()


def main() -> None:
    start_event_loop()
    names = ["system over ssh", "system over ssh #2", "session over ssh"]
    with rigs.ssh_rig() as ssh, rigs.session_rig(ssh) as session:
        port = ssh.port
        with (
            rigs.latency_proxy(port, LATENCY_MS) as p1,
            rigs.latency_proxy(port, LATENCY_MS) as p2,
            rigs.latency_proxy(port, LATENCY_MS) as p3,
        ):
            print(f"-- {LATENCY_MS:g} ms added each way (hosts on a network)")
            uris = []
            for p, user, path in ((p1, "root", "/system"), (p2, "root", "/system"),
                                  (p3, rigs.TEST_USER, "/session")):  # fmt: skip
                ssh.port = p
                uris.append(ssh.uri(user, path))
            ssh.port = port
            run(uris, names)
        print("-- loopback, no added latency (sub-millisecond refreshes: Python-bound)")
        run([ssh.uri("root", "/system"), "qemu:///system", session.uri],
            ["system over ssh", "system (unix socket)", "session over ssh"])  # fmt: skip


if __name__ == "__main__":
    main()
