"""Invariants that hold across processes and hosts (issue 17: journals, names, remote hosts).

Over qemu+ssh the client runs in a private mount namespace where the image directory is a
tmpfs holding decoys at the very same paths (as in test_remote_system): whatever virtdeck does
there, it does on the host through libvirt and SSH, and no decoy may change.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.lab import SystemLab, domain_xml
from tests.test_storage_system import REPO, checksum

pytestmark = pytest.mark.system

# Decoys at relative paths (sub-directories made), the commands run, the decoys compared.
NAMESPACE = r"""
import hashlib, json, os, subprocess, sys
lab, uri, repo = sys.argv[1], sys.argv[2], sys.argv[3]
commands, names = json.loads(sys.argv[4]), json.loads(sys.argv[5])
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", lab], check=True)
for name in names:
    path = os.path.join(lab, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("decoy " + name * 100)
def sums():
    return {n: hashlib.sha256(open(os.path.join(lab, n), "rb").read()).hexdigest() for n in names}
before = sums()
results = []
for argv in commands:
    p = subprocess.run([sys.executable, "-m", "tui", "-c", uri, *argv], cwd=repo,
                       capture_output=True, text=True, timeout=300)
    results.append([argv, p.returncode, p.stdout, p.stderr])
print(json.dumps({"results": results, "unchanged": sums() == before}))
"""


def in_namespace(
    lab: SystemLab, uri: str, tmp_path: Path, commands: list[list[str]], decoys: list[str]
) -> list[tuple[int, str, str]]:
    script = tmp_path / "ns.py"
    script.write_text(NAMESPACE)
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_STATE_HOME=str(tmp_path / "state"))  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, str(script),
         str(lab.dir), uri, str(REPO), json.dumps(commands), json.dumps(decoys)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["unchanged"], "a decoy in the client's namespace changed"
    for argv, _code, _stdout, err in out["results"]:
        assert "Traceback" not in err, (argv, err)
    return [(code, stdout, err) for _argv, code, stdout, err in out["results"]]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("virtdeck: plan:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_disk_whose_name_holds_a_newline_is_refused_over_qemu_ssh(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """Issue 17, case 8a: libvirt stores '-nl<newline>dir/-rf x.qcow2'; read as a space it is
    the other file '-nl dir/-rf x.qcow2'. rm --storage, template create and snapshot create
    refuse it in one line; the other file, the VM's own disk and the decoys are intact."""
    lab = host_lab
    (lab.dir / "-nl\ndir").mkdir()
    (lab.dir / "-nl dir").mkdir()
    own = lab.disk("-nl\ndir/-rf x.qcow2")
    other = lab.disk("-nl dir/-rf x.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 1M", other], check=True,
                   capture_output=True)  # fmt: skip
    sums = {p: checksum(p) for p in (own, other)}
    vm = lab.name("nl")
    xml = domain_xml(vm, [(own, "qcow2")], virt_type=lab.virt_type)
    lab.hv.conn.defineXML(xml.replace("\n", "&#10;"))
    assert "-nl\ndir" in lab.hv.conn.lookupByName(vm).XMLDesc(0)  # stored raw by libvirt
    results = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["rm", vm, "--storage"],
        ["template", "create", vm, "--no-seal", "--backup-dir", str(tmp_path / "b")],
        ["snapshot", "create", vm, "s1"],
        ["snapshot", "create", vm, "s1", "--external"],
    ], ["-nl\ndir/-rf x.qcow2", "-nl dir/-rf x.qcow2"])  # fmt: skip
    for code, _out, err in results:
        line = one_line(err)
        assert code == 1 and "control character" in line, err
    assert lab.hv.exists(vm)
    assert lab.hv.conn.lookupByName(vm).snapshotNum(0) == 0
    for p, s in sums.items():
        assert checksum(p) == s and os.stat(p).st_mode & 0o222, p
    assert sorted(p.name for p in (lab.dir / "-nl dir").iterdir()) == ["-rf x.qcow2"]
    assert sorted(p.name for p in (lab.dir / "-nl\ndir").iterdir()) == ["-rf x.qcow2"]


