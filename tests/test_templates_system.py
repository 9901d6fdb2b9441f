"""Templates and clones on the real libvirt daemons (the host's and the other release's) with
real images.

The guest disk is built here: an ext4 filesystem (mkfs.ext4 -d) holding what libguestfs'
inspection needs to call it a Linux root (/etc with hosts and fstab, /bin, /etc/os-release)
plus what sealing must remove (SSH host keys, machine-id, a shell history). It does not boot
an OS, but a domain on it starts (SeaBIOS finds no bootloader and waits), which is what "the
thin clone starts" checks: QEMU opened the overlay and its read-only backing file.

Everything is named with the lab prefix and removed by the `lab` fixture, even on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.lab import SystemLab, qemu_img
from tui.cli import main
from tui.core.clones import execute_clone, execute_remove, plan_clone, plan_remove
from tui.core.errors import DependencyError, InvalidInputError, OperationError, StateError
from tui.core.models import DomainState
from tui.core.storage.qemuimg import QemuImg, run_subprocess
from tui.core.templates import execute_template, list_templates, plan_template

pytestmark = pytest.mark.system

GUEST_FILES = {
    "etc/os-release": 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n'
    'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
    "etc/debian_version": "12.0\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/fstab": "/dev/sda / ext4 defaults 0 1\n",
    "etc/hostname": "web01\n",
    "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
    "etc/ssh/ssh_host_ed25519_key": "not really a key\n",
    "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA web01\n",
    "etc/udev/rules.d/70-persistent-net.rules": 'SUBSYSTEM=="net", NAME="eth0"\n',
    "root/.bash_history": "mysql -uroot -psecret\n",
}


def guest_disk(lab: SystemLab, filename: str, tmp: Path) -> str:
    """A 64 MiB qcow2 holding a tiny Linux root filesystem (no partition table)."""
    tree = tmp / f"tree-{filename}"
    for rel, text in GUEST_FILES.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    for d in ("bin", "sbin", "usr/bin", "tmp", "var/log"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    raw = tmp / f"{filename}.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * 1024**2)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True)
    path = str(lab.dir / filename)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), path], check=True)
    raw.unlink()
    return path


def guestfish(image: str, commands: Sequence[str]) -> list[str]:
    """Run read-only guestfish commands against an inspected image; one output line each."""
    proc = subprocess.run(
        ["guestfish", "--ro", "--format=qcow2", "-a", image, "-i"],
        input="\n".join(commands) + "\n", capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line for line in proc.stdout.splitlines() if line]


def qemu_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out)


def lab_domains(lab: SystemLab) -> set[str]:
    return {d.name() for d in lab.hv.conn.listAllDomains(0) if d.name().startswith(lab.prefix)}


def lab_files(lab: SystemLab) -> set[str]:
    return {p.name for p in lab.dir.iterdir()}


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def unsealed_template(lab: SystemLab, tmp: Path, suffix: str = "vm") -> tuple[str, str]:
    """A lab VM made into an unsealed template (no virt-sysprep: fast); (name, base image)."""
    disk = guest_disk(lab, f"{suffix}.qcow2", tmp)
    vm = lab.define(suffix, disks=[(disk, "qcow2")])
    plan = plan_template(
        lab.hv, vm, name=lab.name(f"t{suffix}"), seal=False, backup_dir=lab.dir / "backups"
    )
    t = execute_template(lab.hv, plan)
    return t.name, disk


# -- sealing (virt-sysprep, about 30 s each under TCG) -----------------------------------------


@pytest.mark.sysprep
def test_seal_chosen_operations_then_thin_and_full_clones(lab: SystemLab, tmp_path: Path) -> None:
    disk = guest_disk(lab, "web.qcow2", tmp_path)
    vm = lab.define("web", disks=[(disk, "qcow2")], macs=("52:54:00:1a:2b:3c",))
    lab.hv.start(vm)  # the guest has no OS: it ignores ACPI, so --force is what turns it off
    plan = plan_template(
        lab.hv, vm, name=lab.name("tweb"),
        operations=["ssh-hostkeys", "machine-id", "bash-history"],
        backup_dir=lab.dir / "backups", force=True, shutdown_timeout=2,
    )  # fmt: skip
    steps: list[str] = []
    t = execute_template(lab.hv, plan, lambda m, f: steps.append(m))
    assert any(s.startswith("sysprep: ") and "Performing" in s for s in steps)
    assert any("forcing" in s for s in steps)
    assert t.name == lab.name("tweb") and t.sealed and t.source == vm
    assert t.sealed_operations == ("ssh-hostkeys", "machine-id", "bash-history")
    assert stat.S_IMODE(os.stat(disk).st_mode) == 0o444
    assert lab.hv.domain(t.name).state is DomainState.SHUTOFF
    # Chosen things are gone, the rest is untouched.
    out = guestfish(disk, [
        "is-file /etc/ssh/ssh_host_ed25519_key", "is-file /etc/ssh/ssh_host_ed25519_key.pub",
        "filesize /etc/machine-id", "is-file /root/.bash_history",
        "is-file /etc/udev/rules.d/70-persistent-net.rules", "cat /etc/hostname",
    ])  # fmt: skip
    assert out == ["false", "false", "0", "false", "true", "web01"]

    thin = plan_clone(lab.hv, t.name, lab.name("thin"), count=2)
    full = plan_clone(lab.hv, t.name, lab.name("full"), full=True)
    execute_clone(lab.hv, thin)
    execute_clone(lab.hv, full)
    for name in thin.names:
        info = qemu_info(str(lab.dir / f"{name}.qcow2"))
        assert info["backing-filename"] == disk and info["backing-filename-format"] == "qcow2"
    full_info = qemu_info(str(lab.dir / f"{lab.name('full')}.qcow2"))
    assert "backing-filename" not in full_info
    assert full_info["actual-size"] < full_info["virtual-size"]  # sparse stays sparse
    doms = [lab.hv.domain(n) for n in (*thin.names, *full.names)]
    assert len({d.uuid for d in doms}) == 3
    macs = [i.mac for d in doms for i in d.interfaces]
    assert len(set(macs)) == 3 and "52:54:00:1a:2b:3c" not in macs
    listed = {x.name: x for x in list_templates(lab.hv, lab.dir / "backups")}[t.name]
    assert listed.thin_clones == thin.names and listed.full_clones == full.names


@pytest.mark.sysprep
def test_cli_template_create_with_defaults_undefine_then_clone(
    lab: SystemLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = guest_disk(lab, "db.qcow2", tmp_path)
    vm = lab.define("db", disks=[(disk, "qcow2")])
    backups = str(lab.dir / "backups")
    argv = ["-c", lab.hv.uri, "template", "create", vm, "--name", lab.name("tdb"),
            "--undefine", "--backup-dir", backups]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "virtdeck: sysprep:" in out.err and "machine-id" in out.err
    assert lab.name("tdb") not in lab_domains(lab) and vm not in lab_domains(lab)
    assert (lab.dir / "backups" / f"{lab.name('tdb')}.xml").exists()
    # The default set ends with "customize", which writes a fresh machine-id: virtdeck empties
    # it again in the same run (each clone makes its own), and installs the host-key unit.
    keys, machine_id, unit = guestfish(disk, [
        "is-file /etc/ssh/ssh_host_ed25519_key", "filesize /etc/machine-id",
        "is-file /etc/systemd/system/virtdeck-ssh-hostkeys.service",
    ])  # fmt: skip
    assert (keys, machine_id, unit) == ("false", "0", "true")
    assert main(["-c", lab.hv.uri, "template", "ls", "--json", "--backup-dir", backups]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed[lab.name("tdb")]["defined"] is False
    assert "machine-id" in listed[lab.name("tdb")]["sealed_operations"]
    assert listed[lab.name("tdb")]["first_boot"]["shared"] == []
    # Its base's identity, recorded once when it was made: the sha256 of the sealed file.
    digest = hashlib.sha256(Path(disk).read_bytes()).hexdigest()
    assert listed[lab.name("tdb")]["base_identity"] == {"vda": [f"sha256:{digest}"]}
    # --keep-hostname: this sealed template has an OS, so by default each clone would be
    # renamed with virt-customize (40 s under TCG; test_identity_system covers that).
    argv = ["-c", lab.hv.uri, "clone", lab.name("tdb"), lab.name("app"),
            "--backup-dir", backups, "--keep-hostname"]  # fmt: skip
    assert main(argv) == 0
    assert "identity:" not in capsys.readouterr().err
    assert lab.name("app") in lab_domains(lab)
    # The undefined template's base is protected by its backup.
    argv = ["-c", lab.hv.uri, "rm", lab.name("tdb"), "--storage", "--backup-dir", backups]
    assert main(argv) == 1
    assert lab.name("app") in capsys.readouterr().err
    assert os.path.exists(disk)


# -- no virt-sysprep ----------------------------------------------------------------------------


def test_thin_clone_starts_on_a_read_only_base(lab: SystemLab, tmp_path: Path) -> None:
    tname, base = unsealed_template(lab, tmp_path)
    plan = plan_clone(lab.hv, tname, lab.name("boot"), start=True, allow_unsealed=True)
    execute_clone(lab.hv, plan)
    dom = lab.hv.domain(lab.name("boot"))
    assert dom.state is DomainState.RUNNING
    assert lab.hv.conn.lookupByName(dom.name).OSType() == "hvm"
    root_type = lab.hv.xml(dom.name).split("'", 2)[1]
    assert root_type == lab.virt_type
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o444
    with pytest.raises(StateError, match="is a template"):
        lab.hv.start(tname)
    with pytest.raises(StateError, match="running"):
        plan_remove(lab.hv, dom.name)


def test_graceful_shutdown_timeout_without_force_changes_nothing(
    lab: SystemLab, tmp_path: Path
) -> None:
    disk = guest_disk(lab, "stubborn.qcow2", tmp_path)
    vm = lab.define("stubborn", disks=[(disk, "qcow2")])
    lab.hv.start(vm)
    plan = plan_template(
        lab.hv, vm, name=lab.name("ts"), seal=False, backup_dir=lab.dir / "b", shutdown_timeout=1
    )
    with pytest.raises(StateError, match="still running after 1 s.*--force"):
        execute_template(lab.hv, plan)
    info = lab.hv.domain(vm)
    assert info.state is DomainState.RUNNING and info.meta.role is None
    assert not (lab.dir / "b").exists()
    assert stat.S_IMODE(os.stat(disk).st_mode) != 0o444


def test_removal_refuses_the_base_and_deletes_only_the_overlay(
    lab: SystemLab, tmp_path: Path
) -> None:
    tname, base = unsealed_template(lab, tmp_path)
    backups = lab.dir / "backups"
    clones = plan_clone(lab.hv, tname, lab.name("c"), count=2, allow_unsealed=True)
    execute_clone(lab.hv, clones)
    with pytest.raises(DependencyError) as err:
        plan_remove(lab.hv, tname, storage=True, backup_dir=backups)
    assert all(n in str(err.value) for n in clones.names)
    plan = plan_remove(lab.hv, clones.names[0], storage=True, backup_dir=backups)
    execute_remove(lab.hv, plan, backup_dir=backups)
    assert f"{clones.names[0]}.qcow2" not in lab_files(lab) and os.path.exists(base)
    qemu_info(str(lab.dir / f"{clones.names[1]}.qcow2"))  # the other clone's chain still reads
    with pytest.raises(DependencyError, match=clones.names[1]):
        plan_remove(lab.hv, tname, backup_dir=backups)
    execute_remove(lab.hv, plan_remove(lab.hv, clones.names[1], storage=True), backup_dir=backups)
    execute_remove(lab.hv, plan_remove(lab.hv, tname, storage=True, backup_dir=backups))
    assert tname not in lab_domains(lab) and not os.path.exists(base)
    assert not (backups / f"{tname}.xml").exists()


def test_full_clone_refused_without_space(lab: SystemLab, tmp_path: Path) -> None:
    tname, _ = unsealed_template(lab, tmp_path)
    with tmpfs(lab.dir / "tiny", "512k") as tiny:
        with pytest.raises(InvalidInputError, match="not enough space"):
            plan_clone(lab.hv, tname, lab.name("big"), full=True, directory=str(tiny),
                       allow_unsealed=True)  # fmt: skip
        assert not list(tiny.iterdir())
    assert lab.name("big") not in lab_domains(lab)


def test_disk_filling_up_during_a_full_clone_leaves_nothing(lab: SystemLab, tmp_path: Path) -> None:
    tname, base = unsealed_template(lab, tmp_path)
    before = lab_domains(lab)
    one_copy = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", base))["required"]
    with tmpfs(lab.dir / "small", "24M") as small:
        plan = plan_clone(lab.hv, tname, lab.name("fill"), full=True, count=2,
                          directory=str(small), allow_unsealed=True)  # fmt: skip
        filler = small / "filler"
        with open(filler, "wb") as fh:  # someone else takes the space after the plan
            fh.write(b"\0" * (24 * 1024**2 - one_copy - one_copy // 2))
        with pytest.raises(OperationError, match="qemu-img convert failed"):
            execute_clone(lab.hv, plan)
        assert sorted(p.name for p in small.iterdir()) == ["filler"]
    assert lab_domains(lab) == before


def test_forced_qemu_img_and_interrupt_failures_leave_nothing(
    lab: SystemLab, tmp_path: Path
) -> None:
    tname, _ = unsealed_template(lab, tmp_path)
    before_files, before_doms = lab_files(lab), lab_domains(lab)

    def runner_failing_on(nth: int, exc: type[BaseException] | None) -> QemuImg:
        calls = 0

        def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
            nonlocal calls
            if "create" in argv:
                calls += 1
                if calls == nth:
                    if exc is not None:
                        run_subprocess(argv)
                        raise exc()
                    return subprocess.CompletedProcess(list(argv), 1, "", "I/O error")
            return run_subprocess(argv)

        return QemuImg(runner=run)

    plan = plan_clone(lab.hv, tname, lab.name("q"), count=3, allow_unsealed=True)
    with pytest.raises(OperationError, match="I/O error"):
        execute_clone(lab.hv, plan, qemu=runner_failing_on(3, None))
    assert (lab_files(lab), lab_domains(lab)) == (before_files, before_doms)
    with pytest.raises(KeyboardInterrupt):
        execute_clone(lab.hv, plan, qemu=runner_failing_on(2, KeyboardInterrupt))
    assert (lab_files(lab), lab_domains(lab)) == (before_files, before_doms)


def test_define_failure_on_qemu_leaves_nothing(lab: SystemLab, tmp_path: Path) -> None:
    tname, _ = unsealed_template(lab, tmp_path)
    before_files = lab_files(lab)
    plan = plan_clone(lab.hv, tname, lab.name("d"), count=2, allow_unsealed=True)
    other = plan.items[1].xml.replace(f"<name>{plan.items[1].name}</name>",
                                      f"<name>{lab.name('other')}</name>")  # fmt: skip
    lab.hv.conn.defineXML(other)  # takes the second clone's UUID
    with pytest.raises(OperationError, match="defining clone"):
        execute_clone(lab.hv, plan)
    assert lab_files(lab) == before_files
    assert not lab_domains(lab) & set(plan.names)


def test_removing_a_clone_with_external_snapshots_leaves_no_orphan(
    lab: SystemLab, tmp_path: Path
) -> None:
    """A running thin clone gets an external snapshot (overlay + memory file) and is reverted;
    `rm --storage` then deletes its whole own chain and the snapshot's files, and only those."""
    from tui.core import snapshots

    tname, base = unsealed_template(lab, tmp_path)
    execute_clone(lab.hv, plan_clone(lab.hv, tname, lab.name("snapc"), allow_unsealed=True))
    clone = lab.name("snapc")
    lab.hv.start(clone)
    snapshots.create(lab.hv, snapshots.plan_create(lab.hv, clone, "s1", external=True))
    snapshots.revert(lab.hv, snapshots.plan_revert(lab.hv, clone, "s1"))
    lab.hv.destroy(clone)
    own = {p for p in lab_files(lab) if p.startswith(clone)}
    assert any(p.endswith(".mem") for p in own) and len(own) >= 3  # overlays + memory

    plan = plan_remove(lab.hv, clone, storage=True)
    assert plan.snapshots == ("s1",)
    assert "forget its snapshots: s1" in plan.summary()
    assert os.path.realpath(base) in plan.kept_files
    execute_remove(lab.hv, plan)
    assert not {p for p in lab_files(lab) if p.startswith(clone)}
    assert os.path.exists(base) and lab.hv.exists(tname)  # the template is untouched
    assert qemu_img("check", base).strip().startswith("No errors")
