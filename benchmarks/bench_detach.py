"""Detaching a thin clone with virtdeck against `qemu-img convert` of the same chain, same run.

    .venv/bin/python benchmarks/bench_detach.py [--runs 5] [--uri qemu:///system]

A 1 GiB template (fully allocated qcow2) and, per run, two thin clones with 64 MiB of their own
data each: one detached by virtdeck while shut off (plan_detach + execute_detach: convert into
a new image, switch the definition, remove the overlay), the other's chain converted by
`qemu-img convert` alone. Then a running clone is detached live (block pull) and timed too
(no raw counterpart: QEMU does the copy either way). Prints median and best times and the
shut-off ratio (aim: <= 1.1). Everything is named with a unique prefix and removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_clone import Bench, run, timed  # noqa: E402
from tui.core import detach  # noqa: E402
from tui.core.clones import execute_clone, plan_clone  # noqa: E402
from tui.core.hypervisor import Hypervisor  # noqa: E402


def thin_clone(bench: Bench, template: str, name: str) -> str:
    """A shut-off thin clone with 64 MiB of its own data; its overlay."""
    plan = plan_clone(bench.hv, template, bench.name(name), allow_unsealed=True,
                      backup_dir=bench.dir / "backups")  # fmt: skip
    execute_clone(bench.hv, plan)
    overlay = plan.items[0].disks[0].path
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 256M 64M", overlay)
    bench.hv.invalidate()
    return overlay


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()
    hv = Hypervisor.open(args.uri)
    bench = Bench(hv)
    times: dict[str, list[float]] = {"raw": [], "virtdeck": [], "live": []}
    try:
        template, _ = bench.make_template()
        for r in range(args.runs):
            vd = bench.name(f"vd{r}")
            thin_clone(bench, template, f"vd{r}")
            raw_overlay = thin_clone(bench, template, f"raw{r}")
            dst = str(bench.dir / f"rawfull{r}.qcow2")

            def raw(src: str = raw_overlay, dst: str = dst) -> float:
                return timed(lambda: run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                                         src, dst))  # fmt: skip

            def virtdeck(name: str = vd) -> float:
                return timed(lambda: detach.execute_detach(hv, detach.plan_detach(hv, name)))

            pairs = [("raw", raw), ("virtdeck", virtdeck)]
            for label, fn in pairs if r % 2 == 0 else reversed(pairs):
                times[label].append(fn())
            live = bench.name(f"live{r}")
            thin_clone(bench, template, f"live{r}")
            hv.start(live)
            times["live"].append(
                timed(lambda name=live: detach.execute_detach(hv, detach.plan_detach(hv, name)))
            )
            hv.destroy(live)
            bench.drop_clones()
        print(f"template: 1 GiB fully allocated qcow2, clone: 64 MiB own, {args.runs} runs, "
              f"{hv.uri}")  # fmt: skip
        for stat_name, agg in (("median", statistics.median), ("best", min)):
            v = {k: agg(t) for k, t in times.items()}
            print(
                f"  {stat_name:6} detach shut off: virtdeck {v['virtdeck']:.3f} s, qemu-img "
                f"convert {v['raw']:.3f} s, ratio {v['virtdeck'] / v['raw']:.2f} (aim <= 1.10); "
                f"detach running (block pull): {v['live']:.3f} s"
            )
    finally:
        bench.cleanup()
        hv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
