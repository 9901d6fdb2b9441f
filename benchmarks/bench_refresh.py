"""One inventory refresh (domains, states, stats) at 50 and 500 domains, against virsh.

Both sides read the same test-driver node XML in the same run. The baseline is what a shell
dashboard would do per refresh: `virsh list --all` + `virsh domstats`. Aim: under 50 ms per
refresh at 500 domains, and under 150 MB resident for the running TUI.

    .venv/bin/python benchmarks/bench_refresh.py
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tui.core.hypervisor import Hypervisor, start_event_loop  # noqa: E402
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml  # noqa: E402

STATES = ("running", "shutoff", "paused")


def lab(n: int, d: Path) -> str:
    specs = [
        DomainSpec(
            f"vm-{i:04d}",
            STATES[i % 3],
            vcpus=1 + i % 4,
            memory_mib=512,
            disks=(DiskSpec(f"/var/lib/libvirt/images/vm-{i:04d}.qcow2"),),
            macs=(f"52:54:00:00:{i // 256:02x}:{i % 256:02x}",),
        )
        for i in range(n)
    ]
    path = d / f"node-{n}.xml"
    path.write_text(node_xml(specs))
    return f"test://{path}"


def timed(fn: object, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def virsh_refresh(uri: str) -> None:
    for args in (["list", "--all"], ["domstats"]):
        subprocess.run(["virsh", "-c", uri, *args], check=True, capture_output=True)


def tui_peak_rss_mib(uri: str) -> float:
    from tui.app import VirtdeckApp

    async def run() -> None:
        app = VirtdeckApp([Hypervisor.open(uri)], poll_interval=0.2)
        async with app.run_test(size=(140, 45)) as pilot:
            for _ in range(10):  # several polls of 500 rows
                await pilot.pause(0.25)
            await app.workers.wait_for_complete()

    asyncio.run(run())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    start_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'domains':>8} {'virtdeck ms':>12} {'virsh ms':>10} {'ratio':>7}")
        for n in (50, 500):
            uri = lab(n, Path(tmp))
            hv = Hypervisor.open(uri)
            hv.domains()  # first refresh reads each domain's XML once; later ones use the cache
            ours = timed(hv.domains, 20)
            theirs = timed(lambda uri=uri: virsh_refresh(uri), 5)
            print(f"{n:>8} {ours * 1000:>12.2f} {theirs * 1000:>10.1f} {theirs / ours:>6.1f}x")
            hv.close()
        cold = Hypervisor.open(lab(500, Path(tmp)))
        t = time.perf_counter()
        cold.domains()
        first_ms = (time.perf_counter() - t) * 1e3
        print(f"first refresh at 500 domains (reads every XML): {first_ms:.1f} ms")
        rss = tui_peak_rss_mib(lab(500, Path(tmp)))
        print(f"peak RSS of the TUI with 500 domains: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
