"""A group snapshot and a group rollback with virtdeck against the raw virsh loop, same run.

    .venv/bin/python benchmarks/bench_groups.py [--runs 5] [--count 10] [--uri qemu:///system]

COUNT shut-off domains with a 64 MiB qcow2 disk each, then, per run:
- snapshot: one `virtdeck snapshot create NAME --match 'PREFIX-*'` (a process: start, connect,
  plan every member, take every snapshot, journalled) vs one `virsh snapshot-create-as` per
  domain (what a shell loop does);
- rollback: one `virtdeck rollback --match 'PREFIX-*'` vs one `virsh snapshot-revert
  --current` per domain.
Prints median and best times and virtdeck/raw ratios (aim <= 1.0: one process for the group
against one per domain). Everything is named with a unique prefix and removed at the end, even
on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import domain_xml  # noqa: E402
from tui.core.hypervisor import Hypervisor  # noqa: E402

IMAGES = Path("/var/lib/libvirt/images")
REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, cwd=REPO)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, hv: Hypervisor, count: int) -> None:
        self.hv = hv
        self.prefix = f"vdb-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = IMAGES / self.prefix
        self.dir.mkdir()
        self.names = [f"{self.prefix}-g{i}" for i in range(1, count + 1)]
        virt_type = hv.virt_type()
        for name in self.names:
            disk = str(self.dir / f"{name}.qcow2")
            run("qemu-img", "create", "-q", "-f", "qcow2", disk, "64M")
            hv.conn.defineXML(domain_xml(name, [(disk, "qcow2")], virt_type=virt_type))

    def virtdeck(self, *argv: str) -> None:
        run(sys.executable, "-m", "tui", "-c", self.hv.uri, *argv, "--match", f"{self.prefix}-g*")

    def raw_snapshot(self, snap: str) -> float:
        def loop() -> None:
            for name in self.names:
                run("virsh", "-q", "-c", self.hv.uri, "snapshot-create-as", name, snap)

        return timed(loop)

    def raw_rollback(self) -> float:
        def loop() -> None:
            for name in self.names:
                run("virsh", "-q", "-c", self.hv.uri, "snapshot-revert", name, "--current")

        return timed(loop)

    def cleanup(self) -> None:
        for dom in self.hv.conn.listAllDomains(0):
            if dom.name().startswith(self.prefix):
                if dom.isActive():
                    dom.destroy()
                for snap in dom.listAllSnapshots(0):
                    snap.delete(2)  # metadata only: the images go with the directory
                dom.undefine()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()
    hv = Hypervisor.open(args.uri)
    bench = Bench(hv, args.count)
    keys = ("raw snapshot", "virtdeck snapshot", "raw rollback", "virtdeck rollback")
    times: dict[str, list[float]] = {k: [] for k in keys}
    try:
        for r in range(args.runs):
            # Alternate the order so neither side always runs on a warmer daemon.
            sides = [
                ("raw", lambda r=r: bench.raw_snapshot(f"raw{r}"), bench.raw_rollback),
                ("virtdeck",
                 lambda r=r: timed(lambda: bench.virtdeck("snapshot", "create", f"vd{r}")),
                 lambda: timed(lambda: bench.virtdeck("rollback"))),
            ]  # fmt: skip
            for label, snap, back in sides if r % 2 == 0 else reversed(sides):
                times[f"{label} snapshot"].append(snap())
                times[f"{label} rollback"].append(back())
        print(f"{args.count} shut-off domains (64 MiB qcow2), {args.runs} runs, {hv.uri}")
        for stat_name, agg in (("median", statistics.median), ("best", min)):
            v = {k: agg(t) for k, t in times.items()}
            for verb in ("snapshot", "rollback"):
                ratio = v[f"virtdeck {verb}"] / v[f"raw {verb}"]
                print(
                    f"  {stat_name:6} group {verb:8}: virtdeck {v[f'virtdeck {verb}']:.3f} s, "
                    f"virsh loop {v[f'raw {verb}']:.3f} s, ratio {ratio:.2f} (aim <= 1.00)"
                )
    finally:
        bench.cleanup()
        hv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
