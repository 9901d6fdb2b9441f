"""Groups against the real libvirtd (both daemons): three clones of a template get one
snapshot and one rollback, the data checked with qemu-io (shut off) or the state (running);
a group snapshot that fails on one clone deletes the snapshots taken on the others."""

from __future__ import annotations

import subprocess

import pytest

from tests.lab import SystemLab
from tests.test_snapshots_system import cli, disk_paths, has_pattern, io_write, stop
from tui.cli.groups import resolver
from tui.core import groups
from tui.core import snapshots as S
from tui.core.clones import execute_clone, plan_clone
from tui.core.errors import InvalidInputError, OperationError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.core.templates import execute_template, plan_template

pytestmark = pytest.mark.system


def three_clones(lab: SystemLab) -> tuple[str, list[str]]:
    """A template (unsealed: no guest to seal) and three thin clones of it, shut off."""
    hv = lab.hv
    backups = lab.dir / "backups"
    backups.mkdir()
    src = lab.define("src")
    tname = lab.name("tpl")
    execute_template(hv, plan_template(hv, src, name=tname, seal=False, backup_dir=backups))
    plan = plan_clone(hv, tname, lab.name("c"), count=3, allow_unsealed=True, backup_dir=backups)
    names = list(execute_clone(hv, plan))
    assert len(names) == 3
    hv.invalidate()
    return tname, names


def snapshot_names(hv: Hypervisor, name: str) -> list[str]:
    return sorted(s.getName() for s in hv.conn.lookupByName(name).listAllSnapshots(0))


@pytest.mark.parametrize("kind", ["internal", "external"])
def test_group_snapshot_and_rollback_bring_every_disk_back(
    lab: SystemLab, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    hv = lab.hv
    tname, clones = three_clones(lab)
    for i, name in enumerate(clones):
        io_write(disk_paths(hv, name)[0], 0x10 + i)
    extra = ["--external"] if kind == "external" else []
    code, out, err = cli(hv, capsys, "snapshot", "create", "pre", "--template", tname, *extra)
    assert code == 0, err
    assert out.count("snapshot 'pre' taken") == 3, out
    for i, name in enumerate(clones):
        assert snapshot_names(hv, name) == ["pre"]
        io_write(disk_paths(hv, name)[0], 0x60 + i)  # after the snapshot
        assert not has_pattern(disk_paths(hv, name)[0], 0x10 + i)
    code, out, err = cli(hv, capsys, "rollback", *clones)
    assert code == 0, err
    assert "rollback cannot be undone" in err  # the plan says so
    assert out.count("back at 'pre'") == 3, out
    for i, name in enumerate(clones):
        path = disk_paths(hv, name)[0]
        assert has_pattern(path, 0x10 + i), (name, path)
        assert hv.domain(name).state is DomainState.SHUTOFF


def test_group_snapshot_of_running_clones_and_rollback_restarts_them(
    lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = lab.hv
    tname, clones = three_clones(lab)
    code, _, err = cli(hv, capsys, "start", "--template", tname)
    assert code == 0, err
    try:
        code, out, err = cli(hv, capsys, "snapshot", "create", "live", "--template", tname)
        assert code == 0, err
        code, out, err = cli(hv, capsys, "destroy", "--match", f"{lab.prefix}-c*")
        assert code == 0, err
        assert out.count("forced off") == 3
        hv.invalidate()
        assert all(hv.domain(n).state is DomainState.SHUTOFF for n in clones)
        code, out, err = cli(hv, capsys, "rollback", "--template", tname)
        assert code == 0, err
        hv.invalidate()
        for name in clones:  # the snapshot was of running guests: they run again
            assert hv.domain(name).state is DomainState.RUNNING, name
    finally:
        for name in clones:
            stop(hv, name)


@pytest.mark.parametrize("kind", ["internal", "external"])
def test_group_snapshot_failing_on_one_clone_deletes_the_others(lab: SystemLab, kind: str) -> None:
    hv = lab.hv
    tname, clones = three_clones(lab)
    disks_before = {n: disk_paths(hv, n) for n in clones}
    members = groups.select({hv.uri: hv.domains()}, template=tname)
    external = kind == "external"
    plan = groups.plan_group(resolver([hv]), "snapshot", members, snapshot="pre", external=external)
    # Between the plan and the run, someone takes 'pre' of the last clone (virsh): it fails.
    subprocess.run(
        ["virsh", "-c", hv.uri, "snapshot-create-as", clones[2], "pre"],
        check=True,
        capture_output=True,
    )
    with pytest.raises(OperationError) as info:
        plan.run(hv, lambda *_: None)
    message = str(info.value)
    assert f"failed on '{clones[2]}'" in message, message
    assert f"deleted it again on {clones[0]}, {clones[1]}" in message, message
    hv.invalidate()
    for name in clones[:2]:
        assert snapshot_names(hv, name) == [], name
        assert disk_paths(hv, name) == disks_before[name]  # back on its own image
        leftover = list(lab.dir.rglob(f"{name}.pre.*"))
        assert leftover == [], leftover
    assert snapshot_names(hv, clones[2]) == ["pre"]  # someone else's: kept


def test_group_plan_refuses_a_clone_it_cannot_snapshot_before_any_change(
    lab: SystemLab, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = lab.hv
    a = lab.define("a")
    net = lab.name("net")
    xml = hv.conn.lookupByName(a).XMLDesc(0)
    hv.conn.defineXML(
        xml.replace(f"<name>{a}</name>", f"<name>{net}</name>")
        .replace("<uuid>", "<!--")
        .replace("</uuid>", "-->")
        .replace(
            "<disk type='file' device='disk'>",
            "<disk type='network' device='disk'>",
        )
        .replace(
            f"<source file='{hv.domain(a).disks[0].path}'/>",
            "<source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/></source>",
        )
    )
    hv.invalidate()
    assert hv.domain(net).disks[0].kind.value == "network"
    code, _, err = cli(hv, capsys, "snapshot", "create", "s", "--domain", a, "--domain", net)
    assert code == 1
    assert "nothing was changed" in err and "virtdeck: plan:" not in err
    assert snapshot_names(hv, a) == []
    with pytest.raises(InvalidInputError):
        groups.plan_group(
            resolver([hv]),
            "snapshot",
            [groups.Member(hv.uri, a), groups.Member(hv.uri, net)],
            snapshot="s",
        )
    assert S.snapshot_tree(hv, a).names == ()


def test_group_dry_run_changes_nothing(lab: SystemLab, capsys: pytest.CaptureFixture[str]) -> None:
    hv = lab.hv
    tname, clones = three_clones(lab)
    S.create(hv, S.plan_create(hv, clones[0], "s0"))

    def world() -> list[object]:
        hv.invalidate()
        return [(n, hv.domain(n).state, disk_paths(hv, n), snapshot_names(hv, n)) for n in clones]

    before = world()
    files = sorted(str(p) for p in lab.dir.rglob("*"))
    for argv in (
        ["snapshot", "create", "s1", "--template", tname],
        ["rollback", clones[0]],
        ["start", "--template", tname],
        ["rm", "--template", tname, "--storage"],
    ):
        code, _, err = cli(hv, capsys, *argv, "--dry-run")
        assert code == 0, (argv, err)
        # one NAME is the single-domain plan; a selection lists each member
        assert err.count("virtdeck: plan: - ") == (0 if argv[0] == "rollback" else 3), err
        assert world() == before, argv
    assert sorted(str(p) for p in lab.dir.rglob("*")) == files
