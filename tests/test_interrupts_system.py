"""Interrupts leave the finished result or nothing (real libvirt, real images, real signals).

`virtdeck` runs as an operator runs it (`python -m tui`, its own session like a login shell's
job); signals go to its whole process group (what a terminal's Ctrl-C or an SSH hang-up
sends) or to the Python process alone (`kill PID`), at points seen from outside: a clone
defined, a copy half-way, a clone running. Afterwards: no clone defined, no partial file, no
qemu-img left copying, the base unchanged, a non-zero exit with a message, no journal left.
SIGKILL cannot be handled: what it leaves is found by `virtdeck recover` and rolled back.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab import SystemLab, qemu_img
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


def checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copying(prefix: str) -> list[int]:
    """PIDs of qemu-img processes working on this lab's files."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-img") and any(prefix.encode() in a for a in argv):
            out.append(int(entry.name))
    return out


class Runner:
    def __init__(self, lab: SystemLab, state: Path) -> None:
        self.lab = lab
        self.env = {**os.environ, "XDG_STATE_HOME": str(state)}
        self.journals = state / "virtdeck" / "journal"

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tui", "-c", self.lab.hv.uri, *args],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tui", "-c", self.lab.hv.uri, *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    def left_journals(self) -> list[str]:
        return (
            sorted(p.name for p in self.journals.glob("*.json")) if self.journals.exists() else []
        )


