"""Whole-process start: `virtdeck ls` (the venv's console script) against `virsh list --all`.

Both run alternately in one run, N times each, against the same URIs: the host's
`qemu:///system` and the test driver's `test:///default`. Prints the medians and the ratio
(target: `virtdeck ls` at most 3x `virsh list --all`), and a floor in the same alternation: a
bare Python script that imports libvirt-python and lists the domains, nothing of virtdeck.
Alternating keeps a machine whose load changes during the run from favouring one side.

    .venv/bin/python benchmarks/bench_start.py [N] [URI ...]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VIRTDECK = str(Path(sys.executable).with_name("virtdeck"))
URIS = ("qemu:///system", "test:///default")
# The least any Python CLI on libvirt-python pays: the interpreter, `import libvirt`, a
# connection and one listing (what virsh does, with nothing of virtdeck).
FLOOR = (
    "import sys, argparse, libvirt\n"
    "c = libvirt.open(sys.argv[1])\n"
    "print([(d.name(), d.state()) for d in c.listAllDomains()])"
)


def once(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return time.perf_counter() - t


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    uris = sys.argv[2:] or list(URIS)
    virsh = shutil.which("virsh")
    if virsh is None or not os.path.exists(VIRTDECK):
        print(f"bench_start: needs virsh and {VIRTDECK}", file=sys.stderr)
        return 2
    # Bytecode caches as an installed virtdeck has them: with PYTHONDONTWRITEBYTECODE set (as
    # in some CI shells) every start would compile each module again (~20 ms here).
    drop = ("LIBVIRT_DEFAULT_URI", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    worst = 0.0
    for uri in uris:
        ours = [VIRTDECK, "-c", uri, "ls"]
        theirs = [virsh, "-c", uri, "list", "--all"]
        floor = [sys.executable, "-c", FLOOR, uri]
        for argv in (ours, theirs, floor):
            once(argv, env)  # warm the page cache (and write the bytecode caches)
        a: list[float] = []
        b: list[float] = []
        c: list[float] = []
        for _ in range(n):
            a.append(once(ours, env))
            b.append(once(theirs, env))
            c.append(once(floor, env))
        ratio = statistics.median(a) / statistics.median(b)
        worst = max(worst, ratio)
        print(
            f"{uri:18} virtdeck ls {statistics.median(a) * 1000:6.1f} ms"
            f" | virsh list --all {statistics.median(b) * 1000:6.1f} ms"
            f" | ratio {ratio:4.2f} (n={n}, alternating)"
            f" | floor: python + libvirt-python listing"
            f" {statistics.median(c) * 1000:6.1f} ms"
            f" = {statistics.median(c) / statistics.median(b):4.2f}x virsh"
        )
    print(f"worst ratio {worst:.2f} (target <= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
