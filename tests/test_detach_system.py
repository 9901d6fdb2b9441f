"""`virtdeck detach` against the real libvirtd (both daemons): a thin clone becomes full.

Shut off: its chain is converted into a new image, the definition switched, the old overlay
removed. Running (a no-OS domain: a block job needs no guest): the base is pulled in live,
with writes made through QEMU during the pull; SIGTERM during the pull aborts the job and
leaves the clone thin and running. Afterwards `qemu-img info` shows no backing file, the
patterns written before read back, the template's base is unchanged and the template can be
removed once its last clone is detached. One test detaches the real Debian guest (TCG, host
daemon) while a loop inside it writes and syncs.

`clone --from-snapshot` of an internal and of an external snapshot: the clones read the
snapshot's data; the VM's definition, tree, current snapshot, disks and files are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab
from tests.test_snapshots_system import cli, disk_paths, has_pattern, io_write, live_write
from tui.core import detach
from tui.core.clones import execute_clone, plan_clone, plan_remove
from tui.core.errors import DependencyError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.core.templates import execute_template, plan_template

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent
BASE_PATTERN = 0xAB
MIB = 1024**2


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out)


def template_with_clones(
    lab: SystemLab, count: int = 1, base_mib: int = 0
) -> tuple[str, str, list[str]]:
    """A template whose base holds BASE_PATTERN at 0 (and `base_mib` MiB of random data from
    8 MiB on, so a pull takes a while), and `count` thin clones, shut off:
    (template, base, clones)."""
    hv = lab.hv
    disk = lab.disk("base.qcow2", size="1G")
    io_write(disk, BASE_PATTERN)
    if base_mib:
        raw = lab.dir / "payload.raw"
        with open(raw, "wb") as fh:
            subprocess.run(["head", "-c", str(base_mib * MIB), "/dev/urandom"], stdout=fh,
                           check=True)  # fmt: skip
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -s {raw} 8M {base_mib}M", disk],
            check=True, capture_output=True,
        )  # fmt: skip
        raw.unlink()
    src = lab.define("src", [(disk, "qcow2")])
    backups = lab.dir / "backups"
    tname = lab.name("tpl")
    execute_template(hv, plan_template(hv, src, name=tname, seal=False, backup_dir=backups))
    plan = plan_clone(hv, tname, lab.name("c"), count=count, allow_unsealed=True,
                      backup_dir=backups)  # fmt: skip
    names = list(execute_clone(hv, plan))
    hv.invalidate()
    return tname, disk, names


def assert_full(hv: Hypervisor, name: str) -> str:
    path = disk_paths(hv, name)[0]
    facts = info(path)
    assert "backing-filename" not in facts, facts
    assert hv.domain(name).meta.mode == "full"
    return path


def test_detach_shut_off_clone(lab: SystemLab, capsys: pytest.CaptureFixture[str]) -> None:
    hv = lab.hv
    tname, base, (name,) = template_with_clones(lab)
    base_sum = sha256(base)
    overlay = disk_paths(hv, name)[0]
    io_write(overlay, 0x5C, offset=4 * MIB)  # the clone's own data
    # The template cannot go while its clone builds on it.
    with pytest.raises(DependencyError):
        plan_remove(hv, tname, storage=True, backup_dir=lab.dir / "backups")
    code, out, err = cli(hv, capsys, "detach", name, "--dry-run")
    assert code == 0 and "converted into a new standalone image" in err, err
    assert disk_paths(hv, name) == [overlay]
    code, out, err = cli(hv, capsys, "detach", name)
    assert code == 0, err
    assert "detached" in out
    path = assert_full(hv, name)
    assert path != overlay and os.path.dirname(path) == os.path.dirname(overlay)
    assert not os.path.exists(overlay)  # the old overlay removed last
    assert has_pattern(path, BASE_PATTERN) and has_pattern(path, 0x5C, 4 * MIB)
    assert sha256(base) == base_sum
    code, _, err = cli(hv, capsys, "detach", name)
    assert code == 1 and "already full" in err
    code, out, err = cli(hv, capsys, "usage", "--json")
    assert code == 0, err
    (tpl,) = [t for t in json.loads(out)["templates"] if t["name"] == tname]
    assert [c["domain"] for c in tpl["full"]] == [name] and tpl["thin"] == [], tpl
    # Its last clone is full: the template (and its base) can go; the clone still reads.
    code, _, err = cli(hv, capsys, "rm", tname, "--storage", "--backup-dir",
                       str(lab.dir / "backups"))  # fmt: skip
    assert code == 0, err
    assert not os.path.exists(base)
    assert has_pattern(path, BASE_PATTERN)
    hv.start(name)
    assert hv.domain(name).state is DomainState.RUNNING


def test_detach_running_clone_while_qemu_writes(
    lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second clone stays thin: the template is refused, then allowed once it is gone."""
    hv = lab.hv
    tname, base, (name, other) = template_with_clones(lab, count=2, base_mib=64)
    base_sum = sha256(base)
    overlay = disk_paths(hv, name)[0]
    io_write(overlay, 0x5C, offset=4 * MIB)
    hv.start(name)
    # At 1 MiB/s the 65 MiB of the base take a minute to pull: the write below lands while
    # the job runs whatever the machine's load (the limit was set only after a first look at
    # the job, and under load the job had once ended by then), and then the limit is lifted.
    plan = detach.plan_detach(hv, name, bandwidth=1)
    assert plan.live and plan.disks[0].path == overlay
    assert "at most 1 MiB/s" in "\n".join(plan.summary())
    dom = hv.conn.lookupByName(name)
    written: list[bool] = []

    def progress(message: str, fraction: float | None) -> None:
        if not written:
            assert dom.blockJobInfo("vda", 0)["bandwidth"] == 1  # MiB/s, as planned
            live_write(hv, name, 0x77)  # a guest write mid-pull, at 0: over the base's pattern
            dom.blockJobSetSpeed("vda", 0, 0)
            written.append(True)

    assert detach.execute_detach(hv, plan, progress) == [overlay]
    assert written
    assert hv.domain(name).state is DomainState.RUNNING
    assert assert_full(hv, name) == overlay
    assert has_pattern(overlay, 0x77) and has_pattern(overlay, 0x5C, 4 * MIB)
    assert sha256(base) == base_sum
    with pytest.raises(DependencyError):
        plan_remove(hv, tname, storage=True, backup_dir=lab.dir / "backups")
    hv.destroy(name)
    assert has_pattern(overlay, 0x77)  # after QEMU let go: the header has no backing either
    assert "backing-filename" not in info(overlay)
    code, _, err = cli(hv, capsys, "rm", other, "--storage")
    assert code == 0, err
    code, _, err = cli(hv, capsys, "rm", tname, "--storage", "--backup-dir",
                       str(lab.dir / "backups"))  # fmt: skip
    assert code == 0, err


