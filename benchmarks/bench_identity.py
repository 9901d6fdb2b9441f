"""Customising clones (hostname + SSH key + first-boot) with virtdeck against raw
virt-customize, measured in the same run.

    .venv/bin/python benchmarks/bench_identity.py [--clones 3] [--runs 1]
    .venv/bin/python benchmarks/bench_identity.py --cloud-init [--clones 10] [--runs 2]

With --cloud-init, the other identity method (benchmarks/bench_seeds.py): N clones with a
cloud-init seed each against N clones without identity (goal: at most 1.5x), and one
virt-customize run beside them, all in the same run.


Three qcow2 overlays of the test guest's disk (tests/guest.py) per side, then, per run:
- raw serial: `virt-customize` on each overlay, one after another;
- raw parallel: all at once (`&` in a shell loop);
- virtdeck serial: `identity.customise_all(workers=1)`;
- virtdeck parallel: `identity.customise_all()` (as many at once as the machine has cores);
- virtdeck all at once: `customise_all(workers=clones)` (what a higher bound would give).
Prints the seconds and virtdeck/raw ratios (the same tool runs underneath: aim ~1.0). Under
TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg, what these machines need) one run is minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import guest  # noqa: E402
from tui.core.identity import Customisation, Identity, customise_all  # noqa: E402
from tui.core.progress import no_progress  # noqa: E402


def overlays(directory: Path, tag: str, count: int, base: Path) -> list[Path]:
    paths = [directory / f"{tag}-{n}.qcow2" for n in range(1, count + 1)]
    for p in paths:
        p.unlink(missing_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(p)],
            check=True,
        )
    return paths


def raw_argv(path: Path, key: Path) -> list[str]:
    return ["virt-customize", "--format", "qcow2", "-a", str(path), "--hostname", path.stem,
            "--ssh-inject", f"root:file:{key}", "--firstboot-command", "true"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clones", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--cloud-init", action="store_true", help="the seeds path (bench_seeds)")
    args = parser.parse_args()
    if args.cloud_init:
        from benchmarks import bench_seeds

        return bench_seeds.run(args.clones or 10, args.runs or 2)
    args.clones = args.clones or 3
    args.runs = args.runs or 1
    os.environ["LIBGUESTFS_BACKEND"] = "direct"
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    base = guest.build().disk
    work = Path(tempfile.mkdtemp(prefix="vdb-identity-", dir="/var/tmp"))
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                        "-f", str(work / "k")], check=True)  # fmt: skip
        key = work / "k.pub"
        who = Identity.from_options(ssh_key_files=[key], first_boot=["true"])
        times: dict[str, list[float]] = {}

        def measure(label: str, fn: object) -> None:
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times.setdefault(label, []).append(time.perf_counter() - start)
            print(f"{label}: {times[label][-1]:.1f} s", flush=True)

        for _ in range(args.runs):
            paths = overlays(work, "raw", args.clones, base)
            measure("raw serial", lambda p=paths: [
                subprocess.run(raw_argv(x, key), check=True, capture_output=True) for x in p
            ])  # fmt: skip
            paths = overlays(work, "rawp", args.clones, base)

            def parallel(p: list[Path] = paths) -> None:
                procs = [subprocess.Popen(raw_argv(x, key), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL) for x in p]  # fmt: skip
                assert all(proc.wait() == 0 for proc in procs)

            measure("raw parallel", parallel)
            for label, workers in (
                ("virtdeck serial", 1),
                ("virtdeck parallel", None),
                ("virtdeck all at once", args.clones),
            ):
                paths = overlays(work, "vd", args.clones, base)
                work_items = [
                    (
                        p.stem,
                        Customisation(((str(p), "qcow2"),), p.stem, who.ssh_keys, who.first_boot),
                    )  # fmt: skip
                    for p in paths
                ]
                measure(label, lambda w=work_items, n=workers: customise_all(
                    w, no_progress, workers=n))  # fmt: skip
        best = {k: min(v) for k, v in times.items()}
        print(f"{args.clones} clones, {os.cpu_count()} cores, best of {args.runs}:")
        for k, v in best.items():
            print(f"  {k:18} {v:6.1f} s  ({v / args.clones:.1f} s per clone)")
        print(f"  ratio serial   virtdeck/raw {best['virtdeck serial'] / best['raw serial']:.2f}")
        print(f"  ratio parallel virtdeck/raw "
              f"{best['virtdeck parallel'] / best['raw parallel']:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
