"""Offline migrate of a thin clone against streaming its bytes and the whole chain (issue 20).

    .venv/bin/python benchmarks/bench_migrate.py [--base-data-mib 512] [--changed-mib 205]
        [--rounds 3] [--link-mbit 1000] [--no-live]

Host A: this machine's qemu:///system; host B: the test user's qemu:///session over the
loopback sshd (tests/rigs.py; separate image directory). A 2 GiB template (`--base-data-mib`
of data), a thin clone with `--changed-mib` written into its overlay (10% of 2 GiB by
default). Measured in the same run:
- the template copied to B once (`template copy`: what the first clone of a template costs);
- streaming the clone's overlay alone to B (libvirt sparse streams, the same path migrate's
  data takes): the floor for the clone's own bytes;
- streaming the whole chain (base + overlay) to B: what a tool that does not know the base
  is already there sends;
- `virtdeck migrate` of the clone (plan + execute: stream, sha256 on both sides, rebase,
  qemu-img check, define, undefine and delete on A).
Each round (`--rounds`, one clone each) streams the clone's overlay alone and then migrates the
clone; the ratio is the median over the rounds (single runs vary by +-20% on a 2-CPU VM), with
the machine's CPU seconds beside each time: both hosts, the SSH tunnel and the client share
this machine's CPUs, so work that a real pair of hosts does side by side (sha256 on each)
queues here. `--link-mbit N` shapes the loopback device to N Mbit/s (tc tbf, removed at the
end; root) for the offline rounds, so the stream is as fast as a network link, not as this
machine's CPUs.
Goal: bytes sent <= 1.1x the clone's own allocation; time <= 1.2x streaming those bytes.
Live (`--live` part, on by default): two more clones with the same change, running (no OS:
BIOS waits; TCG), moved to B while they run, QEMU to QEMU over loopback (the session daemon
has a host identity of its own):
- `virsh migrate --live --persistent --copy-storage-all` (the disk path renamed into B's pool
  with --xml; libvirt creates the file there): the whole chain, flattened, crosses;
- `virtdeck migrate --live` (B already has the template): only the clone's own layer.
Bytes sent: the disk data that landed on B (the new file's allocation) plus the memory
libvirt's completed job statistics count; time: the command's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import rigs  # noqa: E402
from tests.lab import domain_xml  # noqa: E402
from tui.core import domxml, migrate, transfer  # noqa: E402
from tui.core.hypervisor import Hypervisor, start_event_loop  # noqa: E402
from tui.core.models import VirtdeckMeta  # noqa: E402
from tui.core.storage.remote import RemoteFiles  # noqa: E402

IMAGES = Path("/var/lib/libvirt/images")
MIB = 1024**2


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


@contextlib.contextmanager
def link(mbit: int | None) -> Iterator[None]:
    """With `mbit`: the loopback device shaped to that rate (a tbf qdisc), so the stream to
    host B (SSH over 127.0.0.1) travels as over a network link of that speed rather than at
    the speed this machine's CPUs copy it; removed on the way out. Refused when loopback
    already has a qdisc of someone else's."""
    if not mbit:
        yield
        return
    shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    if "noqueue" not in shown:
        raise SystemExit(f"loopback already has a qdisc ({shown.strip()}); not shaping it")
    run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{mbit}mbit", "burst",
        "512kb", "latency", "100ms")  # fmt: skip
    try:
        yield
    finally:
        run("tc", "qdisc", "del", "dev", "lo", "root")