def test_a_refused_remote_chmod_unwinds_and_leaves_no_journal(
    session_rig: Any, session_uri: str, tmp_path: Path
) -> None:
    """Issue 17, case 8c: on the test user's session daemon (over qemu+ssh), a VM whose disk
    is root's: template create cannot make it read-only. It unwinds, leaves no journal, says
    so in one line; the audit record says `failed` and why; the operator's later change of
    the definition (setmem) survives a `recover --yes`."""
    import libvirt

    from tui.core import audit

    conn = libvirt.open(session_uri)
    pool = conn.storagePoolLookupByName("vdtest-pool")
    prefix = f"vdinv{os.getpid()}"
    disk = Path(session_rig.pool_dir) / f"{prefix}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    os.chmod(disk, 0o644)  # root's, readable by the test user: chmod is refused to them
    pool.refresh(0)
    vm = f"{prefix}-vm"
    conn.defineXML(domain_xml(vm, [(str(disk), "qcow2")], virt_type="qemu"))
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"),
               XDG_DATA_HOME=str(tmp_path / "data"),
               VIRTDECK_AUDIT_LOG=str(tmp_path / "audit" / "audit.log"))  # fmt: skip

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tui", "-c", session_uri, *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip

    try:
        before = conn.lookupByName(vm).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        made = run("template", "create", vm, "--no-seal", "--backup-dir", str(tmp_path / "b"))
        line = made.stderr.strip().splitlines()[-1]
        assert "Traceback" not in made.stderr
        assert made.returncode == 1 and "cannot change the mode" in line, made.stderr
        assert "undid" in line and "could not undo" not in line, line
        assert not list((tmp_path / "state").glob("virtdeck/journal/*.json"))
        dom = conn.lookupByName(vm)  # its name and definition are as they were
        assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
        assert os.stat(disk).st_mode & 0o777 == 0o644
        assert not list((tmp_path / "b").glob("*")) if (tmp_path / "b").exists() else True
        dom.setMemoryFlags(96 * 1024, libvirt.VIR_DOMAIN_AFFECT_CONFIG)  # the operator's change
        changed = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        rec = run("recover", "--yes")
        assert rec.returncode == 0 and rec.stdout.startswith("nothing to recover"), rec
        assert conn.lookupByName(vm).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == changed
        records, _bad = audit.read(tmp_path / "audit" / "audit.log")
        last = [r for r in records if vm in r.domains][-1]
        assert last.result == "failed" and "cannot change the mode" in last.error, last
    finally:
        for name in (vm, f"template-{vm}"):
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).undefine()
        disk.unlink(missing_ok=True)
        pool.refresh(0)
        conn.close()


def test_a_two_layer_template_copy_to_a_host_that_cannot_read_the_source_works_or_leaves_nothing(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, tmp_path: Path
) -> None:
    """Issue 17, case 8b: the template's base is a 2-layer chain in a directory the target
    host's daemon (the test user's session) cannot read. The copy either works (same data on
    the target) or fails leaving nothing there: no volume, no definition, no journal."""
    import libvirt

    from tests.lab import qemu_img
    from tests.test_storage_system import TEMPLATE
    from tui.core import domxml

    lab = host_lab
    os.chmod(lab.dir, 0o700)  # root's: the test user cannot even stat what is inside
    lower = lab.disk("l0.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", lower], check=True, capture_output=True)
    upper = str(lab.dir / "l1.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", lower, "-F", "qcow2", upper)
    subprocess.run(["qemu-io", "-c", "write -P 0x22 1M 1M", upper], check=True,
                   capture_output=True)  # fmt: skip
    for p in (lower, upper):
        os.chmod(p, 0o444)
    tname = lab.name("l2tpl")
    root = domxml.parse(domain_xml(tname, [(upper, "qcow2")], virt_type="qemu"))
    domxml.write_meta(root, TEMPLATE)
    lab.hv.conn.defineXML(domxml.to_string(root))
    conn = libvirt.open(session_uri)
    pool = conn.storagePoolLookupByName("vdtest-pool")
    pool.refresh(0)
    before = {v.name() for v in pool.listAllVolumes(0)}
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"),
               VIRTDECK_AUDIT_LOG=str(tmp_path / "audit" / "audit.log"))  # fmt: skip
    made: list[str] = []
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tui", "-c", ssh_root_uri, "template", "copy", tname,
             "--to", session_uri],
            capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        pool.refresh(0)
        made = sorted({v.name() for v in pool.listAllVolumes(0)} - before)
        assert not list((tmp_path / "state").glob("virtdeck/journal/*.json")), proc.stderr
        if proc.returncode == 0:
            copied = {n: pool.storageVolLookupByName(n).path() for n in made}
            top = copied["l1.qcow2"]
            for pattern, offset in ((0x11, "0"), (0x22, "1M")):
                check = subprocess.run(
                    ["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} 1M", top],
                    capture_output=True, text=True,
                )  # fmt: skip
                assert check.returncode == 0 and "verification failed" not in check.stdout
        else:
            assert made == [], (made, proc.stderr)
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByName(tname)
            from tui.core import audit

            records, _ = audit.read(tmp_path / "audit" / "audit.log")
            assert records[-1].result == "failed" and records[-1].error, records[-1]
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(tname).undefine()
        pool.refresh(0)
        for name in made:
            with contextlib.suppress(libvirt.libvirtError):
                vol = pool.storageVolLookupByName(name)
                os.chmod(vol.path(), 0o644)
                vol.delete(0)
        conn.close()