def wait_until(fact: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 120) -> bool:
    """Poll `fact` until it holds (True) or the command ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fact():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the point to interrupt at never came")


@pytest.fixture
def big_template(lab: SystemLab) -> tuple[str, Path, str]:
    """An unsealed template whose base holds 1 GiB of random data (a full copy takes
    seconds); (name, base, its checksum)."""
    raw = lab.dir / "payload.raw"
    with open(raw, "wb") as fh:
        subprocess.run(["head", "-c", str(GIB), "/dev/urandom"], stdout=fh, check=True)
    base = lab.dir / "big.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    vm = lab.define("big", disks=[(str(base), "qcow2")])
    tname = lab.name("tbig")
    proc = subprocess.run(
        [sys.executable, "-m", "tui", "-c", lab.hv.uri, "template", "create", vm, "--no-seal",
         "--name", tname, "--backup-dir", str(lab.dir / "backups")],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.returncode == 0
    return tname, base, checksum(base)


POINTS: dict[str, Callable[[Hypervisor, SystemLab, str], bool]] = {
    # a clone is defined (its disks may or may not have started)
    "define": lambda hv, lab, x: hv.exists(f"{x}-1"),
    # the first copy is half-way
    "copy": lambda hv, lab, x: (
        (lab.dir / f"{x}-1.qcow2").exists()
        and (lab.dir / f"{x}-1.qcow2").stat().st_blocks * 512 > 300 * 1024**2
    ),
    # the clones are whole and the first one runs
    "start": lambda hv, lab, x: (
        hv.exists(f"{x}-1") and hv.domain(f"{x}-1").state == DomainState.RUNNING
    ),
}


def test_interrupted_full_clones_leave_nothing(
    lab: SystemLab, big_template: tuple[str, Path, str], tmp_path: Path
) -> None:
    hv = lab.hv
    tname, base, base_sum = big_template
    runner = Runner(lab, tmp_path / "state")
    backups = str(lab.dir / "backups")
    before = sorted(p.name for p in lab.dir.iterdir())
    n = 0
    for point, reached in POINTS.items():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            for to_group in (True, False):
                n += 1
                x = lab.name(f"i{n}")
                proc = runner.start("clone", tname, x, "--full", "--count", "3", "--start",
                                    "--allow-unsealed", "--backup-dir", backups)  # fmt: skip
                hit = wait_until(lambda: reached(hv, lab, x), proc)  # noqa: B023
                assert hit, f"{point}: finished before the point ({proc.communicate()})"
                if to_group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                _, err = proc.communicate(timeout=120)
                what = f"{point}, {sig.name} to {'the group' if to_group else 'python'}"
                assert proc.returncode != 0, what
                assert f"interrupted by {sig.name}" in err.strip().splitlines()[-1], (what, err)
                assert "Traceback" not in err, what
                assert not [d for d in hv.conn.listAllDomains(0) if d.name().startswith(x)], what
                assert sorted(p.name for p in lab.dir.iterdir()) == before, what
                assert not copying(lab.prefix), what
                assert runner.left_journals() == [], what
    assert checksum(base) == base_sum


def test_killed_clone_is_found_and_rolled_back(
    lab: SystemLab, big_template: tuple[str, Path, str], tmp_path: Path
) -> None:
    hv = lab.hv
    tname, base, base_sum = big_template
    runner = Runner(lab, tmp_path / "state")
    backups = str(lab.dir / "backups")
    before = sorted(p.name for p in lab.dir.iterdir())
    for n, (point, reached) in enumerate(POINTS.items()):
        x = lab.name(f"k{n}")
        proc = runner.start("clone", tname, x, "--full", "--count", "3", "--start",
                            "--allow-unsealed", "--backup-dir", backups)  # fmt: skip
        assert wait_until(lambda: reached(hv, lab, x), proc), point  # noqa: B023
        proc.kill()  # SIGKILL to Python alone: nothing can be handled
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while copying(lab.prefix) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not copying(lab.prefix), f"{point}: qemu-img went on copying alone"
        listed = runner.run("recover", "--json")
        assert listed.returncode == 0, listed.stderr
        items = json.loads(listed.stdout)
        assert len(items) == 1 and items[0]["host"] == hv.uri, point
        assert any(x in line for line in items[0]["undo"]), items
        rolled = runner.run("recover", "--yes")
        assert rolled.returncode == 0, rolled.stderr
        assert "rolled back: deploying 3 full clone(s)" in rolled.stdout
        assert not [d for d in hv.conn.listAllDomains(0) if d.name().startswith(x)], point
        assert sorted(p.name for p in lab.dir.iterdir()) == before, point
        assert runner.left_journals() == []
        assert runner.run("recover").stdout.startswith("nothing to recover")
    assert checksum(base) == base_sum


def test_interrupted_external_revert_leaves_the_vm_running(lab: SystemLab, tmp_path: Path) -> None:
    """A revert is short; whenever the signal lands, the VM ends running and every file in
    the lab is one the domain or its snapshots use (no orphan overlay)."""
    hv = lab.hv
    runner = Runner(lab, tmp_path / "state")
    name = lab.define("rev")
    hv.start(name)
    assert runner.run("snapshot", "create", name, "s1", "--external").returncode == 0
    for delay in (0.0, 0.15, 0.3, 0.45, 0.6, 0.9):
        proc = runner.start("snapshot", "revert", name, "s1")
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err
        assert hv.domain(name).state == DomainState.RUNNING, (delay, err)
        tree = json.loads(runner.run("snapshot", "ls", name, "--json").stdout)
        used = {f["path"] for n in tree for f in n["files"]}
        used |= {d.path for d in hv.domain(name).disks if d.path}
        chain = subprocess.run(
            ["qemu-img", "info", "-U", "--backing-chain", "--output=json",
             next(d.path for d in hv.domain(name).disks if d.path)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        used |= {layer["filename"] for layer in json.loads(chain)}
        files = {str(p) for p in lab.dir.iterdir()}
        assert files <= used, (delay, files - used)
        assert runner.left_journals() == []


@pytest.mark.sysprep
def test_interrupted_template_create_puts_the_vm_back(lab: SystemLab, tmp_path: Path) -> None:
    """SIGTERM while virt-sysprep seals: virt-sysprep is ended with the operation, the VM
    keeps its name and definition, its image its mode, no template or backup appears."""
    from tests.test_templates_system import guest_disk

    hv = lab.hv
    runner = Runner(lab, tmp_path / "state")
    disk = guest_disk(lab, "seal.qcow2", tmp_path)
    vm = lab.define("seal", disks=[(disk, "qcow2")])
    xml = hv.xml(vm, inactive=True)
    mode = os.stat(disk).st_mode
    backups = lab.dir / "backups"
    proc = runner.start("template", "create", vm, "--name", lab.name("tseal"),
                        "--backup-dir", str(backups))  # fmt: skip

    def sealing() -> bool:  # this lab's virt-sysprep (other runs may seal meanwhile)
        for p in Path("/proc").iterdir():
            try:
                line = (p / "cmdline").read_bytes() if p.name.isdigit() else b""
            except OSError:
                continue
            if b"virt-sysprep" in line and lab.prefix.encode() in line:
                return True
        return False

    assert wait_until(sealing, proc), proc.communicate()
    time.sleep(1.0)  # well inside the seal
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in err.splitlines()[-1], err
    assert hv.exists(vm) and not hv.exists(lab.name("tseal"))
    assert hv.xml(vm, inactive=True) == xml
    assert os.stat(disk).st_mode == mode and not list(backups.glob("*"))
    deadline = time.monotonic() + 10
    while sealing() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sealing(), "virt-sysprep went on alone"
    assert runner.left_journals() == []


def test_a_stale_journal_takes_nothing_from_clones_deployed_again(
    lab: SystemLab, big_template: tuple[str, Path, str], tmp_path: Path
) -> None:
    """Issue 17, case 5: `clone --count 3` SIGKILLed half-way; the operator removes the
    leftovers by hand and deploys the same names again; `recover --yes` then finds the old
    journal: it must take nothing from the new clones (their disks are at the same paths)."""
    hv = lab.hv
    tname, base, base_sum = big_template
    runner = Runner(lab, tmp_path / "state")
    backups = str(lab.dir / "backups")
    x = lab.name("again")
    proc = runner.start("clone", tname, x, "--full", "--count", "3", "--allow-unsealed",
                        "--backup-dir", backups)  # fmt: skip
    assert wait_until(lambda: POINTS["copy"](hv, lab, x), proc)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while copying(lab.prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    # By hand: undefine what was defined, remove what was written.
    for dom in hv.conn.listAllDomains(0):
        if dom.name().startswith(x):
            dom.undefine()
    for p in lab.dir.glob(f"{x}-*"):
        p.unlink()
    again = runner.run("clone", tname, x, "--count", "3", "--allow-unsealed",
                       "--backup-dir", backups)  # fmt: skip
    assert again.returncode == 0, again.stderr
    disks = sorted(lab.dir.glob(f"{x}-*.qcow2"))
    assert len(disks) == 3
    sums = {p: checksum(p) for p in disks}
    rolled = runner.run("recover", "--yes")
    assert rolled.returncode == 0, rolled.stderr
    assert "skipped" in rolled.stdout, rolled.stdout
    assert sorted(d.name() for d in hv.conn.listAllDomains(0) if d.name().startswith(x)) == [
        f"{x}-1",
        f"{x}-2",
        f"{x}-3",
    ]
    for p, s in sums.items():
        assert p.exists() and checksum(p) == s, p
        qemu_img("check", str(p))
    assert runner.left_journals() == []
    assert checksum(base) == base_sum