def _cpu_seconds() -> float:
    """CPU time this machine spent so far outside idle and I/O wait (/proc/stat)."""
    with open("/proc/stat") as fh:
        ticks = [int(t) for t in fh.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, the machine's CPU seconds: all processes) of `fn()`, writes flushed."""
    os.sync()
    cpu, start = _cpu_seconds(), time.perf_counter()
    fn()
    os.sync()
    return time.perf_counter() - start, _cpu_seconds() - cpu


def stream_to(source: Hypervisor, target: Hypervisor, path: str, name: str) -> int:
    """Stream one image file to a scratch volume on the target; returns the data bytes."""
    src, dst = RemoteFiles(source, "bench"), RemoteFiles(target, "bench")
    vol = transfer._source_volume(src, path)
    _cap, length, alloc = transfer._physical(source, vol)
    pool = (
        dst.pools()[0]
        if dst.pool_of(rigs_pool_dir(dst)) is None
        else dst.pool_of(rigs_pool_dir(dst))
    )
    assert pool is not None
    xml = (
        f"<volume><name>{name}</name><capacity unit='bytes'>{length}</capacity>"
        "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
    )
    new = target.call(pool.pool.createXML, xml, 0)
    transfer._stream(source, target, vol, new, length, lambda n: None)
    return alloc


def one_round(
    source: Hypervisor, target: Hypervisor, name: str, overlay: Path, scratch: str, i: int
) -> tuple[float, float, int]:
    """The clone's overlay streamed alone to B, then the clone migrated there: (the stream's
    time, migrate's execute time, the bytes migrate sent); round 1 also shows its steps."""
    t_own, c_own = timed(lambda: stream_to(source, target, str(overlay), scratch))
    start = time.perf_counter()
    plan = migrate.plan_migrate(source, target, name)
    t_plan = time.perf_counter() - start
    assert plan.template_copy is None
    steps: list[tuple[float, float, str]] = []

    def note(message: str, fraction: float | None) -> None:
        key = message if fraction is None else message.split(" ")[0]
        if not steps or steps[-1][2] != key:
            steps.append((time.perf_counter(), _cpu_seconds(), key))

    t_mig, c_mig = timed(lambda: migrate.execute_migrate(source, target, plan, note))
    steps.append((time.perf_counter(), _cpu_seconds(), "(end)"))
    if i == 0:
        print("virtdeck migrate, round 1, step by step (wall, machine CPU):")
        for (at, cpu, message), (nxt, cpu2, _m) in zip(steps, steps[1:], strict=False):
            print(f"  {nxt - at:6.2f} s {cpu2 - cpu:5.2f} CPU-s  {message}")
    print(f"round {i + 1}: stream the overlay alone {t_own:.2f} s ({c_own:.2f} CPU-s); "
          f"virtdeck migrate {plan.bytes_sent / MIB:.1f} MiB sent, plan {t_plan:.2f} s, "
          f"execute {t_mig:.2f} s ({c_mig:.2f} CPU-s): {t_mig / t_own:.2f}x")  # fmt: skip
    return t_own, t_mig, plan.bytes_sent


def rigs_pool_dir(files: RemoteFiles) -> str:
    for p in files.pools():
        if p.name == rigs.POOL_NAME:
            return p.path
    raise SystemExit("the session rig's pool is missing")


def running_clone(source: Hypervisor, base: Path, tname: str, name: str, mib: int) -> Path:
    overlay = IMAGES / f"{name}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    run("qemu-io", "-c", f"write -P 0x22 100M {mib}M", str(overlay))
    root = domxml.parse(domain_xml(name, [(str(overlay), "qcow2")], virt_type="qemu"))
    domxml.write_meta(root, VirtdeckMeta(role="clone", source=tname, mode="thin"))
    source.define(domxml.to_string(root))
    source.call(source.lookup(name).create)
    source.invalidate()
    return overlay


def landed(target: Hypervisor, name: str) -> tuple[int, int]:
    """(disk bytes allocated on B, memory bytes libvirt sent) for a migrated domain."""
    import libvirt

    dom = target.lookup(name)
    stats = target.call(dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    path = domxml.disks(domxml.parse(target.call(dom.XMLDesc, 0)))[0].path or ""
    return Path(path).stat().st_blocks * 512, int(stats.get("memory_processed") or 0)


def live_part(
    source: Hypervisor,
    target: Hypervisor,
    session_uri: str,
    base: Path,
    tname: str,
    prefix: str,
    args: argparse.Namespace,
) -> list[str]:
    """virsh migrate --live --copy-storage-all against virtdeck migrate --live."""
    import libvirt

    pool_dir = rigs_pool_dir(RemoteFiles(target, "bench"))
    made: list[str] = []
    v_name, w_name = f"{prefix}-v", f"{prefix}-w"
    v_overlay = running_clone(source, base, tname, v_name, args.changed_mib)
    own = v_overlay.stat().st_blocks * 512
    dom = source.lookup(v_name)
    root = domxml.parse(source.call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    src = root.find("devices/disk/source")
    assert src is not None
    src.set("file", f"{pool_dir}/{v_overlay.name}")
    for backing in root.findall("devices/disk/backingStore"):
        root.find("devices/disk").remove(backing)  # type: ignore[union-attr]
    xml_file = Path(f"/tmp/{prefix}-dest.xml")
    xml_file.write_text(domxml.to_string(root))
    made.append(v_overlay.name)
    start = time.perf_counter()
    run("virsh", "-c", "qemu:///system", "migrate", "--live", "--persistent",
        "--copy-storage-all", "--xml", str(xml_file), "--migrateuri", "tcp://127.0.0.1",
        "--listen-address", "127.0.0.1", "--disks-uri", "tcp://127.0.0.1",
        "--migrate-disks", "vda", v_name, session_uri)  # fmt: skip
    t_virsh = time.perf_counter() - start
    xml_file.unlink()
    target.invalidate()
    v_disk, v_mem = landed(target, v_name)

    w_overlay = running_clone(source, base, tname, w_name, args.changed_mib)
    made.append(w_overlay.name)
    start = time.perf_counter()
    plan = migrate.plan_migrate(source, target, w_name, live=True)
    assert plan.template_copy is None
    result = migrate.execute_migrate(source, target, plan)
    t_vd = time.perf_counter() - start
    target.invalidate()
    w_disk, w_mem = landed(target, w_name)
    if not w_mem:  # (virtdeck read the completed job's statistics: libvirt keeps them once)
        said = re.search(r"([0-9.]+) MiB of memory", result)
        w_mem = int(float(said.group(1)) * MIB) if said else 0
    print(f"live, a running clone with {own / MIB:.1f} MiB of its own (same run):")
    print(f"  virsh migrate --live --copy-storage-all: {(v_disk + v_mem) / MIB:.1f} MiB sent "
          f"({v_disk / MIB:.1f} disk + {v_mem / MIB:.1f} memory), {t_virsh:.2f} s")  # fmt: skip
    print(f"  virtdeck migrate --live: {(w_disk + w_mem) / MIB:.1f} MiB sent ({w_disk / MIB:.1f} "
          f"disk + {w_mem / MIB:.1f} memory), {t_vd:.2f} s ({result})")  # fmt: skip
    print(f"  disk bytes / clone allocation: virtdeck {w_disk / own:.3f} (goal <= 1.1), "
          f"virsh {v_disk / own:.3f}; time virtdeck/virsh {t_vd / t_virsh:.2f}")  # fmt: skip
    for name in (v_name, w_name):
        with contextlib.suppress(Exception):
            target.call(target.lookup(name).destroy)
    return made


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-data-mib", type=int, default=512)
    ap.add_argument("--changed-mib", type=int, default=205)
    ap.add_argument("--rounds", type=int, default=3, help="clones migrated offline (median)")
    ap.add_argument("--no-live", dest="live", action="store_false", help="offline only")
    ap.add_argument("--link-mbit", type=int, help="shape loopback to this rate (offline part)")
    args = ap.parse_args()
    start_event_loop()
    prefix = f"vdbench-mig-{secrets.token_hex(3)}"
    base = IMAGES / f"{prefix}-base.qcow2"
    tname = f"{prefix}-tpl"
    clones = [f"{prefix}-c{i}" for i in range(args.rounds)]
    overlays = [IMAGES / f"{name}.qcow2" for name in clones]
    with rigs.ssh_rig() as ssh, rigs.session_rig(ssh) as session:
        source = Hypervisor.open("qemu:///system")
        target = Hypervisor.open(session.uri)
        scratch: list[str] = []
        shaping = contextlib.ExitStack()
        try:
            run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "2G")
            run("qemu-io", "-c", f"write -P 0x11 0 {args.base_data_mib}M", str(base))
            os.chmod(base, 0o444)
            root = domxml.parse(domain_xml(tname, [(str(base), "qcow2")], virt_type="qemu"))
            domxml.write_meta(root, VirtdeckMeta(role="template", sealed=True))
            source.define(domxml.to_string(root))
            for cname, overlay in zip(clones, overlays, strict=True):
                run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(overlay))  # fmt: skip
                root = domxml.parse(domain_xml(cname, [(str(overlay), "qcow2")], virt_type="qemu"))
                domxml.write_meta(root, VirtdeckMeta(role="clone", source=tname, mode="thin"))
                source.define(domxml.to_string(root))
                run("qemu-io", "-c", f"write -P 0x22 100M {args.changed_mib}M", str(overlay))
            clone_alloc = overlays[0].stat().st_blocks * 512
            base_alloc = base.stat().st_blocks * 512

            shaping.enter_context(link(args.link_mbit))  # (the offline part)
            scratch += [f"{prefix}-chain-base", f"{prefix}-chain-c"]
            t_chain, _cpu = timed(
                lambda: (
                    stream_to(source, target, str(base), scratch[0]),
                    stream_to(source, target, str(overlays[0]), scratch[1]),
                )
            )
            copy = transfer.plan_template_copy(source, target, tname)
            t_copy, _cpu = timed(lambda: transfer.execute_template_copy(source, target, copy))
            print(f"clone: {clone_alloc / MIB:.1f} MiB allocated (own layer); "
                  f"base: {base_alloc / MIB:.1f} MiB allocated, 2 GiB virtual")  # fmt: skip
            print(f"template copy (once per host): {copy.bytes_needed / MIB:.1f} MiB, "
                  f"{t_copy:.2f} s")  # fmt: skip
            print(f"stream the whole chain: {(clone_alloc + base_alloc) / MIB:.1f} MiB, "
                  f"{t_chain:.2f} s")  # fmt: skip
            ratios, t_migs = [], []
            for i, (cname, overlay) in enumerate(zip(clones, overlays, strict=True)):
                scratch.append(f"{prefix}-s{i}")
                t_own, t_mig, sent = one_round(source, target, cname, overlay, scratch[-1], i)
                ratios.append(t_mig / t_own)
                t_migs.append(t_mig)
            shaping.close()
            data = bytes(8 << 20)
            hashed = time.process_time()
            for _ in range(int(clone_alloc) // len(data)):
                hashlib.sha256(data).digest()
            hashed = time.process_time() - hashed
            print(f"this machine: {os.cpu_count()} CPUs for both hosts, the SSH tunnel and the "
                  f"client; sha256 of the clone's bytes: {hashed:.2f} CPU-s (migrate hashes them "
                  "on both sides)")  # fmt: skip
            print(f"bytes sent / clone allocation: {sent / clone_alloc:.3f} "
                  "(goal <= 1.1)")  # fmt: skip
            shaped = f" over a {args.link_mbit} Mbit/s link" if args.link_mbit else ""
            print(f"migrate time / streaming its bytes{shaped}, median of {len(ratios)} rounds: "
                  f"{statistics.median(ratios):.2f} (goal <= 1.2; each: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}); / streaming the whole chain: "
                  f"{statistics.median(t_migs) / t_chain:.2f}")  # fmt: skip
            if args.live:
                scratch += live_part(source, target, session.uri, base, tname, prefix, args)
        finally:
            shaping.close()
            import libvirt

            conn = libvirt.open(session.uri)
            for name in (*clones, tname, f"{prefix}-v", f"{prefix}-w"):
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(name).destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(name).undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    )
            pool = conn.storagePoolLookupByName(rigs.POOL_NAME)
            pool.refresh(0)
            pdir = Path(domxml.ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or "/x")
            for vol in pool.listAllVolumes(0):
                if vol.name() in (*scratch, base.name, *(o.name for o in overlays)):
                    with contextlib.suppress(OSError):
                        os.chmod(pdir / vol.name(), 0o644)
                    vol.delete(0)
            conn.close()
            for name in (*clones, tname, f"{prefix}-v", f"{prefix}-w"):
                with contextlib.suppress(Exception):
                    source.conn.lookupByName(name).destroy()
                with contextlib.suppress(Exception):
                    source.conn.lookupByName(name).undefine()
            for f in (base, *overlays, IMAGES / f"{prefix}-v.qcow2", IMAGES / f"{prefix}-w.qcow2"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f, 0o644)
                    f.unlink()
            source.close()
            target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