def test_sigterm_during_a_live_detach_leaves_the_clone_thin_and_running(
    lab: SystemLab, tmp_path: Path
) -> None:
    hv = lab.hv
    _, base, (name,) = template_with_clones(lab, base_mib=64)
    overlay = disk_paths(hv, name)[0]
    hv.start(name)
    dom = hv.conn.lookupByName(name)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui", "-c", hv.uri, "detach", name, "--bandwidth", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not dom.blockJobInfo("vda", 0):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pull never started"
            time.sleep(0.002)
        # 1 MiB/s from the start (a minute for the base): still pulling when the signal lands.
        assert dom.blockJobInfo("vda", 0)["bandwidth"] == 1
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted" in err, err
    assert not dom.blockJobInfo("vda", 0)  # the job was aborted
    hv.invalidate()
    assert hv.domain(name).state is DomainState.RUNNING
    assert disk_paths(hv, name) == [overlay]
    assert info(overlay)["backing-filename"] == base  # still thin
    assert hv.domain(name).meta.mode == "thin"
    assert has_pattern(overlay, BASE_PATTERN)
    assert not list((tmp_path / "state" / "virtdeck" / "journal").glob("*.json"))


def test_detach_refuses_a_clone_with_snapshots(lab: SystemLab) -> None:
    hv = lab.hv
    _, _, (name,) = template_with_clones(lab)
    hv.conn.lookupByName(name).snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>")
    with pytest.raises(DependencyError, match="has snapshots .s1."):
        detach.plan_detach(hv, name)


