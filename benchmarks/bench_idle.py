"""What the dashboard costs while nothing changes: process CPU time of an idle `virtdeck`.

The dashboard runs as the console script (`.venv/bin/virtdeck -c URI ...`) in a pseudo-terminal
of 140x45; after start-up settles (SETTLE s, then until a 2 s slice costs under 10 % of a
core), the CPU time (utime + stime of the process, all its threads, from /proc/PID/stat) over
WINDOW s is the idle cost, in % of one core. CPU time,
not wall time: the machine may be loaded by others, the figure stays comparable. Also printed:
the RSS at the end, and for qemu:///system the CPU of the libvirtd beside it.

Sizes: the test driver (in-process, a third of the domains running) with 100 / 500 / 1000 /
3000 domains on one host and 30 hosts x 100 domains; and 200 shut-off domains defined on the
host's qemu:///system with a unique prefix (no disks), undefined afterwards even on failure.

    .venv/bin/python benchmarks/bench_idle.py [WINDOW] [SIZE ...]
    # SIZE: 100 500 1000 3000 30x100 system  (default: all; WINDOW default 30 s)

With VIRTDECK_BENCH_PYSPY=DIR set, a `py-spy record` of the idle window goes to DIR/SIZE.txt
(collapsed stacks, one line per stack; py-spy: `pip install py-spy`).
"""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tui.core.testdriver import DiskSpec, DomainSpec, node_xml  # noqa: E402

VIRTDECK = str(Path(sys.executable).with_name("virtdeck"))
SETTLE = 8.0  # seconds after launch at least, before the window starts (connect, inventory)
STATES = ("running", "shutoff", "shutoff")
TICKS = os.sysconf("SC_CLK_TCK")
COLS, ROWS = 140, 45


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def host_libvirtd() -> int | None:
    """The libvirtd (or virtqemud) serving this machine's qemu:///system (not a chrooted one)."""
    for name in ("virtqemud", "libvirtd"):
        out = subprocess.run(["pidof", name], capture_output=True, text=True).stdout.split()
        for pid in out:
            if os.path.realpath(f"/proc/{pid}/root") == "/":
                return int(pid)
    return None


def test_uris(hosts: int, per_host: int, d: Path) -> list[str]:
    uris = []
    for h in range(hosts):
        prefix = f"h{h + 1}-" if hosts > 1 else ""
        specs = [
            DomainSpec(
                f"{prefix}vm{i + 1}",
                STATES[i % 3],
                disks=(DiskSpec(f"/var/lib/libvirt/images/{prefix}vm{i + 1}.qcow2"),),
            )
            for i in range(per_host)
        ]
        path = d / f"node-{hosts}x{per_host}-{h}.xml"
        path.write_text(node_xml(specs))
        uris.append(f"test://{path}")
    return uris


@contextmanager
def system_domains(n: int) -> Iterator[list[str]]:
    """n shut-off domains without disks on qemu:///system, removed afterwards."""
    import libvirt

    prefix = f"vdbench-idle-{os.getpid()}-"
    conn = libvirt.open("qemu:///system")
    made = []
    try:
        for i in range(n):
            xml = (
                f"<domain type='qemu'><name>{prefix}{i}</name><memory unit='MiB'>64</memory>"
                "<os><type>hvm</type></os></domain>"
            )
            made.append(conn.defineXML(xml))
        yield ["qemu:///system"]
    finally:
        for dom in made:
            try:
                dom.undefine()
            except libvirt.libvirtError as err:
                print(f"bench_idle: could not undefine {dom.name()}: {err}", file=sys.stderr)
        conn.close()


def run_idle(uris: list[str], window: float, profile: Path | None) -> tuple[float, float, float]:
    """(virtdeck % of a core, libvirtd % of a core or -1, RSS MiB) over an idle window."""
    argv = [VIRTDECK]
    for uri in uris:
        argv += ["-c", uri]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the dashboard on the pty
        os.environ["TERM"] = "xterm-256color"
        os.environ.pop("LIBVIRT_DEFAULT_URI", None)
        os.execv(VIRTDECK, argv)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    done = threading.Event()

    def drain() -> None:  # read what it draws, or it blocks writing to a full pty
        while not done.is_set():
            try:
                if not os.read(fd, 65536):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    daemon = host_libvirtd() if any(u.startswith("qemu:") for u in uris) else None
    try:
        time.sleep(SETTLE)
        # Start-up is over when a 2 s slice costs under 10 % of a core (at most 30 s more):
        # on a loaded machine the first inventory and the panes' first loads take longer.
        end = time.monotonic() + 30
        while time.monotonic() < end:
            c = cpu_seconds(pid)
            time.sleep(2)
            if cpu_seconds(pid) - c < 0.2:
                break
        spy = None
        if profile is not None:
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid),
                 "-d", str(int(window)), "-o", str(profile), "-f", "raw", "-t"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        t0, c0 = time.monotonic(), cpu_seconds(pid)
        d0 = cpu_seconds(daemon) if daemon else 0.0
        time.sleep(window)
        t1, c1 = time.monotonic(), cpu_seconds(pid)
        try:
            d1 = cpu_seconds(daemon) if daemon else 0.0
        except FileNotFoundError:  # the daemon restarted meanwhile (shared machine)
            print("bench_idle: libvirtd restarted during the window", file=sys.stderr)
            daemon = None
        rss = rss_mib(pid)
        if spy is not None:
            spy.wait()
        wall = t1 - t0
        return (
            (c1 - c0) / wall * 100,
            (d1 - d0) / wall * 100 if daemon else -1.0,
            rss,
        )
    finally:
        done.set()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


SIZES = ("system", "100", "500", "1000", "3000", "30x100")


def main() -> int:
    window = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    sizes = sys.argv[2:] or list(SIZES)
    profile_dir = os.environ.get("VIRTDECK_BENCH_PYSPY")
    if not os.path.exists(VIRTDECK):
        print(f"bench_idle: needs {VIRTDECK}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            profile = Path(profile_dir) / f"{size}.txt" if profile_dir else None
            if size == "system":
                if shutil.which("virsh") is None or host_libvirtd() is None:
                    print("bench_idle: no host libvirtd; skipping 'system'", file=sys.stderr)
                    continue
                with system_domains(200) as uris:
                    ours, daemon, rss = run_idle(uris, window, profile)
                what = "qemu:///system, 200 shut-off domains"
            else:
                hosts, _, per = size.rpartition("x")
                n_hosts = int(hosts or 1)
                uris = test_uris(n_hosts, int(per), Path(tmp))
                ours, daemon, rss = run_idle(uris, window, profile)
                what = (
                    f"test driver, {n_hosts} hosts x {per} domains"
                    if n_hosts > 1
                    else f"test driver, {per} domains"
                )
            rows.append((what, ours, daemon, rss))
            print(f"{what}: virtdeck {ours:.1f} %", file=sys.stderr, flush=True)
    print(f"idle window {window:g} s after start-up settled; CPU in % of one core")
    print(f"| {'what is connected':40} | virtdeck CPU | libvirtd CPU | RSS |")
    print(f"| {'-' * 40} | ---: | ---: | ---: |")
    for what, ours, daemon, rss in rows:
        lv = f"{daemon:.1f} %" if daemon >= 0 else "(in-process)"
        print(f"| {what:40} | {ours:.1f} % | {lv} | {rss:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
