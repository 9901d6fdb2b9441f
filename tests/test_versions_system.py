"""Template versions on the real libvirt daemons: update, seal (no virt-sysprep: fast) into
version 2, old clones untouched, new clones on the new version, removal refused while used."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab, qemu_img
from tests.test_templates_system import unsealed_template
from tui.cli import main
from tui.core import reclaim, versions
from tui.core.clones import execute_clone, execute_remove, plan_clone, plan_remove
from tui.core.errors import DependencyError
from tui.core.templates import execute_template, list_templates, plan_template

pytestmark = pytest.mark.system

OFFSET, LENGTH = "63M", "64k"  # past what mkfs.ext4 -d wrote into the 64 MiB guest disk


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reads(path: str, pattern: int) -> bool:
    """Whether the image (through its chain) reads `pattern` at OFFSET (qemu-io -r)."""
    run = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern:#x} {OFFSET} {LENGTH}", path],
        capture_output=True,
        text=True,
    )
    if "Pattern verification failed" in run.stdout + run.stderr:
        return False
    assert run.returncode == 0, run.stderr  # a read error is not "another pattern"
    return True


def own_data(path: str) -> int:
    """Bytes of guest data the image itself holds (not its backing chain): qemu-img map."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", path], capture_output=True, check=True
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def disk_of(lab: SystemLab, name: str) -> str:
    path = lab.hv.domain(name).disks[0].path
    assert path is not None
    return path


