"""Templates, clones and removal against libvirt's test driver, with real qcow2 files.

The test driver keeps definitions in memory, but the images here are real (made with qemu-img
in tmp_path), so overlays, copies, backing chains and file cleanup are checked for real. Fast:
no guest runs and virt-sysprep only lists its operations.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tui.cli import main
from tui.core import domxml, templates
from tui.core.clones import execute_clone, execute_remove, plan_clone, plan_remove
from tui.core.errors import (
    DependencyError,
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
)
from tui.core.hypervisor import Hypervisor
from tui.core.identity import Identity
from tui.core.models import DomainState, VirtdeckMeta
from tui.core.storage.local import LocalFiles
from tui.core.storage.qemuimg import QemuImg, run_subprocess
from tui.core.templates import (
    Sysprep,
    execute_template,
    list_templates,
    plan_template,
    run_streaming,
)
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml


def qemu_info(path: str) -> dict:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def make_image(path: Path, size: str = "16M", data: bool = False) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if data:  # some allocated clusters, so a full copy has something to copy
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 2M", str(path)],
            check=True, capture_output=True,
        )  # fmt: skip
    return str(path)


class Lab:
    """A test-driver hypervisor whose domains have real images in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.images.mkdir()
        self.backups = root / "backups"
        web = make_image(self.images / "web.qcow2")
        self.base = make_image(self.images / "base.qcow2", data=True)
        self.unsealed_base = make_image(self.images / "raw-base.qcow2")
        self.paused_disk = make_image(self.images / "paused.qcow2")
        specs = [
            DomainSpec("web", "running", disks=(DiskSpec(web),), macs=("52:54:00:00:00:01",)),
            DomainSpec("stopped", "paused", disks=(DiskSpec(self.paused_disk),)),
            DomainSpec(
                "template-base",
                disks=(DiskSpec(self.base),),
                macs=("52:54:00:00:00:02",),
                meta=VirtdeckMeta(
                    role="template",
                    sealed=True,
                    operations=("machine-id",),
                    source="base",
                    created="2026-01-01T00:00:00+00:00",
                ),
            ),  # fmt: skip
            DomainSpec(
                "template-unsealed",
                disks=(DiskSpec(self.unsealed_base),),
                meta=VirtdeckMeta(role="template", sealed=False),
            ),
        ]
        node = root / "node.xml"
        node.write_text(node_xml(specs))
        self.uri = f"test://{node}"
        self.hv = Hypervisor.open(self.uri)

    def files(self) -> set[str]:
        return {p.name for p in self.images.iterdir()}


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(templates, "_kvm_boots", {})  # each test probes afresh
    lab = Lab(tmp_path)
    yield lab
    lab.hv.close()


def failing_qemu(when: str, nth: int = 1, exc: type[BaseException] | None = None) -> QemuImg:
    """Real qemu-img, except the nth call whose argv contains `when`: it fails (or raises `exc`
    right after the real command ran, like an interrupt arriving mid-way)."""
    seen = 0

    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        nonlocal seen
        if when in argv:
            seen += 1
            if seen == nth:
                if exc is not None:
                    run_subprocess(argv)
                    raise exc()
                return subprocess.CompletedProcess(list(argv), 1, "", "No space left on device")
        return run_subprocess(argv)

    return QemuImg(runner=runner)


def names(hv: Hypervisor) -> set[str]:
    return {d.name for d in hv.domains()}


# -- making a template -------------------------------------------------------------------------


def test_template_without_seal_renames_records_backs_up_and_protects(lab: Lab) -> None:
    web_disk = str(lab.images / "web.qcow2")
    plan = plan_template(lab.hv, "web", seal=False, backup_dir=lab.backups)
    assert plan.name == "template-web"
    assert plan.needs_shutdown
    assert any("rename 'web' to 'template-web'" in line for line in plan.summary())
    assert not lab.backups.exists()  # planning wrote nothing
    steps: list[str] = []
    t = execute_template(lab.hv, plan, lambda m, f: steps.append(m))
    assert "web" not in names(lab.hv)
    info = lab.hv.domain("template-web")
    assert info.state is DomainState.SHUTOFF
    assert info.is_template and info.meta.source == "web" and not info.meta.sealed
    assert info.meta.created and info.meta.xml_backup == str(lab.backups / "template-web.xml")
    assert stat.S_IMODE(os.stat(lab.backups / "template-web.xml").st_mode) == 0o600
    backup = domxml.parse((lab.backups / "template-web.xml").read_text())
    assert backup.findtext("name") == "template-web"
    assert domxml.read_meta(backup).role == "template"
    assert stat.S_IMODE(os.stat(web_disk).st_mode) == 0o444
    assert t.defined and t.base_images[0].path == web_disk and t.base_images[0].read_only
    assert any("shutting" in s for s in steps)
    with pytest.raises(StateError, match="is a template"):
        lab.hv.start("template-web")


