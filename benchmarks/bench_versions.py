"""A template version's size against a full copy, and what a version costs in time.

    .venv/bin/python benchmarks/bench_versions.py [--uri qemu:///system] [--change-mib 16]

Version 1: the real test guest's disk (tests/guest.py: Debian 12, ~220 MB allocated of 2 GiB),
copied into a lab directory and made a template (no virt-sysprep: its ~30 s under TCG is the
same for a version as for `template create`). Then `template update` (the edit VM), a change
of --change-mib MiB written into the edit VM's disk with qemu-io (in 1 MiB pieces spread
over the disk, as a package update touches many places), and the seal into version 2 (thin).
Measured: version 2's own layer (allocation) against version 1 and against a full copy of
version 2 (`qemu-img convert` of its chain: what a template without versions would need), and
the time of update, seal, and a flattened version 3 against `qemu-img convert` of the same
chain. Everything is named with a unique prefix and removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guest import CACHE as GUEST_CACHE  # noqa: E402
from tests.lab import domain_xml, remove_prefixed  # noqa: E402
from tui.core import versions  # noqa: E402
from tui.core.clones import execute_clone  # noqa: E402
from tui.core.hypervisor import Hypervisor  # noqa: E402
from tui.core.templates import execute_template, plan_template  # noqa: E402

IMAGES = Path("/var/lib/libvirt/images")


def run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


def timed(fn: Callable[[], object]) -> float:
    os.sync()
    start = time.perf_counter()
    fn()
    os.sync()
    return time.perf_counter() - start


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def own_data(path: str) -> int:
    out = json.loads(run("qemu-img", "map", "-U", "--output=json", path))
    return sum(e["length"] for e in out if e["depth"] == 0 and e["data"])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--change-mib", type=int, default=16)
    args = ap.parse_args()
    hv = Hypervisor.open(args.uri)
    prefix = f"vdb-{os.getpid()}-{secrets.token_hex(3)}"
    lab = IMAGES / prefix
    lab.mkdir()
    backups = lab / "backups"
    try:
        base = str(lab / "v1.qcow2")
        shutil.copyfile(GUEST_CACHE / "root.qcow2", base)
        os.chmod(base, 0o644)
        vm = f"{prefix}-vm"
        hv.conn.defineXML(domain_xml(vm, [(base, "qcow2")], virt_type=hv.virt_type()))
        tname = execute_template(
            hv, plan_template(hv, vm, name=f"{prefix}-t", seal=False, backup_dir=backups)
        ).name

        update = versions.plan_update(hv, tname, backup_dir=backups)
        t_update = timed(lambda: execute_clone(hv, update))
        edit = update.names[0]
        overlay = hv.domain(edit).disks[0].path
        assert overlay is not None
        virtual = int(json.loads(run("qemu-img", "info", "--output=json", base))["virtual-size"])
        step = virtual // args.change_mib
        cmds = []
        for i in range(args.change_mib):
            cmds += ["-c", f"write -P {0x40 + i % 64:#x} {i * step} 1M"]
        run("qemu-io", "-f", "qcow2", *cmds, overlay)
        seal = versions.plan_seal(hv, edit, seal=False, backup_dir=backups)
        t_seal = timed(lambda: execute_template(hv, seal))

        full = str(lab / "full-copy.qcow2")
        t_convert = timed(
            lambda: run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", overlay, full)
        )
        update3 = versions.plan_update(hv, tname, backup_dir=backups)
        execute_clone(hv, update3)
        edit3 = update3.names[0]
        steps = versions.plan_flatten(hv, edit3, tname, 3)
        t_flatten = timed(lambda: versions.execute_flatten(hv, edit3, steps))

        print(f"version 1 (real guest disk): {mib(allocated(base))} allocated, "
              f"{mib(own_data(base))} of data")  # fmt: skip
        print(f"change written in the edit VM: {args.change_mib} MiB in 1 MiB pieces")
        print(f"version 2's own layer: {mib(allocated(overlay))} allocated, "
              f"{mib(own_data(overlay))} of data")  # fmt: skip
        print(f"a full copy of version 2 (qemu-img convert): {mib(allocated(full))}")
        print(f"version 2 / full copy: {allocated(overlay) / allocated(full):.3f}")
        print(f"template update (edit VM): {t_update:.2f} s; seal (--no-seal): {t_seal:.2f} s")
        print(f"flatten (version 3's disk): {t_flatten:.2f} s; qemu-img convert of the same "
              f"chain: {t_convert:.2f} s; ratio {t_flatten / t_convert:.2f}")  # fmt: skip
    finally:
        remove_prefixed(hv.conn, prefix)
        shutil.rmtree(lab, ignore_errors=True)
        hv.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
