"""Remote hosts get the whole product (issue 10, part 3): through `qemu+ssh://`.

The daemon is this machine's qemu:///system reached over the SSH rig, so it is another host as
far as virtdeck can prove. The client runs in a private mount namespace where the image
directory is a tmpfs holding decoys at the very same paths: the remote images are not
visible to it, so whatever works, works through libvirt's storage pools (and SSH for what
libvirt has no API for), and no decoy may change. The results are checked on the host side
(outside the namespace) with qemu-img and qemu-io.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.lab import SystemLab
from tests.test_storage_system import NAMESPACE_SCRIPT, REPO, TEMPLATE, define_with
from tui.core.models import DomainState

pytestmark = pytest.mark.system


def in_namespace(
    lab: SystemLab, uri: str, tmp_path: Path, commands: list[list[str]]
) -> dict[str, Any]:
    """Run virtdeck commands against `uri` from a mount namespace with decoys over lab.dir."""
    names = sorted(p.name for p in lab.dir.iterdir() if p.is_file())
    script = tmp_path / "ns.py"
    script.write_text(NAMESPACE_SCRIPT)
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_STATE_HOME=str(tmp_path / "state"))  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, str(script),
         str(lab.dir), uri, str(REPO), json.dumps(commands), json.dumps(names)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    # The client saw only its decoys, unchanged, and made no file of its own there.
    assert out["unchanged"] and out["listing"], out
    for argv, _code, _stdout, err in out["results"]:
        assert "Traceback" not in err, (argv, err)
    return out


def ok(out: dict[str, Any], i: int) -> str:
    argv, code, stdout, err = out["results"][i]
    assert code == 0, (argv, err[-3000:])
    return str(stdout)


def info(path: str) -> dict[str, Any]:
    """qemu-img info on the host (outside the namespace)."""
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                          capture_output=True, text=True, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def reads(path: str, pattern: int, length: str = "1M") -> bool:
    proc = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} 0 {length}", path],
                          capture_output=True, text=True)  # fmt: skip
    return proc.returncode == 0 and "verification failed" not in proc.stdout


def write(path: str, pattern: int, length: str = "1M") -> None:
    subprocess.run(["qemu-io", "-c", f"write -P {pattern:#x} 0 {length}", path],
                   check=True, capture_output=True)  # fmt: skip


def test_clones_usage_and_rm_through_qemu_ssh(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    lab = host_lab  # the ssh rig reaches the host's own daemon
    hv = lab.hv
    base = lab.disk("base.qcow2")
    write(base, 0x11)
    os.chmod(base, 0o444)  # a template's base
    tname, _ = define_with(lab, "tpl", "", first=base, meta=TEMPLATE)
    thin, full = lab.name("t"), lab.name("f")
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["clone", tname, thin, "--count", "3", "--dry-run"],
        ["clone", tname, thin, "--count", "3"],
        ["clone", tname, full, "--full"],
        ["usage", "--json"],
        ["rm", f"{thin}-1", "--storage"],
        ["rm", tname, "--storage"],
    ])  # fmt: skip
    ok(out, 0)
    dry = out["results"][0][3]  # the plan is printed on stderr
    assert "storage pool" in dry and str(lab.dir) in dry, dry
    ok(out, 1)
    ok(out, 2)
    # Thin clones: qcow2 overlays on the base, made on the host; the full copy stands alone.
    for i in (2, 3):
        path = str(lab.dir / f"{thin}-{i}.qcow2")
        facts = info(path)
        assert facts["format"] == "qcow2"
        assert facts["full-backing-filename"] == base and facts["backing-filename-format"] == (
            "qcow2"
        )
        assert reads(path, 0x11)
    full_path = str(lab.dir / f"{full}.qcow2")
    assert "backing-filename" not in info(full_path) and reads(full_path, 0x11)
    # usage --json: the numbers are qemu-img's on the host.
    usage = json.loads(ok(out, 3))
    seen = {i["path"]: i for i in usage["images"]}
    for path in [base, full_path, str(lab.dir / f"{thin}-2.qcow2")]:
        facts = info(path)
        assert seen[path]["virtual_bytes"] == facts["virtual-size"], path
        assert seen[path]["actual_bytes"] == facts["actual-size"], path
    # rm --storage: the clone's overlay is gone, nothing else; the template is refused.
    ok(out, 4)
    assert not hv.exists(f"{thin}-1") and not (lab.dir / f"{thin}-1.qcow2").exists()
    code, _, err = out["results"][5][1:]
    assert code != 0 and f"{thin}-2" in err, err
    assert hv.exists(tname) and Path(base).exists() and reads(base, 0x11)
    # A thin clone made through the remote host starts.
    hv.start(f"{thin}-2")
    assert hv.domain(f"{thin}-2").state == DomainState.RUNNING
    hv.destroy(f"{thin}-2")


def top_of(lab: SystemLab, name: str) -> str:
    lab.hv.invalidate()  # another process changed it
    disk = lab.hv.domain(name).disks[0]
    assert disk.path is not None
    return disk.path


def test_external_snapshots_revert_and_delete_through_qemu_ssh(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """create s1, write, create s2, write; delete s2 (its overlay is committed on the host
    over SSH), then revert to s1 (a fresh overlay made by the host's storage pool)."""
    lab = host_lab  # the ssh rig reaches the host's own daemon
    hv = lab.hv
    vm = lab.define("vs")
    disk = str(lab.dir / "vs.qcow2")
    write(disk, 0x22)
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["snapshot", "create", vm, "s1", "--external"],
    ])  # fmt: skip
    ok(out, 0)
    o1 = top_of(lab, vm)
    assert o1 != disk and info(o1)["full-backing-filename"] == disk
    write(o1, 0x33)
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["snapshot", "create", vm, "s2", "--external"],
    ])  # fmt: skip
    ok(out, 0)
    o2 = top_of(lab, vm)
    subprocess.run(["qemu-io", "-c", "write -P 0x44 1M 1M", o2], check=True,
                   capture_output=True)  # fmt: skip
    out = in_namespace(lab, ssh_root_uri, tmp_path, [["snapshot", "delete", vm, "s2"]])
    ok(out, 0)
    # Delete: s2's overlay (0x44 at 1M) was merged into o1 (0x33 at 0) and removed.
    assert not Path(o2).exists() and top_of(lab, vm) == o1
    assert reads(o1, 0x33)
    assert (
        subprocess.run(
            ["qemu-io", "-r", "-U", "-c", "read -P 0x44 1M 1M", o1], capture_output=True, text=True
        ).stdout.count("verification")
        == 0
    )
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["snapshot", "revert", vm, "s1"],
        ["snapshot", "ls", vm, "--json"],
    ])  # fmt: skip
    ok(out, 0)
    # Revert: the disk is a fresh overlay on the image of s1 (0x22), none of the later writes.
    top = top_of(lab, vm)
    assert top not in (disk, o1, o2) and info(top)["full-backing-filename"] == disk
    assert reads(top, 0x22)
    probe = subprocess.run(["qemu-io", "-r", "-U", "-c", "read -P 0x44 1M 1M", top],
                           capture_output=True, text=True)  # fmt: skip
    assert "verification failed" in probe.stdout or probe.returncode != 0
    names = [n["name"] for n in json.loads(ok(out, 1))]
    assert names == ["s1"]
    hv.start(vm)
    assert hv.domain(vm).state == DomainState.RUNNING
    hv.destroy(vm)


