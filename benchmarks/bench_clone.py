"""Deploying clones with virtdeck against the raw shell loop, measured in the same run.

    .venv/bin/python benchmarks/bench_clone.py [--runs 5] [--uri qemu:///system]

A 1 GiB template (fully allocated qcow2), then, per run:
- thin: 10 clones with virtdeck (plan_clone + execute_clone) vs `qemu-img create -b` +
  `virsh define` per clone;
- full: 1 clone with virtdeck vs `qemu-img convert`.
Prints median and best times and virtdeck/raw ratios (aim: thin <= 1.0, full <= 1.1). Everything is
named with a unique prefix and removed at the end, even on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import domain_xml  # noqa: E402
from tui.core.clones import execute_clone, plan_clone  # noqa: E402
from tui.core.hypervisor import Hypervisor  # noqa: E402
from tui.core.templates import execute_template, plan_template  # noqa: E402

IMAGES = Path("/var/lib/libvirt/images")
THIN = 10


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def timed(fn: Callable[[], object]) -> float:
    # A copy is done when it is on disk: sync before (what the previous step left dirty is not
    # billed to this one) and after (each side pays for its own write-back).
    os.sync()
    start = time.perf_counter()
    fn()
    os.sync()
    return time.perf_counter() - start


class Bench:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.prefix = f"vdb-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = IMAGES / self.prefix
        self.dir.mkdir()
        self.virt_type = hv.virt_type()

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def make_template(self) -> tuple[str, str]:
        base = str(self.dir / "base.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "1G")
        # Fully allocated: the full clone really copies 1 GiB.
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", base)
        vm = self.name("vm")
        self.hv.conn.defineXML(domain_xml(vm, [(base, "qcow2")], virt_type=self.virt_type))
        plan = plan_template(
            self.hv, vm, name=self.name("tpl"), seal=False, backup_dir=self.dir / "backups"
        )
        return execute_template(self.hv, plan).name, base

    def raw_thin(self, base: str, run_no: int) -> float:
        xmls = []
        for i in range(1, THIN + 1):
            name = self.name(f"raw{run_no}-{i}")
            disk = str(self.dir / f"{name}.qcow2")
            xml_path = self.dir / f"{name}.xml"
            xml_path.write_text(domain_xml(name, [(disk, "qcow2")], virt_type=self.virt_type))
            xmls.append((disk, str(xml_path)))

        def loop() -> None:
            for disk, xml_path in xmls:
                run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, disk)
                run("virsh", "-q", "-c", self.hv.uri, "define", xml_path)

        return timed(loop)

    def virtdeck_thin(self, template: str, run_no: int) -> float:
        def deploy() -> None:
            plan = plan_clone(
                self.hv, template, self.name(f"vd{run_no}"), count=THIN,
                allow_unsealed=True, backup_dir=self.dir / "backups",
            )  # fmt: skip
            execute_clone(self.hv, plan)

        return timed(deploy)

    def raw_full(self, base: str, run_no: int) -> float:
        dst = str(self.dir / f"rawfull{run_no}.qcow2")
        return timed(lambda: run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", base, dst))

    def virtdeck_full(self, template: str, run_no: int) -> float:
        def deploy() -> None:
            plan = plan_clone(
                self.hv, template, self.name(f"vdfull{run_no}"), full=True,
                allow_unsealed=True, backup_dir=self.dir / "backups",
            )  # fmt: skip
            execute_clone(self.hv, plan)

        return timed(deploy)

    def drop_clones(self) -> None:
        """Undefine every clone and delete its file between runs (keeps the template)."""
        for dom in self.hv.conn.listAllDomains(0):
            name = dom.name()
            if name.startswith(self.prefix) and name not in (self.name("tpl"),):
                dom.undefine()
        for p in self.dir.iterdir():
            if p.name not in ("base.qcow2", "backups"):
                p.unlink()
        self.hv.invalidate()

    def cleanup(self) -> None:
        for dom in self.hv.conn.listAllDomains(0):
            if dom.name().startswith(self.prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        for root, dirs, files in os.walk(self.dir):
            for entry in dirs + files:
                p = os.path.join(root, entry)
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()
    hv = Hypervisor.open(args.uri)
    bench = Bench(hv)
    times: dict[str, list[float]] = {"raw thin": [], "virtdeck thin": [], "raw full": [],
                                     "virtdeck full": []}  # fmt: skip
    try:
        template, base = bench.make_template()
        for r in range(args.runs):
            # Alternate the order so page-cache warmth does not favour one side.
            pairs = [("raw", bench.raw_thin, base), ("virtdeck", bench.virtdeck_thin, template)]
            for label, fn, arg in pairs if r % 2 == 0 else reversed(pairs):
                times[f"{label} thin"].append(fn(arg, r))
            pairs = [("raw", bench.raw_full, base), ("virtdeck", bench.virtdeck_full, template)]
            for label, fn, arg in pairs if r % 2 == 0 else reversed(pairs):
                times[f"{label} full"].append(fn(arg, r))
            bench.drop_clones()
        # Medians, and best-of (what the machine can do when nothing else competes for I/O).
        print(f"template: 1 GiB fully allocated qcow2, {args.runs} runs, {hv.uri}")
        for stat_name, agg in (("median", statistics.median), ("best", min)):
            v = {k: agg(t) for k, t in times.items()}
            thin, full = v["virtdeck thin"] / v["raw thin"], v["virtdeck full"] / v["raw full"]
            print(
                f"  {stat_name:6} {THIN} thin clones: virtdeck {v['virtdeck thin']:.3f} s, "
                f"raw loop {v['raw thin']:.3f} s, ratio {thin:.2f} (aim <= 1.00)"
            )
            print(
                f"  {stat_name:6} 1 full clone:   virtdeck {v['virtdeck full']:.3f} s, "
                f"qemu-img convert {v['raw full']:.3f} s, ratio {full:.2f} (aim <= 1.10)"
            )
    finally:
        bench.cleanup()
        hv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