# -- clone --from-snapshot ---------------------------------------------------------------------


def vm_facts(hv: Hypervisor, name: str) -> tuple[str, list[str], str | None, list[str]]:
    """What must not change: the definition, the snapshot names, the current one, the disks."""
    dom = hv.conn.lookupByName(name)
    current = dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None
    names = sorted(s.getName() for s in dom.listAllSnapshots(0))
    return dom.XMLDesc(2), names, current, disk_paths(hv, name)


@pytest.mark.parametrize("kind", ["internal", "external"])
def test_clone_from_a_snapshot_reads_its_data(
    lab: SystemLab, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    hv = lab.hv
    vm = lab.define("src")
    io_write(disk_paths(hv, vm)[0], 0x11)
    extra = ["--external"] if kind == "external" else []
    code, _, err = cli(hv, capsys, "snapshot", "create", vm, "s1", *extra)
    assert code == 0, err
    io_write(disk_paths(hv, vm)[0], 0x22)  # after the snapshot: the current state
    before = vm_facts(hv, vm)
    sums = {str(p): sha256(str(p)) for p in lab.dir.iterdir() if p.is_file()}
    code, _, err = cli(hv, capsys, "clone", "--from-snapshot", vm, "s1", lab.name("thin"),
                       "--count", "2")  # fmt: skip
    assert code == 0, err
    code, _, err = cli(hv, capsys, "clone", "--from-snapshot", vm, "s1", lab.name("full"),
                       "--full")  # fmt: skip
    assert code == 0, err
    thin = [disk_paths(hv, lab.name(f"thin-{i}"))[0] for i in (1, 2)]
    full = disk_paths(hv, lab.name("full"))[0]
    for path in [*thin, full]:
        assert has_pattern(path, 0x11), path
    assert "backing-filename" not in info(full)
    base = info(thin[0])["backing-filename"]
    assert base == info(thin[1])["backing-filename"]
    if kind == "internal":
        assert base not in sums
        assert os.stat(base).st_mode & 0o222 == 0  # read-only like a template's base
    else:
        assert base in {str(p) for p in sums}  # the layer the snapshot froze
    # The VM: same definition, tree, current snapshot, disks and data; no file of it changed.
    assert vm_facts(hv, vm) == before
    assert has_pattern(disk_paths(hv, vm)[0], 0x22)
    assert {p: sha256(str(p)) for p in sums} == sums
    # A clone boots its own way: start and write, the VM's files still unchanged.
    hv.start(lab.name("thin-1"))
    assert hv.domain(lab.name("thin-1")).state is DomainState.RUNNING
    assert {p: sha256(str(p)) for p in sums} == sums
    # Deleting the snapshot afterwards keeps what the clones build on.
    hv.destroy(lab.name("thin-1"))
    code, _, err = cli(hv, capsys, "snapshot", "delete", vm, "s1")
    for path in thin:
        assert has_pattern(path, 0x11), (code, err)
    assert has_pattern(disk_paths(hv, vm)[0], 0x22)


def test_sigterm_during_a_shut_off_detach_leaves_the_finished_result_or_nothing(
    lab: SystemLab, tmp_path: Path
) -> None:
    """The signal lands once the new image appeared (the copy under way, or just done):
    afterwards the clone is either still thin on its overlay with no new file, or full on the
    new one with the overlay gone; never both, never neither; no journal left."""
    hv = lab.hv
    _, base, (name,) = template_with_clones(lab, base_mib=256)
    overlay = disk_paths(hv, name)[0]
    new = overlay.replace(".qcow2", "-full.qcow2")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui", "-c", hv.uri, "detach", name],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(new) and proc.poll() is None:
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    now = disk_paths(hv, name)
    if now == [overlay]:
        assert proc.returncode == 143 and "interrupted" in err, err
        assert not os.path.exists(new)
        assert info(overlay)["backing-filename"] == base
    else:
        assert now == [new] and not os.path.exists(overlay), (now, err)
        assert "backing-filename" not in info(new)
    assert has_pattern(now[0], BASE_PATTERN)
    assert not list((tmp_path / "state" / "virtdeck" / "journal").glob("*.json"))


@pytest.mark.timeout(guest.BOOT_DEADLINE + 300)  # a TCG boot, on a loaded machine too
def test_detach_a_running_real_guest_while_it_writes(host_lab: SystemLab) -> None:
    """The small Debian guest (TCG, host daemon only: its cached image lives outside the
    image directories the other daemon shares) on a thin overlay, a loop inside it writing
    and syncing a file; detached live; it keeps running and writing, its overlay stands
    alone, and the cached image it was built on is unchanged."""
    hv = host_lab.hv
    image = guest.build()
    cached_sum = sha256(str(image.disk))
    overlay = str(host_lab.dir / "g.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(image.disk), overlay], check=True)  # fmt: skip
    name = host_lab.name("g")
    hv.define(guest.domain_xml(name, image, overlay))
    hv.start(name)
    dom = hv.conn.lookupByName(name)
    loop = "i=0; while :; do i=$((i+1)); echo $i > /root/w; sync; done"
    code, _ = guest.agent_run(
        dom, f"nohup sh -c '{loop}' >/dev/null 2>&1 &", timeout=guest.BOOT_DEADLINE
    )
    assert code == 0
    code, before = guest.agent_run(dom, "cat /root/w")
    assert code == 0 and int(before) > 0
    plan = detach.plan_detach(hv, name)
    assert plan.live
    detach.execute_detach(hv, plan)
    assert "backing-filename" not in info(overlay)
    code, after = guest.agent_run(dom, "sleep 1; cat /root/w")
    assert code == 0 and int(after) > int(before)  # still writing, on the detached disk
    hv.destroy(name)
    out = subprocess.run(["qemu-img", "check", overlay], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sha256(str(image.disk)) == cached_sum


def test_clone_from_a_snapshot_gets_its_own_identity(
    host_lab: SystemLab, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The real guest (host daemon, virt-customize under TCG, ~40 s): an internal snapshot of
    a shut-off VM, one clone of it with --hostname-template and --ssh-key; the clone's disk
    has them, the VM's image is unchanged."""
    from tests.test_identity_system import guestfish_cat
    from tui.cli import main

    lab = host_lab
    image = guest.build()
    disk = str(lab.dir / "vm.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(image.disk), disk], check=True)  # fmt: skip
    vm = lab.name("vm")
    lab.hv.define(guest.domain_xml(vm, image, disk))
    assert main(["-c", lab.hv.uri, "snapshot", "create", vm, "s1"]) == 0
    before = sha256(disk)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@snap",
                    "-f", str(tmp_path / "k")], check=True)  # fmt: skip
    key = (tmp_path / "k.pub").read_text().strip()
    name = lab.name("c")
    rc = main(["-c", lab.hv.uri, "clone", "--from-snapshot", vm, "s1", name,
               "--hostname-template", "{name}.lab",
               "--ssh-key", str(tmp_path / "k.pub")])  # fmt: skip
    err = capfd.readouterr().err
    assert rc == 0, err
    assert f"identity: hostname {name}.lab; ssh key for root (ed25519 ops@snap)" in err
    files = ["/etc/hostname", "/root/.ssh/authorized_keys"]
    ((hostname, keys),) = guestfish_cat([disk_paths(lab.hv, name)[0]], files)
    assert hostname.strip() == f"{name}.lab" and key in keys.splitlines()
    assert sha256(disk) == before
    meta = lab.hv.domain(name).meta
    assert meta.role == "clone" and meta.complete and meta.source == f"{vm}@s1"


def test_detach_every_clone_of_a_template(
    lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = lab.hv
    tname, base, names = template_with_clones(lab, count=2)
    code, out, err = cli(hv, capsys, "detach", "--template", tname)
    assert code == 0, err
    for name in names:
        assert f"{name}: detached" in out
        assert has_pattern(assert_full(hv, name), BASE_PATTERN)
    code, _, err = cli(hv, capsys, "detach", "--template", tname)
    assert code == 1 and "nothing to detach" in err and "already full" in err, err
    with pytest.raises(SystemExit) as exit_:  # a usage error (argparse's exit 2)
        cli(hv, capsys, "detach")
    assert exit_.value.code == 2
