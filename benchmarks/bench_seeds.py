"""Clones with a cloud-init seed each against clones with no identity, and against one
virt-customize run, measured in the same run (issue 22).

    .venv/bin/python benchmarks/bench_seeds.py [--clones 10] [--runs 2] [--no-virt-customize]

On qemu:///system, a 1 GiB template (not sealed, no OS: the seeds are only written, never
booted here), per run: `virtdeck clone T x --count N` and the same with `--identity
cloud-init --ssh-key K --ip 10.99.RUN.10/24+` (the whole command, as an operator runs it);
then `virt-customize` of one overlay of the test guest (tests/guest.py) with a hostname, a
key and a first-boot command: what one clone's identity costs the other way. Prints the
seconds and the seeded/plain ratio (goal: at most 1.5).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_identity import overlays, raw_argv  # noqa: E402
from tests import guest  # noqa: E402
from tests.lab import SystemLab  # noqa: E402
from tui.core import templates  # noqa: E402
from tui.core.hypervisor import Hypervisor  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-virt-customize", action="store_true")
    args = parser.parse_args()
    return run(args.clones, args.runs, virt_customize=not args.no_virt_customize)


def run(clones: int, runs: int, *, virt_customize: bool = True) -> int:
    """Measure and print; also `benchmarks/bench_identity.py --cloud-init`."""
    hv = Hypervisor.open("qemu:///system")
    lab = SystemLab(hv)
    work = Path(tempfile.mkdtemp(prefix="vdb-seeds-", dir="/var/tmp"))
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                        "-f", str(work / "k")], check=True)  # fmt: skip
        key = work / "k.pub"
        t = lab.define("t", [(lab.disk("t.qcow2", "1G"), "qcow2")])
        plan = templates.plan_template(hv, t, name=t, seal=False, backup_dir=work)
        templates.execute_template(hv, plan)
        times: dict[str, list[float]] = {}
        for n in range(runs):
            for label, extra in (
                ("plain", []),
                (
                    "cloud-init",
                    [
                        "--identity",
                        "cloud-init",
                        "--ssh-key",
                        str(key),
                        "--ip",
                        f"10.99.{n}.10/24+",
                    ],
                ),  # fmt: skip
            ):
                name = lab.name(f"{label[:2]}{n}")
                argv = [sys.executable, "-m", "tui", "-c", hv.uri, "clone", t, name,
                        "--count", str(clones), "--allow-unsealed", "--backup-dir",
                        str(work), *extra]  # fmt: skip
                start = time.perf_counter()
                proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
                took = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                times.setdefault(label, []).append(took)
                print(f"{clones} clones, {label}: {took:.2f} s", flush=True)
        if virt_customize:
            os.environ["LIBGUESTFS_BACKEND"] = "direct"
            os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
            (path,) = overlays(work, "vc", 1, guest.build().disk)
            start = time.perf_counter()
            subprocess.run(raw_argv(path, key), check=True, capture_output=True)
            times["virt-customize, 1 clone"] = [time.perf_counter() - start]
            print(f"virt-customize, 1 clone: {times['virt-customize, 1 clone'][0]:.1f} s")
        plain, seeded = min(times["plain"]), min(times["cloud-init"])
        print(f"seeded/plain (best of {runs}): {seeded / plain:.2f} (goal <= 1.5)")
        return 0
    finally:
        lab.cleanup()
        hv.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