def test_undefined_template_is_still_listed_and_deployable(lab: Lab) -> None:
    plan = plan_template(lab.hv, "web", name="tpl", seal=False, backup_dir=lab.backups,
                         undefine=True)  # fmt: skip
    t = execute_template(lab.hv, plan)
    assert not t.defined and "tpl" not in names(lab.hv)
    listed = {x.name: x for x in list_templates(lab.hv, lab.backups)}
    assert not listed["tpl"].defined
    assert listed["tpl"].xml_backup == str(lab.backups / "tpl.xml")
    cplan = plan_clone(lab.hv, "tpl", "w1", allow_unsealed=True, backup_dir=lab.backups)
    assert not cplan.template_defined
    execute_clone(lab.hv, cplan)
    listed = {x.name: x for x in list_templates(lab.hv, lab.backups)}
    assert listed["tpl"].thin_clones == ("w1",)
    # The undefined template still protects its base.
    with pytest.raises(DependencyError, match="w1"):
        plan_remove(lab.hv, "tpl", storage=True, backup_dir=lab.backups)


def test_template_plan_refusals(lab: Lab) -> None:
    with pytest.raises(StateError, match="already a template"):
        plan_template(lab.hv, "template-base", backup_dir=lab.backups)
    with pytest.raises(InvalidInputError, match="already exists"):
        plan_template(lab.hv, "web", name="stopped", seal=False, backup_dir=lab.backups)
    with pytest.raises(InvalidInputError, match="invalid name"):
        plan_template(lab.hv, "web", name="bad name", seal=False, backup_dir=lab.backups)
    with pytest.raises(NotFoundError):
        plan_template(lab.hv, "nosuch", backup_dir=lab.backups)
    with pytest.raises(InvalidInputError, match="unknown virt-sysprep operation.*frobnicate"):
        plan_template(lab.hv, "web", operations=["machine-id", "frobnicate"],
                      backup_dir=lab.backups)  # fmt: skip
    with pytest.raises(InvalidInputError, match="--operations"):
        plan_template(lab.hv, "web", seal=False, operations=["machine-id"],
                      backup_dir=lab.backups)  # fmt: skip
    with pytest.raises(StateError, match="paused.*--force"):
        plan_template(lab.hv, "stopped", seal=False, backup_dir=lab.backups)
    lab.backups.mkdir()
    (lab.backups / "template-web.xml").write_text("<domain/>")
    with pytest.raises(InvalidInputError, match="already exists"):
        plan_template(lab.hv, "web", seal=False, backup_dir=lab.backups)
    blocker = lab.root / "afile"
    blocker.write_text("")
    with pytest.raises(InvalidInputError, match="not a writable directory"):
        plan_template(lab.hv, "web", seal=False, backup_dir=blocker / "sub")
    assert names(lab.hv) >= {"web", "stopped"}


def test_plan_lists_chosen_or_default_operations(lab: Lab) -> None:
    plan = plan_template(lab.hv, "web", operations=["ssh-hostkeys", "machine-id"],
                         backup_dir=lab.backups)  # fmt: skip
    assert plan.operations == ("ssh-hostkeys", "machine-id") and plan.chosen_operations
    default = plan_template(lab.hv, "web", backup_dir=lab.backups)
    assert "machine-id" in default.operations and "user-account" not in default.operations
    assert not default.chosen_operations


def test_failed_sysprep_changes_nothing_but_the_power_state(lab: Lab) -> None:
    web_disk = str(lab.images / "web.qcow2")
    mode = os.stat(web_disk).st_mode

    def runner(argv: Sequence[str], on_line: object) -> int:
        if "--list-operations" in argv:
            return run_streaming(argv, on_line)  # type: ignore[arg-type]
        on_line("virt-sysprep: error: no operating systems were found")  # type: ignore[operator]
        return 1

    sysprep = Sysprep(runner)
    plan = plan_template(lab.hv, "web", backup_dir=lab.backups, sysprep=sysprep)
    lines: list[str] = []
    with pytest.raises(OperationError, match="virt-sysprep failed.*no operating systems"):
        execute_template(lab.hv, plan, lambda m, f: lines.append(m), sysprep=sysprep)
    assert any("no operating systems" in line for line in lines)  # streamed to progress
    info = lab.hv.domain("web")
    assert info.meta.role is None and info.state is DomainState.SHUTOFF
    assert os.stat(web_disk).st_mode == mode
    assert not (lab.backups / "template-web.xml").exists()


