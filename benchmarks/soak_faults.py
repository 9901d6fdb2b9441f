"""The fault soak at full length (issue 19): CLI operations and the dashboard against three
private hosts while faults land at random moments; see tests/soak.py for what a cycle does and
checks. Prints one line per cycle and the summary; exit 1 if any cycle or the dashboard failed.

    .venv/bin/python benchmarks/soak_faults.py [CYCLES] [--seed N] [--minutes M]   # as root
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cycles", type=int, nargs="?", default=200)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=None, help="stop starting cycles after")
    opts = parser.parse_args()
    t0 = time.monotonic()
    report = soak.run(
        opts.cycles,
        hosts=opts.hosts,
        seed=opts.seed,
        log=lambda line: print(f"[{time.monotonic() - t0:7.1f} s] {line}", flush=True),
        budget=opts.minutes * 60 if opts.minutes else None,
    )
    print(f"dashboard: {report.dashboard}")
    for c in report.cycles:
        for p in c.problems:
            print(f"cycle {c.n} ({c.op} on {c.host}, {c.fault}): {p}")
    for p in report.problems:
        print(f"dashboard: {p}")
    failed = [c for c in report.cycles if c.problems] or report.problems
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
