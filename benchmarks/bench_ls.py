"""`virtdeck ls --json` with addresses, against `virsh` doing the same, at 50 and 200 domains.

Both sides read the same test-driver node XML in the same run (a third of the domains
running, one NIC each on the 'default' network, whose leases the test driver makes up).
Baselines: `virsh list --all` (no addresses) and the shell way to get addresses, one
`virsh domifaddr --source lease` per running domain. What `ls --json` adds for addresses is
the ratio of `ls --json` to `ls`.

    .venv/bin/python benchmarks/bench_ls.py

Fleet mode: `virtdeck ls` (the console script) over 30 test-driver hosts x 100 domains against
`ls` over one of them, alternating N times; medians of wall time and of CPU time (the child's
user + system). Target: 30 hosts <= 2x one host.

    .venv/bin/python benchmarks/bench_ls.py fleet [N]
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


def fleet(n: int) -> None:
    import resource

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_idle import VIRTDECK as console
    from bench_idle import test_uris

    def once(argv: list[str]) -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        return wall, cpu

    with tempfile.TemporaryDirectory() as tmp:
        uris = test_uris(30, 100, Path(tmp))
        one = [console, "-c", uris[0], "ls"]
        many = [console, *[a for u in uris for a in ("-c", u)], "ls"]
        # The floor: libvirt-python alone opening the same test drivers in threads, listing
        # and reading each domain's XML (the test driver parses its node file in-process).
        floor1 = [sys.executable, "-c", FLEET_FLOOR, uris[0]]
        floor30 = [sys.executable, "-c", FLEET_FLOOR, *uris]
        for argv in (one, many, floor1, floor30):
            once(argv)  # warm the caches
        a, b, c, d = [], [], [], []
        for _ in range(n):
            a.append(once(one))
            b.append(once(many))
            c.append(once(floor1))
            d.append(once(floor30))
        wall1 = statistics.median(w for w, _ in a)
        wall30 = statistics.median(w for w, _ in b)
        cpu1 = statistics.median(c for _, c in a)
        cpu30 = statistics.median(c for _, c in b)
        print(
            f"virtdeck ls, 1 host x 100 domains: {wall1 * 1000:6.0f} ms wall, {cpu1 * 1000:6.0f} ms"
            f" CPU | 30 hosts x 100: {wall30 * 1000:6.0f} ms wall, {cpu30 * 1000:6.0f} ms CPU"
            f" | ratio {wall30 / wall1:.2f}x wall, {cpu30 / cpu1:.2f}x CPU (n={n}, target <= 2x)"
        )
        f1 = statistics.median(w for w, _ in c)
        f30 = statistics.median(w for w, _ in d)
        print(
            f"floor (libvirt-python alone): 1 host {f1 * 1000:6.0f} ms wall | 30 hosts"
            f" {f30 * 1000:6.0f} ms wall | ratio {f30 / f1:.2f}x; virtdeck over the floor:"
            f" 1 host +{(wall1 - f1) * 1000:.0f} ms, 30 hosts +{(wall30 - f30) * 1000:.0f} ms"
        )


FLEET_FLOOR = (
    "import sys, threading, libvirt\n"
    "out = {}\n"
    "def run(u):\n"
    "    c = libvirt.open(u)\n"
    "    out[u] = [(d.name(), d.state()[0], d.XMLDesc(0)) for d in c.listAllDomains()]\n"
    "ts = [threading.Thread(target=run, args=(u,)) for u in sys.argv[1:]]\n"
    "[t.start() for t in ts]\n"
    "[t.join() for t in ts]\n"
    "print(sum(len(v) for v in out.values()))\n"
)


def main() -> None:
    if sys.argv[1:2] == ["fleet"]:
        fleet(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
        return
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