def test_remote_free_space_is_what_a_user_can_write(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """Issue 17, case 8e: over qemu+ssh the plan's free space is statfs's f_bavail on the
    host (the pool's figure counts the blocks reserved for root), the same figure for the
    clone plan and the template copy plan."""
    from tests.test_storage_system import TEMPLATE, define_with

    lab = host_lab
    base = lab.disk("fbase.qcow2")
    os.chmod(base, 0o444)
    tname, _ = define_with(lab, "ftpl", "", first=base, meta=TEMPLATE)
    proc = subprocess.run(
        [sys.executable, "-m", "tui", "-c", ssh_root_uri, "clone", tname, lab.name("f"),
         "--dry-run", "--json", "--allow-unsealed"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["plan"]["bytes_free"]
    st = os.statvfs(lab.dir)
    user, root = st.f_bavail * st.f_frsize, st.f_bfree * st.f_frsize
    assert abs(shown - user) < 256 * 1024**2, (shown, user, root)  # (others write meanwhile)
    if root - user > 512 * 1024**2:  # a filesystem with a root reserve: never that figure
        assert abs(shown - root) > 256 * 1024**2
    assert "storage pool's figure" not in proc.stdout + proc.stderr


def test_a_stale_group_snapshot_journal_keeps_the_snapshots_taken_again(
    lab: SystemLab, tmp_path: Path
) -> None:
    """Issue 17, case 5: what a SIGKILLed group snapshot leaves (its journal names 's1' of
    two domains, with the creation times of the snapshots it took); the operator deletes them
    and takes 's1' again; `recover --yes` deletes neither new snapshot, and says why."""
    import time

    from tui.core import ops, snapshots

    hv = lab.hv
    vms = [lab.define(f"g{i}") for i in (1, 2)]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tui", "-c", hv.uri, *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip

    args = [a for vm in vms for a in ("--domain", vm)]
    taken = run("snapshot", "create", "s1", *args)
    assert taken.returncode == 0, taken.stderr
    old = {vm: snapshots.snapshot_tree(hv, vm).get("s1").created.isoformat() for vm in vms}
    # The journal the killed process would have left (written as ops does, a dead pid).
    journal = ops.Journal(hv.uri, f"group snapshot 's1' of {', '.join(vms)}",
                          tmp_path / "state" / "virtdeck" / "journal", vms)  # fmt: skip
    for vm in vms:
        journal.push(f"delete snapshot 's1' of '{vm}'", "delete_snapshot", domain=vm, name="s1")
        journal.identify({"created": old[vm]})
    data = json.loads(journal.path.read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    data["pid"] = dead.pid
    journal.path.write_text(json.dumps(data))
    # By hand: the leftovers deleted; then 's1' taken again, in a later second.
    for vm in vms:
        hv.lookup(vm).snapshotLookupByName("s1", 0).delete(0)
    deadline = time.monotonic() + 5
    second = int(time.time()) + 1
    while time.time() < second:  # a creation time is in whole seconds: the next one
        assert time.monotonic() < deadline
    again = run("snapshot", "create", "s1", *args)
    assert again.returncode == 0, again.stderr
    rec = run("recover", "--yes")
    assert rec.returncode == 0, rec.stderr
    assert rec.stdout.count("was taken again since") == 2, rec.stdout
    for vm in vms:
        node = snapshots.snapshot_tree(hv, vm).get("s1")
        assert node is not None and node.created.isoformat() != old[vm], vm
    assert not list((tmp_path / "state").glob("virtdeck/journal/*.json"))