@pytest.mark.sysprep
@pytest.mark.timeout(900)  # the appliance probe's deadline, then virt-sysprep under TCG
def test_template_create_with_virt_sysprep_on_the_host_then_clones(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """virt-sysprep runs on the hypervisor over SSH (-a on the image), the base is made
    read-only there, and clones deploy from it."""
    lab = host_lab  # the ssh rig reaches the host's own daemon
    from tests.test_templates_system import guest_disk, guestfish

    hv = lab.hv
    disk = guest_disk(lab, "web.qcow2", tmp_path)
    vm = lab.define("web", disks=[(disk, "qcow2")])
    tname = lab.name("tweb")
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["template", "create", vm, "--name", tname,
         "--operations", "ssh-hostkeys,machine-id,bash-history"],
        ["clone", tname, lab.name("c")],
    ])  # fmt: skip
    ok(out, 0)
    assert "sysprep: " in out["results"][0][3]
    assert oct(os.stat(disk).st_mode & 0o777) == oct(0o444)
    assert hv.domain(tname).is_template and hv.domain(tname).meta.sealed
    checks = [
        "is-file /etc/ssh/ssh_host_ed25519_key",
        "filesize /etc/machine-id",
        "cat /etc/hostname",
        "is-file /etc/systemd/system/virtdeck-ssh-hostkeys.service",
    ]
    keys, mid, hostname, unit = guestfish(disk, checks)  # virtdeck's additions ran there too
    assert (keys, mid, hostname, unit) == ("false", "0", "web01", "true")
    assert hv.domain(tname).meta.sealing == ("machine-id", "ssh-host-keys")
    ok(out, 1)
    assert info(str(lab.dir / f"{lab.name('c')}.qcow2"))["full-backing-filename"] == disk


