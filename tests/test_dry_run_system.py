"""--dry-run on every command that changes something changes nothing (real libvirt)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import SystemLab

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent


def world(lab: SystemLab, backups: Path) -> tuple[object, ...]:
    """Everything a command could change: domains (and their definitions and snapshots), the
    image directory (names, sizes, modes, contents' hashes), the XML backups."""
    doms = {}
    for dom in lab.hv.conn.listAllDomains(0):
        if dom.name().startswith(lab.prefix):
            snaps = sorted(s.getName() for s in dom.listAllSnapshots(0))
            doms[dom.name()] = (hashlib.sha256(dom.XMLDesc(2).encode()).hexdigest(), snaps,
                                dom.isActive())  # fmt: skip
    files = {}
    for p in sorted(lab.dir.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        files[str(p)] = (st.st_size, st.st_mode, st.st_mtime_ns, digest)
    return doms, files, sorted(p.name for p in backups.glob("*"))


def test_dry_run_changes_nothing(lab: SystemLab) -> None:
    hv = lab.hv
    backups = lab.dir / "backups"
    backups.mkdir()
    vm = lab.define("dry")
    tvm = lab.define("tsrc")
    fresh = lab.define("fresh")  # a template is made of a VM without snapshots
    run = [sys.executable, "-m", "tui", "-c", hv.uri]
    subprocess.run([*run, "template", "create", tvm, "--no-seal", "--name", lab.name("t"),
                    "--backup-dir", str(backups)], check=True, capture_output=True)  # fmt: skip
    subprocess.run([*run, "snapshot", "create", vm, "s1", "--external"], check=True,
                   capture_output=True)  # fmt: skip
    before = world(lab, backups)
    commands = [
        ["template", "create", fresh, "--no-seal", "--name", fresh, "--backup-dir",
         str(backups)],
        ["clone", lab.name("t"), "x", "--count", "2", "--allow-unsealed", "--backup-dir",
         str(backups)],
        ["clone", lab.name("t"), "y", "--full", "--start", "--allow-unsealed", "--backup-dir",
         str(backups)],
        ["rm", vm, "--storage"],
        ["rm", lab.name("t"), "--storage", "--backup-dir", str(backups)],
        ["snapshot", "create", vm, "s2", "--external"],
        ["snapshot", "revert", vm, "s1"],
        ["snapshot", "delete", vm, "s1"],
        ["rollback", vm],
    ]  # fmt: skip
    for argv in commands:
        proc = subprocess.run([*run, *argv, "--dry-run", "--json"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, (argv, proc.stderr)
        out = json.loads(proc.stdout)
        assert out["dry_run"] is True and out["plan"]["summary"], argv
        assert "virtdeck: plan:" in proc.stderr, argv
        assert world(lab, backups) == before, argv
