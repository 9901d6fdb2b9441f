"""`virtdeck ls --json` with addresses, against `virsh` doing the same, at 50 and 200 domains.

Both sides read the same test-driver node XML in the same run (a third of the domains
running, one NIC each on the 'default' network, whose leases the test driver makes up).
Baselines: `virsh list --all` (no addresses) and the shell way to get addresses, one
`virsh domifaddr --source lease` per running domain. What `ls --json` adds for addresses is
the ratio of `ls --json` to `ls`.

    .venv/bin/python benchmarks/bench_ls.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tui.core.testdriver import DiskSpec, DomainSpec, node_xml  # noqa: E402

STATES = ("running", "shutoff", "paused")
VIRTDECK = [sys.executable, "-m", "tui"]


def lab(n: int, d: Path) -> tuple[str, list[str]]:
    specs = [
        DomainSpec(
            f"vm-{i:04d}",
            STATES[i % 3],
            disks=(DiskSpec(f"/var/lib/libvirt/images/vm-{i:04d}.qcow2"),),
            macs=(f"52:54:00:01:{i // 256:02x}:{i % 256:02x}",),
        )
        for i in range(n)
    ]
    path = d / f"node-{n}.xml"
    path.write_text(node_xml(specs))
    return f"test://{path}", [s.name for s in specs if s.state == "running"]


def timed(argvs: list[list[str]], repeat: int = 5) -> float:
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        for argv in argvs:
            subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for n in (50, 200):
            uri, running = lab(n, Path(tmp))
            virsh_list = timed([["virsh", "-c", uri, "list", "--all"]])
            # The test driver keeps state per connection, so each virsh call starts it again:
            # the shell baseline pays one start per running domain, as it would on a daemon.
            virsh_addr = timed(
                [["virsh", "-c", uri, "list", "--all"]]
                + [["virsh", "-c", uri, "domifaddr", "--source", "lease", r] for r in running],
                repeat=3,
            )
            ls = timed([[*VIRTDECK, "-c", uri, "ls"]])
            ls_json = timed([[*VIRTDECK, "-c", uri, "ls", "--json"]])
            print(
                f"{n:4d} domains ({len(running)} running): virsh list {virsh_list * 1000:6.0f} ms"
                f" | virsh list + domifaddr each {virsh_addr * 1000:6.0f} ms"
                f" | virtdeck ls {ls * 1000:6.0f} ms | ls --json with addresses"
                f" {ls_json * 1000:6.0f} ms ({ls_json / ls:.2f}x ls,"
                f" {ls_json / virsh_addr:.2f}x the virsh way)"
            )


if __name__ == "__main__":
    main()
