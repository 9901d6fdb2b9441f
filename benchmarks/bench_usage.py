"""Usage refresh cost against a bare loop of `qemu-img info` calls, at 10, 100 and 500 images.

    .venv/bin/python benchmarks/bench_usage.py [--sizes 10,100,500] [--repeat 5]

For each size it makes real images in a temporary directory (one template base, the rest thin
qcow2 overlays of it), a libvirt test-driver hypervisor with one domain per image, and times,
in the same run:

- loop:  `qemu-img info -U --output=json IMAGE` for every image, one after the other;
- cold:  a fresh Hypervisor and UsageCollector: listing the domains, parsing their XML, reading
         every image header and building the report (virtdeck's first refresh);
- warm:  the same collector again (what the TUI pays every 2 s): listing the domains, one `stat`
         per image, building the report. Median of --repeat runs.

"Cold" and "warm" are about virtdeck's own caches; the OS page cache is warm for all three
(the loop runs first and reads the same headers). The pass/fail line uses the cold ratio, the
conservative one. Exit status 1 when virtdeck is less than 5x cheaper than the loop at the
largest size. Everything it makes is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tui.core.hypervisor import Hypervisor
from tui.core.models import VirtdeckMeta
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml
from tui.core.usage import UsageCollector


def make_images(d: Path, n: int) -> tuple[str, list[str]]:
    """One base with some data and n-1 thin overlays (copies of one overlay: same header)."""
    base = str(d / "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", base], check=True, capture_output=True)
    first = d / "clone-0000.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(first)],
        check=True,
    )
    overlays = [str(first)]
    for i in range(1, n - 1):
        p = d / f"clone-{i:04d}.qcow2"
        shutil.copyfile(first, p)
        overlays.append(str(p))
    return base, overlays


def node(d: Path, base: str, overlays: list[str]) -> str:
    specs = [DomainSpec("tpl", disks=(DiskSpec(base),), meta=VirtdeckMeta(role="template"))]
    meta = VirtdeckMeta(role="clone", source="tpl", mode="thin")
    specs += [
        DomainSpec(f"clone-{i:04d}", disks=(DiskSpec(p, backing=base),), meta=meta)
        for i, p in enumerate(overlays)
    ]
    path = d / "node.xml"
    path.write_text(node_xml(specs))
    return f"test://{path}"


def qemu_img_loop(paths: list[str]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", p], check=True, capture_output=True
        )
    return time.perf_counter() - t0


def bench(n: int, repeat: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="virtdeck-bench-", dir="/var/tmp") as tmp:
        d = Path(tmp)
        base, overlays = make_images(d, n)
        uri = node(d, base, overlays)
        images = [base, *overlays]
        assert len(images) == n
        loop = qemu_img_loop(images)

        t0 = time.perf_counter()
        hv = Hypervisor.open(uri)
        try:
            collector = UsageCollector(hv)
            report = collector.report()
            cold = time.perf_counter() - t0
            assert len(report.images) == n, len(report.images)
            assert collector.reader.parsed == n and collector.reader.qemu_img_calls == 0
            warm_runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                collector.report()
                warm_runs.append(time.perf_counter() - t0)
            assert collector.reader.parsed == n  # warm runs re-read nothing
        finally:
            hv.close()
        return loop, cold, statistics.median(warm_runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'images':>6}  {'qemu-img loop':>13}  {'cold':>9}  {'warm':>9}  "
          f"{'loop/cold':>9}  {'loop/warm':>9}")  # fmt: skip
    results = {}
    for n in sizes:
        loop, cold, warm = bench(n, args.repeat)
        results[n] = (loop, cold, warm)
        print(
            f"{n:>6}  {loop * 1000:>10.1f} ms  {cold * 1000:>6.1f} ms  {warm * 1000:>6.1f} ms  "
            f"{loop / cold:>8.1f}x  {loop / warm:>8.1f}x",
            flush=True,
        )
    largest = max(sizes)
    loop, cold, _ = results[largest]
    ok = loop / cold >= 5
    print(
        f"{'PASS' if ok else 'FAIL'}: at {largest} images a cold virtdeck refresh is "
        f"{loop / cold:.1f}x cheaper than the qemu-img loop (target >= 5x)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