def test_template_copy_to_another_hypervisor_then_a_thin_clone_there_starts(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, tmp_path: Path
) -> None:
    """system (over qemu+ssh, from the namespace) -> the test user's session hypervisor:
    sparse streams, same bytes, read-only base, the template defined there; a thin clone
    deployed on that host starts."""
    lab = host_lab  # the ssh rig reaches the host's own daemon
    import libvirt

    from tests.lab import domain_xml
    from tui.core import domxml

    base = lab.disk("cbase.qcow2")
    write(base, 0x55)
    os.chmod(base, 0o444)
    tname = lab.name("ctpl")
    root = domxml.parse(domain_xml(tname, [(base, "qcow2")], virt_type="qemu"))
    domxml.write_meta(root, TEMPLATE)
    lab.hv.conn.defineXML(domxml.to_string(root))
    clone = lab.name("there")
    conn = libvirt.open(session_uri)
    pool = conn.storagePoolLookupByName("vdtest-pool")
    target_dir = Path(pool_target(pool.XMLDesc(0)))
    copied = target_dir / "cbase.qcow2"
    try:
        out = in_namespace(lab, ssh_root_uri, tmp_path, [
            ["template", "copy", tname, "--to", session_uri, "--dry-run"],
            ["template", "copy", tname, "--to", session_uri, "--json"],
            ["template", "copy", tname, "--to", session_uri],
        ])  # fmt: skip
        code, _, err = out["results"][2][1:]
        assert code == 1 and "already exists" in err, err  # never over what is there
        ok(out, 0)
        dry = out["results"][0][3]
        assert "sparse stream" in dry and str(copied) in dry, dry
        result = json.loads(ok(out, 1))
        assert result["template"] == tname and result["plan"]["volumes"][0]["target"] == str(copied)
        # Same bytes, holes stay holes, read-only, and the template is registered there.
        cmp = subprocess.run(["qemu-img", "compare", "-U", base, str(copied)],
                             capture_output=True, text=True)  # fmt: skip
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        st = os.stat(copied)
        assert st.st_size == os.stat(base).st_size
        assert st.st_blocks * 512 < 16 * 1024**2  # 1 MiB of data, not 64 MiB of zeroes
        assert st.st_mode & 0o777 == 0o444
        dom = conn.lookupByName(tname)
        meta = domxml.read_meta(domxml.parse(dom.XMLDesc(0)))
        assert meta.role == "template" and meta.sealed
        assert dom.UUIDString() != lab.hv.lookup(tname).UUIDString()
        # A thin clone deployed on that host starts.
        proc = subprocess.run([sys.executable, "-m", "tui", "-c", session_uri, "clone", tname,
                               clone, "--start"], capture_output=True, text=True,
                              cwd=REPO, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert conn.lookupByName(clone).isActive()
        assert info(str(target_dir / f"{clone}.qcow2"))["full-backing-filename"] == str(copied)
    finally:
        for name in (clone, tname):
            try:
                d = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if d.isActive():
                d.destroy()
            d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name() in ("cbase.qcow2", f"{clone}.qcow2"):
                if vol.name() == "cbase.qcow2":
                    os.chmod(copied, 0o644)
                vol.delete(0)
        conn.close()


def pool_target(xml: str) -> str:
    import xml.etree.ElementTree as ET

    return (ET.fromstring(xml).findtext("target/path") or "").strip()


def test_template_copy_interrupted_leaves_nothing_on_the_target(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str
) -> None:
    """An interrupt during the upload unwinds: the uploaded volume is deleted and nothing is
    defined on the target."""
    lab = host_lab  # the ssh rig reaches the host's own daemon
    import libvirt

    from tests.lab import domain_xml
    from tui.core import domxml, transfer
    from tui.core.hypervisor import Hypervisor
    from tui.core.ops import Interrupted

    base = lab.disk("ibase.qcow2")
    write(base, 0x66, "4M")
    tname = lab.name("itpl")
    root = domxml.parse(domain_xml(tname, [(base, "qcow2")], virt_type="qemu"))
    domxml.write_meta(root, TEMPLATE)
    lab.hv.conn.defineXML(domxml.to_string(root))
    source, target = Hypervisor.open(ssh_root_uri), Hypervisor.open(session_uri)
    conn = libvirt.open(session_uri)
    try:
        plan = transfer.plan_template_copy(source, target, tname)
        uploaded = plan.volumes[0].target
        seen: list[float | None] = []

        def stop(message: str, fraction: float | None) -> None:
            seen.append(fraction)
            if fraction is not None and fraction > 0:
                raise Interrupted("stopped by the test")

        with pytest.raises(Interrupted, match="undid"):
            transfer.execute_template_copy(source, target, plan, stop)
        assert seen and not Path(uploaded).exists()
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(tname)
    finally:
        conn.close()
        source.close()
        target.close()


def test_ssh_commands_share_one_connection_that_ends_by_itself(
    ssh_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """virtdeck's own SSH commands to a host share one connection (a migration runs half a
    dozen): in a directory only this user can enter, one per set of ssh options, gone by
    itself once idle; with the directory open to others or VIRTDECK_SSH_SHARED=0, each
    command connects on its own."""
    import dataclasses
    import shutil
    import stat
    import tempfile

    from tests.waiting import wait_until
    from tui.core.storage import remote

    runtime = Path(tempfile.mkdtemp(prefix="vd-", dir="/tmp"))  # (a socket path is short)
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        monkeypatch.setattr(remote, "SSH_SHARED_IDLE", 10)
        target = remote.ssh_target(ssh_rig.uri("root", "/system"))
        assert target is not None

        def client_ports(t: remote.SshTarget, n: int = 3) -> set[str]:
            ssh = remote.Ssh(t)
            return {ssh.check(["sh", "-c", "echo $SSH_CONNECTION"], "asking").split()[1]
                    for _ in range(n)}  # fmt: skip

        assert len(client_ports(target)) == 1
        sockets = runtime / f"virtdeck-ssh-{os.getuid()}"

        def live() -> list[Path]:  # the connections' sockets (beside them: their lock files)
            return [p for p in sockets.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]

        assert sockets.stat().st_mode & 0o777 == 0o700
        first = live()
        assert len(first) == 1
        # Other options (here another key file), another connection: never shared across them.
        # (The first one may have ended meanwhile, idle, on a loaded machine: look for a new one.)
        key = runtime / "key"
        shutil.copy(target.keyfile or "", key)
        assert len(client_ports(dataclasses.replace(target, keyfile=str(key)))) == 1
        assert len(set(live()) - set(first)) == 1
        # Idle, each ends by itself (SSH_SHARED_IDLE): nothing outlives virtdeck for long.
        wait_until(lambda: not live(), 60, "the shared connections end")
        # Open to others: not used. Turned off: not used.
        sockets.chmod(0o755)
        assert len(client_ports(target)) == 3 and not live()
        sockets.chmod(0o700)
        monkeypatch.setenv("VIRTDECK_SSH_SHARED", "0")
        assert len(client_ports(target)) == 3 and not live()
        # Commands at once from several threads (and processes: the lock is a file lock)
        # make one connection, and no second background ssh that would never end.
        monkeypatch.delenv("VIRTDECK_SSH_SHARED")
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            ports = set().union(*pool.map(lambda _i: client_ports(target, 1), range(6)))
        masters = subprocess.run(["pgrep", "-f", f"ControlPath={sockets}/.* -N -f"],
                                 capture_output=True, text=True).stdout.split()  # fmt: skip
        assert len(ports) == 1 and len(live()) == 1 and len(masters) == 1, (ports, masters)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
