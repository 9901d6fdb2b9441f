"""Snapshots against the real libvirtd: trees, data really going back, refusals, failures.

Data checks write a byte pattern into the disk (qemu-io on the image while shut off, QEMU's own
`qemu-io` monitor command while running), snapshot, overwrite, revert, and read the first
pattern back from the image after the domain is stopped.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import libvirt
import pytest

from tests.lab import SystemLab, qemu_img
from tui.cli import main
from tui.core import snapshots as S
from tui.core.errors import InvalidInputError, NotFoundError, OperationError, StateError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.core.storage.qemuimg import QemuImg, run_subprocess

pytestmark = pytest.mark.system

MIB = 1024 * 1024


def io_write(path: str, pattern: int, offset: int = 0) -> None:
    subprocess.run(
        ["qemu-io", "-c", f"write -P {pattern:#x} {offset} 1M", path],
        check=True,
        capture_output=True,
    )


def has_pattern(path: str, pattern: int, offset: int = 0) -> bool:
    """Read through the whole backing chain, read-only and sharing locks."""
    proc = subprocess.run(
        ["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} 1M", path],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout + proc.stderr


def live_write(hv: Hypervisor, name: str, pattern: int) -> None:
    """Write into the running guest's first disk through QEMU itself (the image is locked)."""
    dev = "/machine/peripheral/virtio-disk0/virtio-backend"
    for cmd in (f'qemu-io -d {dev} "write -P {pattern:#x} 0 1M"', f'qemu-io -d {dev} "flush"'):
        out = subprocess.run(
            ["virsh", "-c", hv.uri, "qemu-monitor-command", name, "--hmp", cmd],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "Error" not in out, out


def disk_paths(hv: Hypervisor, name: str) -> list[str]:
    hv.invalidate()  # the CLI changes domains through its own connection
    return [str(d.path) for d in hv.domain(name).disks]


def stop(hv: Hypervisor, name: str) -> None:
    if hv.domain(name).state.active:
        hv.destroy(name)


def virsh_tree(hv: Hypervisor, name: str) -> str:
    return subprocess.run(
        ["virsh", "-c", hv.uri, "snapshot-list", "--tree", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def cli(hv: Hypervisor, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["-c", hv.uri, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def take(hv: Hypervisor, name: str, snap: str, **kw: bool) -> S.SnapshotNode:
    return S.create(hv, S.plan_create(hv, name, snap, **kw))


def back_to(hv: Hypervisor, name: str, snap: str, qemu: QemuImg | None = None) -> S.RevertPlan:
    plan = S.plan_revert(hv, name, snap, qemu_img=qemu)
    S.revert(hv, plan, qemu_img=qemu)
    return plan


def referenced_files_exist(hv: Hypervisor, name: str) -> None:
    """No disk points at a deleted file, and every snapshot's image is still there."""
    for path in disk_paths(hv, name):
        chain = QemuImg().info(path, backing_chain=True)
        assert all(os.path.isfile(e["filename"]) for e in chain)
    for node in S.snapshot_tree(hv, name).nodes:
        for d in node.disks:
            if d.image:
                assert os.path.isfile(d.image), (node.name, d.image)


# -- trees ------------------------------------------------------------------------------------


def test_branching_internal_tree_matches_virsh(
    system_hv: Hypervisor, lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = system_hv
    name = lab.define("tree")
    for snap in ("a1", "a2", "a3"):
        take(hv, name, snap)
    back_to(hv, name, "a1")
    take(hv, name, "b1")
    take(hv, name, "b2")
    back_to(hv, name, "a2")
    take(hv, name, "c1")

    tree = S.snapshot_tree(hv, name)
    assert tree.render(mark_current=False) == virsh_tree(hv, name)
    assert tree.current is not None and tree.current.name == "c1"
    assert tree.get("a2").children == ("a3", "c1")
    assert tree.get("b1").parent == "a1"

    code, out, _ = cli(hv, capsys, "snapshot", "ls", name)
    assert code == 0 and "c1 (current)" in out
    code, out, _ = cli(hv, capsys, "snapshot", "ls", name, "--json")
    import json

    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"a1", "a2", "a3", "b1", "b2", "c1"}
    for r in rows.values():
        assert set(r) >= {
            "name", "parent", "created", "state", "kind", "current", "description", "files"
        }  # fmt: skip
    assert rows["c1"]["current"] and not rows["a1"]["current"]
    assert rows["b2"]["parent"] == "b1" and rows["a1"]["parent"] is None
    assert rows["a1"]["kind"] == "internal" and rows["a1"]["state"] == "shutoff"


def test_branching_external_tree_matches_virsh(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    name = lab.define("xtree")
    take(hv, name, "e1", external=True)
    take(hv, name, "e2", external=True)
    back_to(hv, name, "e1")
    take(hv, name, "f1", external=True, description="after the branch")
    tree = S.snapshot_tree(hv, name)
    assert tree.render(mark_current=False) == virsh_tree(hv, name)
    assert tree.get("e1").children == ("e2", "f1")
    f1 = tree.get("f1")
    assert f1.current and f1.kind == "disk-only" and f1.description == "after the branch"
    assert [f.role for f in f1.files] == ["disk vda"]
    assert name in f1.files[0].path and ".f1." in f1.files[0].path
    assert f1.files[0].size_bytes and f1.files[0].size_bytes > 0
    referenced_files_exist(hv, name)


# -- data really goes back --------------------------------------------------------------------


def test_internal_shut_off_round_trip(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    disk = lab.disk("int.qcow2")
    name = lab.define("int", disks=[(disk, "qcow2")])
    io_write(disk, 0x11)
    take(hv, name, "before", description="known pattern")
    io_write(disk, 0x22)
    assert not has_pattern(disk, 0x11)
    plan = back_to(hv, name, "before")
    assert plan.method == "libvirt"
    assert has_pattern(disk, 0x11)


def test_internal_running_round_trip_restores_memory(
    system_hv: Hypervisor, lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = system_hv
    name = lab.define("intrun")
    hv.start(name)
    live_write(hv, name, 0x11)
    plan = S.plan_create(hv, name, "live")
    assert any("pauses" in n for n in plan.notes)
    node = S.create(hv, plan)
    assert node.kind == "internal" and node.state == "running"
    live_write(hv, name, 0x22)
    code, out, _ = cli(hv, capsys, "rollback", name)
    assert code == 0 and "live" in out
    assert hv.domain(name).state == DomainState.RUNNING  # memory state restored
    stop(hv, name)
    assert has_pattern(disk_paths(hv, name)[0], 0x11)


def test_external_shut_off_raw_round_trip(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    raw = lab.disk("raw.img", fmt="raw")
    name = lab.define("raw", disks=[(raw, "raw")])
    io_write(raw, 0x11)
    node = take(hv, name, "s1", external=True)
    overlay = disk_paths(hv, name)[0]
    assert overlay != raw and name in overlay and "s1" in overlay
    assert node.files[0].path == overlay
    io_write(overlay, 0x22)
    plan = back_to(hv, name, "s1")
    assert plan.method == ("libvirt" if S.libvirt_handles_external(hv) else "virtdeck")
    now = disk_paths(hv, name)[0]
    assert has_pattern(now, 0x11)
    assert S.snapshot_tree(hv, name).get("s1").current
    # Reverting again (the quick rollback) discards the new overlay's writes too.
    io_write(now, 0x33)
    back_to(hv, name, "s1")
    assert has_pattern(disk_paths(hv, name)[0], 0x11)
    assert has_pattern(raw, 0x11)  # the snapshot's image itself was never written
    referenced_files_exist(hv, name)
    hv.start(name)  # still bootable
    assert hv.domain(name).state == DomainState.RUNNING


def test_external_running_round_trip_restores_memory(
    system_hv: Hypervisor, lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = system_hv
    name = lab.define("extrun")
    hv.start(name)
    live_write(hv, name, 0x11)
    code, out, err = cli(hv, capsys, "snapshot", "create", name, "s1", "--external")
    assert code == 0, err
    node = S.snapshot_tree(hv, name).get("s1")
    assert node.kind == "external" and node.state == "running"
    assert [f.role for f in node.files] == ["disk vda", "memory"]
    live_write(hv, name, 0x22)
    code, out, err = cli(hv, capsys, "snapshot", "revert", name, "s1")
    assert code == 0, err
    assert hv.domain(name).state == DomainState.RUNNING
    # The tree still agrees with libvirt after virtdeck's own revert.
    assert S.snapshot_tree(hv, name).render(mark_current=False) == virsh_tree(hv, name)
    live_write(hv, name, 0x44)  # the guest keeps running on the fresh overlay
    stop(hv, name)
    path = disk_paths(hv, name)[0]
    assert has_pattern(path, 0x44)
    back_to(hv, name, "s1")
    stop(hv, name)
    assert has_pattern(disk_paths(hv, name)[0], 0x11)
    referenced_files_exist(hv, name)


def test_external_disk_only_running_revert_boots_again(
    system_hv: Hypervisor, lab: SystemLab
) -> None:
    hv = system_hv
    disk = lab.disk("do.qcow2")
    name = lab.define("do", disks=[(disk, "qcow2")])
    io_write(disk, 0x11)
    hv.start(name)
    node = take(hv, name, "s1", external=True, disk_only=True)
    assert node.kind == "disk-only" and node.memory_file is None
    live_write(hv, name, 0x22)
    plan = back_to(hv, name, "s1")
    # No memory state to restore: the guest boots afresh from the snapshot's disks.
    assert hv.domain(name).state == DomainState.RUNNING
    assert "running" in plan.result_state
    stop(hv, name)
    assert has_pattern(disk_paths(hv, name)[0], 0x11)


# -- delete -----------------------------------------------------------------------------------


def test_delete_external_running_block_commit(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    disk = lab.disk("bc.qcow2")
    name = lab.define("bc", disks=[(disk, "qcow2")])
    io_write(disk, 0x11)
    hv.start(name)
    take(hv, name, "s1", external=True, disk_only=True)
    overlay = disk_paths(hv, name)[0]
    live_write(hv, name, 0x22)
    S.delete(hv, S.plan_delete(hv, name, "s1"))
    assert S.snapshot_tree(hv, name).nodes == ()
    assert disk_paths(hv, name) == [disk]
    assert not os.path.exists(overlay)
    inactive = hv.xml(name, inactive=True)
    assert overlay not in inactive and disk in inactive
    stop(hv, name)
    assert has_pattern(disk, 0x22)  # the writes since the snapshot were kept


def test_delete_external_with_children_shut_off(
    system_hv: Hypervisor, lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = system_hv
    disk = lab.disk("ch.qcow2")
    name = lab.define("ch", disks=[(disk, "qcow2")])
    io_write(disk, 0x11)
    take(hv, name, "s1", external=True)
    io_write(disk_paths(hv, name)[0], 0x22)
    take(hv, name, "s2", external=True)
    io_write(disk_paths(hv, name)[0], 0x33)
    before = set(os.listdir(lab.dir))
    code, _, err = cli(hv, capsys, "snapshot", "delete", name, "s1")
    assert code == 0, err
    tree = S.snapshot_tree(hv, name)
    assert tree.names == ("s2",) and tree.get("s2").parent is None
    assert len(os.listdir(lab.dir)) == len(before) - 1  # s1's overlay merged away
    assert has_pattern(disk_paths(hv, name)[0], 0x33)
    referenced_files_exist(hv, name)
    back_to(hv, name, "s2")
    assert has_pattern(disk_paths(hv, name)[0], 0x22)
    # --children on the root takes the whole subtree; the data the disk shows stays.
    io_write(disk_paths(hv, name)[0], 0x44)
    code, _, err = cli(hv, capsys, "snapshot", "delete", name, "s2", "--children")
    assert code == 0, err
    assert S.snapshot_tree(hv, name).nodes == ()
    assert disk_paths(hv, name) == [disk]
    assert has_pattern(disk, 0x44)
    assert sorted(os.listdir(lab.dir)) == ["ch.qcow2"]


def test_internal_delete_with_children(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    name = lab.define("idel")
    for snap in ("a", "b", "c"):
        take(hv, name, snap)
    S.delete(hv, S.plan_delete(hv, name, "b"))
    assert S.snapshot_tree(hv, name).get("c").parent == "a"
    plan = S.plan_delete(hv, name, "a", children=True)
    assert plan.names == ("c", "a")
    S.delete(hv, plan)
    assert S.snapshot_tree(hv, name).nodes == ()
    out = qemu_img("snapshot", "-l", disk_paths(hv, name)[0])
    assert " a " not in out and " c " not in out


def test_files_a_clone_uses_are_kept(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    disk = lab.disk("base.qcow2")
    name = lab.define("cl", disks=[(disk, "qcow2")])
    io_write(disk, 0x11)
    take(hv, name, "s1", external=True)
    overlay = disk_paths(hv, name)[0]
    io_write(overlay, 0x22)
    clone = str(lab.dir / "clone.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", overlay, clone)
    plan = S.plan_revert(hv, name, "s1")
    assert overlay not in plan.discard
    S.revert(hv, plan)
    assert os.path.isfile(overlay) and has_pattern(clone, 0x22)
    # Committing into the base would change what the clone sees: the files stay.
    base_clone = str(lab.dir / "clone2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk, base_clone)
    S.delete(hv, S.plan_delete(hv, name, "s1"))
    assert has_pattern(base_clone, 0x11) and has_pattern(clone, 0x22)
    referenced_files_exist(hv, name)


# -- refusals ---------------------------------------------------------------------------------


def test_refusals(
    system_hv: Hypervisor, lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = system_hv
    raw = lab.disk("r.img", fmt="raw")
    rname = lab.define("rraw", disks=[(raw, "raw")])
    with pytest.raises(InvalidInputError, match="--external"):
        S.plan_create(hv, rname, "x")
    code, out, err = cli(hv, capsys, "snapshot", "create", rname, "x")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "--external" in err
    with pytest.raises(InvalidInputError, match="--disk-only goes with --external"):
        S.plan_create(hv, rname, "x", disk_only=True)
    with pytest.raises(InvalidInputError, match="invalid snapshot name"):
        S.plan_create(hv, rname, "../x", external=True)
    with pytest.raises(StateError, match="--quiesce"):
        S.plan_create(hv, rname, "x", external=True, disk_only=True, quiesce=True)
    with pytest.raises(NotFoundError, match="no current snapshot"):
        S.plan_rollback(hv, rname)
    code, _, err = cli(hv, capsys, "rollback", rname)
    assert code == 1 and len(err.strip().splitlines()) == 1

    name = lab.define("mix")
    take(hv, name, "i1")
    with pytest.raises(InvalidInputError, match="already has a snapshot named"):
        S.plan_create(hv, name, "i1")
    with pytest.raises(InvalidInputError, match="internal snapshots"):
        S.plan_create(hv, name, "e1", external=True)
    with pytest.raises(NotFoundError, match="no snapshot named 'nope'"):
        S.plan_revert(hv, name, "nope")
    code, _, err = cli(hv, capsys, "snapshot", "delete", name, "nope")
    assert code == 1 and "nope" in err and len(err.strip().splitlines()) == 1

    xname = lab.define("xmix")
    take(hv, xname, "e1", external=True)
    with pytest.raises(InvalidInputError, match="add --external"):
        S.plan_create(hv, xname, "i1")
    # An overlay file already in the way is never overwritten.
    in_way = os.path.join(os.path.dirname(disk_paths(hv, xname)[0]), f"{xname}.e2.vda.qcow2")
    open(in_way, "w").close()
    with pytest.raises(InvalidInputError, match="never overwrites"):
        S.plan_create(hv, xname, "e2", external=True)

    # A running guest without an agent cannot be quiesced: one line, nothing left behind.
    qname = lab.define("quiesce")
    hv.start(qname)
    files = set(os.listdir(lab.dir))
    with pytest.raises(InvalidInputError, match="--disk-only"):
        S.plan_create(hv, qname, "q", external=True, quiesce=True)
    code, _, err = cli(
        hv, capsys, "snapshot", "create", qname, "q", "--external", "--disk-only", "--quiesce"
    )
    assert code == 1 and "agent" in err.strip().splitlines()[-1].lower()
    assert set(os.listdir(lab.dir)) == files and S.snapshot_tree(hv, qname).nodes == ()


def test_delete_below_running_top_is_refused(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    name = lab.define("below")
    take(hv, name, "s1", external=True)
    take(hv, name, "s2", external=True)
    hv.start(name)
    with pytest.raises(StateError, match="shut it down first"):
        S.plan_delete(hv, name, "s1", by_virtdeck=True)
    assert S.snapshot_tree(hv, name).names == ("s1", "s2")


def test_internal_revert_after_external_is_refused(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    name = lab.define("virshmix")
    take(hv, name, "i1")
    # Mixed by hand with virsh (virtdeck itself refuses to mix).
    subprocess.run(
        ["virsh", "-c", hv.uri, "snapshot-create-as", name, "e1", "--disk-only"],
        check=True,
        capture_output=True,
    )
    with pytest.raises(StateError, match="revert to that external snapshot first"):
        S.plan_revert(hv, name, "i1")
    with pytest.raises(InvalidInputError, match="mix internal and external"):
        S.plan_delete(hv, name, "i1", children=True)


# -- a failure half-way -----------------------------------------------------------------------


def failing_on_create(n: int, command: str = "create") -> QemuImg:
    """qemu-img whose n-th `command` fails (everything else runs for real)."""
    count = 0

    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        nonlocal count
        if argv[1] == command:
            count += 1
            if count == n:
                return subprocess.CompletedProcess(list(argv), 1, "", "injected: disk full")
        return run_subprocess(argv)

    return QemuImg(runner)


@pytest.mark.parametrize("running", [False, True], ids=["shut-off", "running"])
def test_external_revert_failing_half_way_changes_nothing(
    system_hv: Hypervisor, lab: SystemLab, running: bool
) -> None:
    hv = system_hv
    d1, d2 = lab.disk("f1.qcow2"), lab.disk("f2.raw", fmt="raw")
    name = lab.define("fail", disks=[(d1, "qcow2"), (d2, "raw")])
    io_write(d1, 0x11)
    io_write(d2, 0x12)
    take(hv, name, "s1", external=True)
    paths = disk_paths(hv, name)
    io_write(paths[0], 0x21)
    io_write(paths[1], 0x22)
    if running:
        hv.start(name)
    xml_before = hv.xml(name, inactive=True)
    files_before = sorted(os.listdir(lab.dir))
    qemu = failing_on_create(2)
    plan = S.plan_revert(hv, name, "s1", qemu_img=qemu, by_virtdeck=True)
    assert len(plan.switches) == 2
    with pytest.raises(OperationError, match="injected: disk full"):
        S.revert(hv, plan, qemu_img=qemu)
    assert sorted(os.listdir(lab.dir)) == files_before  # the first new overlay was removed
    assert hv.xml(name, inactive=True) == xml_before
    assert disk_paths(hv, name) == paths
    assert hv.domain(name).state.active == running  # nothing was stopped
    stop(hv, name)
    hv.start(name)  # bootable
    assert hv.domain(name).state == DomainState.RUNNING
    stop(hv, name)
    assert has_pattern(paths[0], 0x21) and has_pattern(paths[1], 0x22)  # data intact
    # ... and the same revert works once qemu-img behaves.
    back_to(hv, name, "s1")
    now = disk_paths(hv, name)
    assert has_pattern(now[0], 0x11) and has_pattern(now[1], 0x12)


def test_revert_failing_at_metadata_step_is_undone(
    system_hv: Hypervisor, lab: SystemLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    hv = system_hv
    name = lab.define("meta")
    take(hv, name, "s1", external=True)
    take(hv, name, "s2", external=True)
    paths = disk_paths(hv, name)
    io_write(paths[0], 0x21)
    xml_before = hv.xml(name, inactive=True)
    files_before = sorted(os.listdir(lab.dir))

    original = S.common.redefine
    calls: list[int] = []

    def broken(*a: object, **k: object) -> None:
        calls.append(1)
        if len(calls) == 1:  # the revert's step fails; its undo (the same call) works
            raise OperationError("injected: metadata")
        original(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(S.common, "redefine", broken)
    with pytest.raises(OperationError, match="injected: metadata"):
        S.revert(hv, S.plan_revert(hv, name, "s1", by_virtdeck=True))
    monkeypatch.undo()
    assert hv.xml(name, inactive=True) == xml_before
    assert sorted(os.listdir(lab.dir)) == files_before
    assert S.snapshot_tree(hv, name).current.name == "s2"  # type: ignore[union-attr]
    assert has_pattern(paths[0], 0x21)
    hv.start(name)
    assert hv.domain(name).state == DomainState.RUNNING


def test_delete_failing_half_way_loses_no_data(system_hv: Hypervisor, lab: SystemLab) -> None:
    hv = system_hv
    disk = lab.disk("hw.qcow2")
    name = lab.define("hw", disks=[(disk, "qcow2")])
    io_write(disk, 0x11)
    take(hv, name, "s1", external=True)
    io_write(disk_paths(hv, name)[0], 0x22)
    take(hv, name, "s2", external=True)
    io_write(disk_paths(hv, name)[0], 0x33)
    qemu = failing_on_create(1, "rebase")  # after the commit into the base
    plan = S.plan_delete(hv, name, "s1", qemu_img=qemu, by_virtdeck=True)
    with pytest.raises(OperationError, match="failed half-way.*no data was lost"):
        S.delete(hv, plan, qemu_img=qemu)
    assert S.snapshot_tree(hv, name).names == ("s2",)  # s1's state is gone: so is s1
    assert has_pattern(disk_paths(hv, name)[0], 0x33)
    referenced_files_exist(hv, name)
    back_to(hv, name, "s2")
    assert has_pattern(disk_paths(hv, name)[0], 0x22)
    hv.start(name)
    assert hv.domain(name).state == DomainState.RUNNING


def test_libvirt_capability_probe_matches_version(system_hv: Hypervisor) -> None:
    # The feature appeared in 9.9.0; the probe reads the capabilities, not the version.
    assert S.libvirt_handles_external(system_hv) == (system_hv.lib_version() >= 9_009_000)
    _ = libvirt