def test_appliance_launch_failure_is_retried_once_under_tcg(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LIBGUESTFS_BACKEND_SETTINGS", raising=False)
    calls: list[list[str]] = []

    def runner(argv: Sequence[str], on_line: object) -> int:
        if "--list-operations" in argv:
            return run_streaming(argv, on_line)  # type: ignore[arg-type]
        if argv[0] == "timeout":
            return 0  # the probe's appliance booted under KVM
        calls.append(list(argv))
        if argv[0] == "env":
            return 0  # the TCG run seals
        on_line("virt-sysprep: error: libguestfs error: guestfs_launch failed.")  # type: ignore[operator]
        on_line("If reporting bugs, run virt-sysprep with debugging enabled")  # type: ignore[operator]
        return 1

    sysprep = Sysprep(runner)
    plan = plan_template(lab.hv, "web", backup_dir=lab.backups, sysprep=sysprep)
    lines: list[str] = []
    execute_template(lab.hv, plan, lambda m, f: lines.append(m), sysprep=sysprep)
    # the KVM attempt's error block is not shown: the retry under TCG worked
    assert not any("guestfs_launch failed" in x or "reporting bugs" in x for x in lines)
    assert len(calls) == 2
    assert calls[1][:3] == [
        "env",
        "LIBGUESTFS_BACKEND=direct",
        "LIBGUESTFS_BACKEND_SETTINGS=force_tcg",
    ]
    assert calls[1][3:] == calls[0]
    assert any("retrying with TCG" in line for line in lines)
    assert lab.hv.domain("template-web").is_template


@pytest.mark.parametrize("probe_status", [124, 1])
def test_an_appliance_that_does_not_boot_under_kvm_in_time_means_tcg_from_the_start(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, probe_status: int
) -> None:
    """Under nested KVM the appliance can hang (vCPU spinning) for libguestfs' 20 minute
    launch timeout: a probe with a deadline decides, once per host, and the tool runs under
    TCG straight away."""
    monkeypatch.delenv("LIBGUESTFS_BACKEND_SETTINGS", raising=False)
    calls: list[list[str]] = []

    def runner(argv: Sequence[str], on_line: object) -> int:
        if "--list-operations" in argv:
            return run_streaming(argv, on_line)  # type: ignore[arg-type]
        calls.append(list(argv))
        if argv[0] == "timeout":
            return probe_status  # killed at the deadline, or failed
        return 0 if argv[0] == "env" else 1

    lines: list[str] = []
    host = "qemu+ssh://kvm9/system"
    sysprep = Sysprep(runner, remote=True, host=host)
    plan = plan_template(lab.hv, "web", backup_dir=lab.backups, sysprep=sysprep)
    execute_template(lab.hv, plan, lambda m, f: lines.append(m), sysprep=sysprep)
    assert lab.hv.domain("template-web").is_template
    status, _ = templates.run_guestfs(
        runner, ["virt-customize", "-a", "x"], progress=lambda m, f: lines.append(m),
        label="again", remote=True, where=host,
    )  # fmt: skip
    assert status == 0
    probes = [c for c in calls if c[0] == "timeout"]
    assert probes == [list(templates._PROBE)]  # once for the host, not once per tool run
    assert probes[0][-3:] == ["-a", "/dev/null", "run"] and "guestfish" in probes[0]
    runs = [c for c in calls if c[0] != "timeout"]
    assert len(runs) == 2 and all(c[:3] == list(templates._TCG_ENV) for c in runs)
    assert sum("did not start under KVM within" in line for line in lines) == 2


def test_appliance_failure_under_forced_tcg_is_not_retried(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    calls: list[list[str]] = []

    def runner(argv: Sequence[str], on_line: object) -> int:
        if "--list-operations" in argv:
            return run_streaming(argv, on_line)  # type: ignore[arg-type]
        calls.append(list(argv))
        on_line("virt-sysprep: error: libguestfs error: guestfs_launch failed.")  # type: ignore[operator]
        return 1

    sysprep = Sysprep(runner)
    plan = plan_template(lab.hv, "web", backup_dir=lab.backups, sysprep=sysprep)
    lines: list[str] = []
    with pytest.raises(OperationError, match="guestfs_launch failed"):
        execute_template(lab.hv, plan, lambda m, f: lines.append(m), sysprep=sysprep)
    assert len(calls) == 1
    assert any("guestfs_launch failed" in x for x in lines)  # no retry: the error is shown
    assert not lab.hv.domain("web").is_template


def test_failure_after_rename_restores_name_metadata_and_modes(lab: Lab) -> None:
    web_disk = str(lab.images / "web.qcow2")
    mode = os.stat(web_disk).st_mode
    plan = plan_template(lab.hv, "web", seal=False, backup_dir=lab.backups / "sub")
    lab.backups.write_text("now a file")  # the backup directory cannot be made any more
    with pytest.raises(OperationError, match="cannot write the XML backup"):
        execute_template(lab.hv, plan)
    assert "web" in names(lab.hv) and "template-web" not in names(lab.hv)
    assert lab.hv.domain("web").meta.role is None
    assert os.stat(web_disk).st_mode == mode


# -- clones ------------------------------------------------------------------------------------


def test_clone_plan_names_files_identities_and_xml(lab: Lab) -> None:
    plan = plan_clone(lab.hv, "template-base", "www", count=3)
    assert plan.names == ("www-1", "www-2", "www-3")
    assert plan.files == tuple(str(lab.images / f"www-{i}.qcow2") for i in (1, 2, 3))
    uuids = {i.uuid for i in plan.items}
    macs = {m for i in plan.items for m in i.macs}
    assert len(uuids) == 3 and len(macs) == 3 and "52:54:00:00:00:02" not in macs
    root = domxml.parse(plan.items[0].xml)
    assert root.findtext("name") == "www-1" and root.findtext("uuid") == plan.items[0].uuid
    assert domxml.disks(root)[0].path == str(lab.images / "www-1.qcow2")
    meta = domxml.read_meta(root)
    assert (meta.role, meta.source, meta.mode) == ("clone", "template-base", "thin")
    assert plan.bytes_free and 0 < plan.bytes_needed < plan.bytes_free
    assert not any(p.startswith("www") for p in lab.files())  # nothing written
    assert "www-1" not in names(lab.hv)


def test_clone_plan_refusals(lab: Lab) -> None:
    with pytest.raises(InvalidInputError, match="invalid name"):
        plan_clone(lab.hv, "template-base", "-bad")
    with pytest.raises(InvalidInputError, match="'web' already exists"):
        plan_clone(lab.hv, "template-base", "web")
    with pytest.raises(InvalidInputError, match="--count"):
        plan_clone(lab.hv, "template-base", "x", count=0)
    with pytest.raises(NotFoundError, match="no template named 'nosuch'"):
        plan_clone(lab.hv, "nosuch", "x")
    with pytest.raises(InvalidInputError, match="not a template"):
        plan_clone(lab.hv, "web", "x")
    with pytest.raises(StateError, match="not sealed.*--allow-unsealed"):
        plan_clone(lab.hv, "template-unsealed", "x")
    (lab.images / "x-2.qcow2").write_text("someone else's file")
    with pytest.raises(InvalidInputError, match="x-2.qcow2 already exists"):
        plan_clone(lab.hv, "template-base", "x", count=2)
    with pytest.raises(InvalidInputError, match="not a directory"):
        plan_clone(lab.hv, "template-base", "y", directory=str(lab.root / "nope"))
    assert (lab.images / "x-2.qcow2").read_text() == "someone else's file"
    plan = plan_clone(lab.hv, "template-unsealed", "x", allow_unsealed=True)
    assert any("not sealed" in line for line in plan.summary())


def test_thin_clones_are_overlays_with_absolute_backing_and_format(lab: Lab) -> None:
    plan = plan_clone(lab.hv, "template-base", "thin", count=2, directory=str(lab.root))
    assert execute_clone(lab.hv, plan) == ["thin-1", "thin-2"]
    for name in ("thin-1", "thin-2"):
        info = qemu_info(str(lab.root / f"{name}.qcow2"))
        assert info["backing-filename"] == lab.base
        assert info["backing-filename-format"] == "qcow2"
        dom = lab.hv.domain(name)
        assert (dom.meta.role, dom.meta.source, dom.meta.mode) == ("clone", "template-base", "thin")
    t = {x.name: x for x in list_templates(lab.hv, lab.backups)}["template-base"]
    assert t.thin_clones == ("thin-1", "thin-2") and t.full_clones == ()
    assert t.sealed_operations == ("machine-id",)


def test_full_clone_is_an_independent_sparse_copy(lab: Lab) -> None:
    steps: list[float | None] = []
    plan = plan_clone(lab.hv, "template-base", "solo", full=True)
    assert plan.bytes_needed >= 2 * 1024 * 1024  # the allocated data, not the 16M virtual size
    execute_clone(lab.hv, plan, lambda m, f: steps.append(f))
    info = qemu_info(str(lab.images / "solo.qcow2"))
    assert "backing-filename" not in info and info["virtual-size"] == 16 * 1024**2
    assert info["actual-size"] < 8 * 1024**2  # sparse stays sparse
    assert steps[-1] == 1.0
    t = {x.name: x for x in list_templates(lab.hv, lab.backups)}["template-base"]
    assert t.full_clones == ("solo",) and t.thin_clones == ()


@pytest.mark.parametrize("full", [False, True])
def test_qemu_img_failure_on_the_second_clone_leaves_nothing(lab: Lab, full: bool) -> None:
    before = lab.files()
    plan = plan_clone(lab.hv, "template-base", "f", count=3, full=full)
    qemu = failing_qemu("convert" if full else "create", nth=2)
    with pytest.raises(OperationError, match="No space left on device"):
        execute_clone(lab.hv, plan, qemu=qemu)
    assert lab.files() == before
    assert not names(lab.hv) & set(plan.names)


def test_interrupt_leaves_nothing_and_propagates(lab: Lab) -> None:
    before = lab.files()
    plan = plan_clone(lab.hv, "template-base", "k", count=2)
    with pytest.raises(KeyboardInterrupt):
        execute_clone(lab.hv, plan, qemu=failing_qemu("create", nth=2, exc=KeyboardInterrupt))
    assert lab.files() == before
    assert not names(lab.hv) & set(plan.names)


def test_define_failure_leaves_nothing(lab: Lab) -> None:
    before = lab.files()
    plan = plan_clone(lab.hv, "template-base", "d", count=3)
    # Another client takes d-3's UUID between the plan and its execution: that define fails.
    other = plan.items[2].xml.replace("<name>d-3</name>", "<name>d-other</name>")
    lab.hv.conn.defineXML(other)
    with pytest.raises(OperationError, match="defining clone 'd-3' failed"):
        execute_clone(lab.hv, plan)
    assert lab.files() == before
    assert not names(lab.hv) & {"d-1", "d-2", "d-3"}
    assert "d-other" in names(lab.hv)


# -- removal -----------------------------------------------------------------------------------


def test_removal_protects_bases_and_deletes_only_own_files(lab: Lab) -> None:
    execute_clone(lab.hv, plan_clone(lab.hv, "template-base", "c", count=2))
    with pytest.raises(DependencyError, match=r"template 'template-base'.*c-1, c-2"):
        plan_remove(lab.hv, "template-base", storage=True, backup_dir=lab.backups)
    plan = plan_remove(lab.hv, "c-1", storage=True, backup_dir=lab.backups)
    assert plan.delete_files == (str(lab.images / "c-1.qcow2"),)
    assert plan.kept_files == (lab.base,)
    execute_remove(lab.hv, plan, backup_dir=lab.backups)
    assert "c-1" not in names(lab.hv) and "c-1.qcow2" not in lab.files()
    assert os.path.exists(lab.base)
    # Without storage the clone's overlay stays.
    execute_remove(lab.hv, plan_remove(lab.hv, "c-2", backup_dir=lab.backups))
    assert "c-2.qcow2" in lab.files()
    os.unlink(lab.images / "c-2.qcow2")
    plan = plan_remove(lab.hv, "template-base", storage=True, backup_dir=lab.backups)
    execute_remove(lab.hv, plan, backup_dir=lab.backups)
    assert "base.qcow2" not in lab.files() and "template-base" not in names(lab.hv)


def test_removal_refuses_a_running_domain_and_a_base_of_a_hand_made_overlay(lab: Lab) -> None:
    with pytest.raises(StateError, match="running; shut it down"):
        plan_remove(lab.hv, "web")
    lab.hv.destroy("web")
    overlay = lab.images / "by-hand.qcow2"
    web_disk = str(lab.images / "web.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", web_disk,
                    str(overlay)], check=True)  # fmt: skip
    xml = lab.hv.xml("stopped", inactive=True).replace(lab.paused_disk, str(overlay))
    lab.hv.conn.defineXML(xml)
    with pytest.raises(DependencyError, match="domain 'web'.*stopped"):
        plan_remove(lab.hv, "web", storage=True)
    with pytest.raises(NotFoundError):
        plan_remove(lab.hv, "nosuch")


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_template_ls_json(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", lab.uri, "template", "ls", "--json"]) == 0
    data = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert set(data) == {"template-base", "template-unsealed"}
    t = data["template-base"]
    assert t["defined"] is True and t["sealed_operations"] == ["machine-id"]
    assert t["base_images"][0]["path"] == lab.base
    assert t["thin_clones"] == [] and t["full_clones"] == []


def test_cli_clone_prints_plan_and_progress(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", lab.uri, "clone", "template-base", "cli", "--count", "2", "--full"]) == 0
    out = capsys.readouterr()
    assert "cli-1: full clone of template-base" in out.out
    assert "virtdeck: plan: cli-1" in out.err and "100.0%" in out.err
    assert {"cli-1.qcow2", "cli-2.qcow2"} <= lab.files()


def test_cli_errors_are_one_line_exit_1(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["clone", "template-unsealed", "x"],
        ["clone", "nosuch", "x"],
        ["rm", "web"],
        ["template", "create", "template-base"],
    ):
        assert main(["-c", lab.uri, *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("virtdeck: ") and err.count("\n") == 1, err


def test_cli_template_create_and_rm(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    backups = str(lab.backups)
    argv = ["-c", lab.uri, "template", "create", "web", "--no-seal", "--undefine",
            "--backup-dir", backups]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "template-web: template made from web (undefined" in out.out
    assert "virtdeck: shutting 'web' down" in out.err
    assert (lab.backups / "template-web.xml").exists()
    # A fresh test-driver connection has forgotten all that: 'web' is defined again and uses
    # the very image the (real) backup names, so removing the template is refused.
    assert main(["-c", lab.uri, "rm", "template-web", "--backup-dir", backups]) == 1
    err = capsys.readouterr().err
    assert "cannot be removed" in err and "web" in err
    assert (lab.backups / "template-web.xml").exists()


def test_create_records_how_clones_get_their_identity(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """`template create --identity cloud-init`: the operator says the guest runs cloud-init;
    the plan says it is recorded, the metadata carries it, and its clones get seeds by
    default (as for an imported cloud image)."""
    backups = str(lab.backups)
    base = ["-c", lab.uri, "template", "create", "web", "--no-seal", "--backup-dir", backups]
    assert main([*base, "--identity", "cloud-init", "--dry-run"]) == 0
    assert "clones get their identity from a cloud-init seed each" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--identity", "sysprep"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match="cloud-init' or 'virt-customize"):
        plan_template(lab.hv, "web", seal=False, backup_dir=lab.backups, identity="x")
    plan = plan_template(lab.hv, "web", seal=False, backup_dir=lab.backups, identity="cloud-init")
    execute_template(lab.hv, plan)
    assert lab.hv.domain("template-web").meta.identity == "cloud-init"
    auto = Identity.from_options(method=None)  # what the CLI and the deploy form ask for
    clone = plan_clone(lab.hv, "template-web", "c1", allow_unsealed=True, identity=auto)
    assert any("read by cloud-init" in line for line in clone.summary()), clone.summary()
    # its next version (template update, then seal) keeps it
    from tui.core import versions

    edit = versions.plan_update(lab.hv, "template-web", backup_dir=lab.backups)
    execute_clone(lab.hv, edit)
    nxt = versions.plan_seal(lab.hv, edit.items[0].name, seal=False, backup_dir=lab.backups)
    assert (nxt.version, nxt.identity) == (2, "cloud-init")
    assert any("cloud-init seed each" in line for line in nxt.summary())


def test_refusals_for_snapshots_running_template_and_remote_host(lab: Lab) -> None:
    dom = lab.hv.conn.lookupByName("web")
    dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    # A template's base must never change under its clones: reverting or deleting a snapshot
    # would write it (issue 17), whatever its name.
    for name in (None, "web"):
        with pytest.raises(DependencyError, match=r"has snapshots \(s1\)"):
            plan_template(lab.hv, "web", name=name, seal=False, backup_dir=lab.backups)
    lab.hv.conn.lookupByName("template-base").create()  # started behind virtdeck's back
    lab.hv.invalidate()
    with pytest.raises(StateError, match="template 'template-base' is running"):
        plan_clone(lab.hv, "template-base", "x")
    # Another host without SSH (TLS): what needs the images' facts is refused with the reason.
    remote = Hypervisor("qemu+tls://far.example/system", lab.hv.conn)
    for call in (
        lambda: plan_template(remote, "web", name="web", seal=False, backup_dir=lab.backups),
        lambda: plan_clone(remote, "template-unsealed", "x", allow_unsealed=True),
    ):
        with pytest.raises(NotFoundError, match="far.example/system is another host"):
            call()
    for storage in (True, False):
        with pytest.raises(OperationError, match="cannot tell which domains on qemu\\+tls://far"):
            plan_remove(remote, "template-unsealed", storage=storage)


# -- per-domain resources of a clone (tui.core.clonexml) ----------------------------------------

NVRAM_MARKER = b"virtdeck-boot-entry\0" * 16


def uefi_template(lab: Lab, *, undefined: bool = False) -> tuple[str, Path]:
    """A template whose XML has a serial log, a unix channel socket, UEFI with an NVRAM file
    holding a marker, a VNC port and a TPM emulator; returns (name, its NVRAM file).
    `undefined`: only its XML backup exists (what a fresh test-driver connection sees)."""
    disk = make_image(lab.images / "efi.qcow2")
    nvram = lab.root / "nvram" / "efi_VARS.fd"
    nvram.parent.mkdir()
    nvram.write_bytes(NVRAM_MARKER + b"\xff" * 4096)
    root = domxml.parse(
        f"""<domain type='test'><name>template-efi</name><memory unit='MiB'>128</memory>
        <os><type>hvm</type>
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
        <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram></os>
        <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
        <interface type='network'><mac address='52:54:00:00:00:09'/>
        <source network='default'/></interface>
        <serial type='pty'><log file='{lab.root}/efi-serial.log'/><target port='0'/></serial>
        <channel type='unix'><source mode='bind' path='{lab.root}/efi.agent'/>
        <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        <graphics type='vnc' port='5977' autoport='no' listen='127.0.0.1'/>
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
        </devices></domain>"""
    )
    domxml.write_meta(root, VirtdeckMeta(role="template", sealed=True, source="efi"))
    if undefined:
        lab.backups.mkdir(exist_ok=True)
        (lab.backups / "template-efi.xml").write_text(domxml.to_string(root))
    else:
        lab.hv.conn.defineXML(domxml.to_string(root))
    return "template-efi", nvram


def test_uefi_clones_get_own_nvram_copy_log_socket_and_port(lab: Lab) -> None:
    tname, nvram = uefi_template(lab)
    template_bytes = nvram.read_bytes()
    plan = plan_clone(lab.hv, tname, "efi", count=2)
    copies = [str(lab.root / "nvram" / f"efi-{i}_VARS.fd") for i in (1, 2)]
    assert [c.destination for c in plan.copies] == copies
    assert all(c.source == str(nvram) and c.bytes == len(template_bytes) for c in plan.copies)
    thin_only = sum(d.bytes_needed for i in plan.items for d in i.disks)
    assert plan.bytes_needed == thin_only + 2 * len(template_bytes)
    lines = plan.summary()
    assert f"  os nvram: copy of {nvram} -> {copies[0]}" in "\n".join(lines)
    assert any(f"efi-serial.log -> {lab.root}/efi-2-serial.log" in line for line in lines)
    assert any("graphics vnc: port 5977 -> autoport" in line for line in lines)
    assert any("fresh TPM state" in line for line in lines)
    assert not any(os.path.exists(c) for c in copies)  # planning wrote nothing
    data = json.loads(json.dumps(plan.to_json()))
    kinds = {(r["element"], r["kind"]) for r in data["items"][0]["rewrites"]}
    assert {("os nvram", "copy"), ("serial 0 log", "unique")} <= kinds
    assert data["items"][1]["copies"][0]["destination"] == copies[1]

    execute_clone(lab.hv, plan)
    for name, copy in zip(("efi-1", "efi-2"), copies, strict=True):
        assert Path(copy).read_bytes() == template_bytes
        assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
        root = domxml.parse(lab.hv.xml(name, inactive=True))
        assert root.findtext("os/nvram") == copy
        assert root.find("devices/serial/log").get("file") == f"{lab.root}/{name}-serial.log"
        assert root.find("devices/channel/source").get("path") == f"{lab.root}/{name}.agent"
        assert root.find("devices/graphics").get("autoport") == "yes"
    assert nvram.read_bytes() == template_bytes
    template_root = domxml.parse(lab.hv.xml(tname, inactive=True))
    assert template_root.findtext("os/nvram") == str(nvram)


def test_failure_half_way_removes_the_nvram_copies_too(lab: Lab) -> None:
    tname, nvram = uefi_template(lab)
    template_bytes = nvram.read_bytes()
    plan = plan_clone(lab.hv, tname, "f", count=3)
    with pytest.raises(OperationError, match="No space left on device"):
        execute_clone(lab.hv, plan, qemu=failing_qemu("create", nth=2))
    assert sorted(p.name for p in nvram.parent.iterdir()) == ["efi_VARS.fd"]
    assert nvram.read_bytes() == template_bytes
    assert not names(lab.hv) & set(plan.names)
    # A file that takes a clone's NVRAM path after the plan is neither overwritten nor removed.
    plan = plan_clone(lab.hv, tname, "g", count=2)
    theirs = nvram.parent / "g-2_VARS.fd"
    theirs.write_bytes(b"someone else's")
    with pytest.raises(InvalidInputError, match="g-2_VARS.fd already exists"):
        execute_clone(lab.hv, plan)
    with pytest.raises(InvalidInputError, match="g-2_VARS.fd .*already exists"):
        plan_clone(lab.hv, tname, "g", count=2)
    assert theirs.read_bytes() == b"someone else's"
    assert sorted(p.name for p in nvram.parent.iterdir()) == ["efi_VARS.fd", "g-2_VARS.fd"]


def test_missing_template_nvram_gives_fresh_variables(lab: Lab) -> None:
    tname, nvram = uefi_template(lab)
    nvram.unlink()
    plan = plan_clone(lab.hv, tname, "n")
    assert plan.copies == ()
    assert any("fresh variables file" in line and "OVMF_VARS_4M.fd" in line
               for line in plan.summary())  # fmt: skip


def test_cli_clone_dry_run_and_json(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    tname, nvram = uefi_template(lab, undefined=True)
    before = lab.files()
    argv = ["-c", lab.uri, "clone", tname, "dry", "--count", "2", "--dry-run", "--backup-dir",
            str(lab.backups)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == "" and "virtdeck: plan:   os nvram: copy of" in out.err
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] is True and data["clones"] == []
    assert [i["name"] for i in data["plan"]["items"]] == ["dry-1", "dry-2"]
    assert lab.files() == before and not names(lab.hv) & {"dry-1", "dry-2"}
    assert sorted(p.name for p in nvram.parent.iterdir()) == ["efi_VARS.fd"]
    assert (
        main(["-c", lab.uri, "clone", tname, "js", "--json", "--backup-dir", str(lab.backups)]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["clones"] == ["js"] and data["plan"]["items"][0]["copies"]
    assert (nvram.parent / "js_VARS.fd").read_bytes() == nvram.read_bytes()


# -- disk names with control characters (issue 17, case 8a) -----------------------------------


def test_a_disk_whose_name_holds_a_newline_is_refused_and_the_other_file_is_kept(
    lab: Lab,
) -> None:
    """libvirt writes the newline raw in the attribute; read as a space it names another
    file ('-nl dir/-rf x.qcow2'): every operation refuses the disk at planning."""
    from tui.core import snapshots
    from tui.core.models import DiskKind

    (lab.images / "-nl\ndir").mkdir()
    make_image(lab.images / "-nl\ndir" / "-rf x.qcow2")
    (lab.images / "-nl dir").mkdir()
    other = make_image(lab.images / "-nl dir" / "-rf x.qcow2", data=True)
    before = subprocess.run(["sha256sum", other], capture_output=True, text=True).stdout
    lab.hv.conn.defineXML(
        "<domain type='test'><name>nl</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{lab.images}/-nl&#10;dir/-rf x.qcow2'/><target dev='vda'/></disk>"
        "</devices></domain>"
    )
    raw = lab.hv.conn.lookupByName("nl").XMLDesc(0)
    assert "-nl\ndir" in raw  # (what libvirt stores: the newline raw in the attribute)
    disk = lab.hv.domain("nl").disks[0]
    assert disk.kind == DiskKind.UNSAFE and disk.path is None
    assert disk.source == f"{lab.images}/-nl\\ndir/-rf x.qcow2"
    with pytest.raises(InvalidInputError, match="disk vda of 'nl' is a disk whose name holds"):
        plan_template(lab.hv, "nl", seal=False, backup_dir=lab.backups)
    with pytest.raises(InvalidInputError, match="disk vda of 'nl' is a disk whose name holds"):
        plan_remove(lab.hv, "nl", storage=True, backup_dir=lab.backups)
    with pytest.raises(InvalidInputError):
        snapshots.plan_create(lab.hv, "nl", "s1")
    with pytest.raises(InvalidInputError, match="holds a control character"):
        LocalFiles(lab.hv, "test").delete(f"{lab.images}/-nl\ndir/-rf x.qcow2")
    after = subprocess.run(["sha256sum", other], capture_output=True, text=True).stdout
    assert after == before and (lab.images / "-nl\ndir" / "-rf x.qcow2").exists()


def test_a_failed_rm_storage_is_recorded_as_failed_naming_each_file(lab: Lab) -> None:
    """Issue 17, case 8d: the audit record is the operation's result, and names every file
    deleted and the one that could not be."""
    from tui.core import audit

    keep = make_image(lab.images / "gone-a.qcow2")
    swap = make_image(lab.images / "gone-b.qcow2")
    lab.hv.conn.defineXML(
        "<domain type='test'><name>gone</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{keep}'/>"
        "<target dev='vda'/></disk>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{swap}'/>"
        "<target dev='vdb'/></disk></devices></domain>"
    )
    plan = plan_remove(lab.hv, "gone", storage=True, backup_dir=lab.backups)
    os.unlink(swap)
    os.mkdir(swap)  # meanwhile a directory took its name: virtdeck never deletes that
    with pytest.raises(OperationError, match="was undefined, but .* is not a regular file"):
        execute_remove(lab.hv, plan, backup_dir=lab.backups)
    record = audit.read()[0][-1]
    assert record.operation == "removing 'gone'" and record.result == "failed"
    assert f"deleted {keep}" in record.steps and f"failed: deleting {swap}" in record.steps
    assert "is not a regular file" in record.error
    assert not os.path.exists(keep) and os.path.isdir(swap)


def test_rm_storage_of_a_symlinked_disk_deletes_the_link_only_and_says_so(
    lab: Lab, tmp_path: Path
) -> None:
    (tmp_path / "outside").mkdir()
    real = make_image(tmp_path / "outside" / "real.qcow2", data=True)
    link = lab.images / "linked.qcow2"
    link.symlink_to(real)
    lab.hv.conn.defineXML(
        "<domain type='test'><name>ln</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{link}'/><target dev='vda'/></disk></devices></domain>"
    )
    plan = plan_remove(lab.hv, "ln", storage=True, backup_dir=lab.backups)
    assert plan.delete_files == (str(link),)
    assert (
        f"keep {real} (what the symbolic link {link} points to: only the link is deleted)"
        in plan.summary()
    )
    before = Path(real).read_bytes()
    assert execute_remove(lab.hv, plan, backup_dir=lab.backups) == [str(link)]
    assert not os.path.lexists(link) and Path(real).read_bytes() == before


def test_a_fifo_or_a_huge_file_in_the_backup_directory_is_skipped_unread(lab: Lab) -> None:
    from tui.core.catalog import backup_templates

    lab.backups.mkdir()
    os.mkfifo(lab.backups / "fifo.xml")  # reading it would block for ever
    with open(lab.backups / "huge.xml", "wb") as fh:
        fh.truncate(3 * 1024**3)
    plan = plan_template(lab.hv, "web", seal=False, backup_dir=lab.backups)
    execute_template(lab.hv, plan)
    assert [b.name for b in backup_templates(lab.backups)] == ["template-web"]