def test_update_seal_version_2_keeps_old_clones_and_base(
    lab: SystemLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backups = lab.dir / "backups"
    tname, base = unsealed_template(lab, tmp_path)
    before = sha256(base)
    old = plan_clone(lab.hv, tname, lab.name("old"), count=3, allow_unsealed=True)
    execute_clone(lab.hv, old)

    update = versions.plan_update(lab.hv, tname, backup_dir=backups)
    assert update.names == (f"{tname}-v2-edit",)
    # the plan says what it makes: the next version's edit VM, not a clone to deploy
    assert "version 2" in update.title and "Deploy" not in update.title
    assert not any("share its identity" in line for line in update.summary())
    execute_clone(lab.hv, update)
    edit = update.names[0]
    overlay = disk_of(lab, edit)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab {OFFSET} {LENGTH}", overlay],
        capture_output=True,
        check=True,
    )
    seal = versions.plan_seal(lab.hv, edit, seal=False, backup_dir=backups)
    assert (seal.name, seal.family, seal.version) == (f"{tname}-v2", tname, 2)
    execute_template(lab.hv, seal)

    assert sha256(base) == before  # version 1's base never changes
    found = {t.name: t for t in list_templates(lab.hv, backups)}
    assert (found[seal.name].family, found[seal.name].version) == (tname, 2)
    assert found[tname].version == 1
    assert 0 < own_data(overlay) * 4 < own_data(base)  # v2's own layer: only the changed clusters

    assert versions.resolve(lab.hv, tname, backup_dir=backups) == seal.name
    assert versions.resolve(lab.hv, tname, 1, backup_dir=backups) == tname
    new = plan_clone(lab.hv, versions.resolve(lab.hv, tname, backup_dir=backups),
                     lab.name("new"), allow_unsealed=True)  # fmt: skip
    execute_clone(lab.hv, new)
    assert reads(disk_of(lab, new.names[0]), 0xAB)
    found = {t.name: t for t in list_templates(lab.hv, backups)}
    assert set(found[tname].thin_clones) == set(old.names)  # each clone counts for its version
    assert found[seal.name].thin_clones == new.names
    for name in old.names:
        assert not reads(disk_of(lab, name), 0xAB)
        same = subprocess.run(["qemu-img", "compare", "-U", disk_of(lab, name), base])
        assert same.returncode == 0  # old clones read version 1, unchanged

    with pytest.raises(DependencyError) as err:
        plan_remove(lab.hv, versions.version_name(lab.hv, tname, 1, backups), storage=True,
                    backup_dir=backups)  # fmt: skip
    assert all(n in str(err.value) for n in (*old.names, seal.name))
    cli = ["-c", lab.hv.uri, "template", "rm", tname, "--version", "1", "--backup-dir", backups]
    assert main([str(a) for a in cli]) != 0
    refusal = [line for line in capsys.readouterr().err.splitlines() if seal.name in line]
    assert len(refusal) == 1 and all(n in refusal[0] for n in old.names)
    assert main(["-c", lab.hv.uri, "template", "ls", "--json", "--backup-dir", str(backups)]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert (listed[seal.name]["family"], listed[seal.name]["version"]) == (tname, 2)

    for name in old.names:
        execute_remove(lab.hv, plan_remove(lab.hv, name, storage=True, backup_dir=backups))
    prune = versions.plan_prune(lab.hv, tname, backups)
    assert prune.remove == ()  # version 2 is thin: it builds on version 1
    assert (tname, f"used by {new.names[0]}, {seal.name}") in prune.kept

    # Version 3, flattened: a standalone image; once version 2's clone is gone, prune frees
    # versions 2 and 1 (the newest is kept).
    cli = ["-c", lab.hv.uri]
    assert main([*cli, "template", "update", tname, "--backup-dir", str(backups)]) == 0
    assert main([*cli, "template", "update", tname, "--commit", "--no-seal", "--flatten",
                 "--backup-dir", str(backups)]) == 0  # fmt: skip
    v3 = f"{tname}-v3"
    flat = disk_of(lab, v3)
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", flat],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info and reads(flat, 0xAB)
    execute_remove(lab.hv, plan_remove(lab.hv, new.names[0], storage=True, backup_dir=backups))
    prune = versions.plan_prune(lab.hv, tname, backups)
    assert prune.remove == (seal.name, tname)
    assert all(b is not None and b > 0 for b in prune.frees)
    assert versions.execute_prune(lab.hv, prune, backup_dir=backups) == [seal.name, tname]
    assert not os.path.exists(base) and not os.path.exists(overlay) and os.path.exists(flat)
    assert versions.resolve(lab.hv, tname, backup_dir=backups) == v3  # the family's name
    made = [*cli, "clone", tname, lab.name("v3c"), "--allow-unsealed", "--backup-dir", str(backups)]
    assert main(made) == 0 and reads(disk_of(lab, lab.name("v3c")), 0xAB)


def test_reclaim_deletes_an_orphaned_overlay_only(
    lab: SystemLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backups = lab.dir / "backups"
    tname, base = unsealed_template(lab, tmp_path)
    made = plan_clone(lab.hv, tname, lab.name("c"), count=2, allow_unsealed=True)
    execute_clone(lab.hv, made)
    orphan, kept = disk_of(lab, made.names[0]), disk_of(lab, made.names[1])
    lab.hv.lookup(made.names[0]).undefine()  # by hand: its overlay stays behind, read by none
    plain = lab.disk("operator.qcow2")  # nobody's, but no overlay of a base: not virtdeck's

    # A family whose version 2 is flattened: version 1 is used by nothing.
    uname, ubase = unsealed_template(lab, tmp_path, "u")
    update = versions.plan_update(lab.hv, uname, backup_dir=backups)
    execute_clone(lab.hv, update)
    versions.execute_flatten(
        lab.hv, update.names[0], versions.plan_flatten(lab.hv, update.names[0], uname, 2)
    )
    execute_template(lab.hv, versions.plan_seal(lab.hv, update.names[0], seal=False,
                                                backup_dir=backups))  # fmt: skip
    # A template kept only as its XML backup, whose image is gone.
    gone = lab.define("gone", disks=[(lab.disk("gone.qcow2"), "qcow2")])
    backup = execute_template(lab.hv, plan_template(lab.hv, gone, name=lab.name("tgone"),
                              seal=False, backup_dir=backups, undefine=True))  # fmt: skip
    os.unlink(str(lab.dir / "gone.qcow2"))

    plan = reclaim.plan_reclaim(lab.hv, backup_dir=backups)
    mine = [i for i in plan.items if i.path.startswith((str(lab.dir), lab.prefix))]
    assert [(i.kind, i.path) for i in mine] == [
        ("overlay", orphan),
        ("version", uname),
        ("backup", str(backups / f"{backup.name}.xml")),
    ]
    assert all(i.bytes is not None and i.bytes > 0 for i in mine)
    assert main(["-c", lab.hv.uri, "usage", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["reclaimable"]
    assert {"path": orphan, "bytes": mine[0].bytes} in [
        {"path": i["path"], "bytes": i["bytes"]} for i in listed
    ]
    # Only this lab's files: other runs share the daemon and their image directories.
    done = reclaim.execute_reclaim(
        lab.hv, dataclasses.replace(plan, items=tuple(mine)), backup_dir=backups
    )
    assert done == [uname, str(backups / f"{backup.name}.xml"), orphan]
    assert not any(os.path.exists(p) for p in (orphan, ubase, backups / f"{backup.name}.xml"))
    assert all(os.path.exists(p) for p in (kept, base, plain))
    assert sha256(base) and reads(kept, 0) is True


@pytest.mark.timeout(2400)  # two TCG boots and a shutdown, on a loaded machine too
def test_a_real_guest_changed_in_its_edit_vm_boots_as_version_2(
    host_lab: SystemLab, capfd: pytest.CaptureFixture[str]
) -> None:
    """The operator's path on the real Debian guest under TCG: boot the edit VM, change it
    (through the guest agent), seal (graceful shutdown, no virt-sysprep), and a clone of
    version 2 boots and has the change; a clone of version 1 does not."""
    lab = host_lab
    backups = lab.dir / "backups"
    image = guest.build()
    disk = str(lab.dir / "vm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), disk)
    vm = lab.name("deb")
    lab.hv.define(guest.domain_xml(vm, image, disk))
    t = execute_template(lab.hv, plan_template(lab.hv, vm, name=lab.name("tdeb"), seal=False,
                                               backup_dir=backups))  # fmt: skip
    times: dict[str, float] = {}

    update = versions.plan_update(lab.hv, t.name, backup_dir=backups)
    execute_clone(lab.hv, update)
    edit = lab.hv.conn.lookupByName(update.names[0])
    started = time.monotonic()
    edit.create()
    status, _ = guest.agent_run(
        edit, "echo v2 > /etc/virtdeck-version && sync", timeout=guest.BOOT_DEADLINE
    )
    assert status == 0
    times["edit boot+change"] = time.monotonic() - started
    started = time.monotonic()
    seal = versions.plan_seal(lab.hv, update.names[0], seal=False, backup_dir=backups)
    execute_template(lab.hv, seal)  # shuts the edit VM down gracefully first
    times["shutdown+seal"] = time.monotonic() - started

    made = plan_clone(lab.hv, versions.resolve(lab.hv, t.name, backup_dir=backups),
                      lab.name("c2"), allow_unsealed=True, start=True)  # fmt: skip
    started = time.monotonic()
    execute_clone(lab.hv, made)
    clone = lab.hv.conn.lookupByName(made.names[0])
    status, out = guest.agent_run(clone, "cat /etc/virtdeck-version", timeout=guest.BOOT_DEADLINE)
    times["v2 clone boot"] = time.monotonic() - started
    assert (status, out.strip()) == (0, "v2")
    clone.destroy()
    with capfd.disabled():
        print("times:", {k: round(v) for k, v in times.items()}, flush=True)
