"""virtdeck touches only image files it can prove are its to touch (real libvirt, real images).

Each test puts something next to a domain that a careless tool would destroy — a local file
named like an NBD export, a block device node, an ISO in a CD-ROM drive, a path with spaces, a
symlinked image directory, a missing chain layer — runs the file-touching commands as an
operator would (`python -m tui`, the same entry point as `virtdeck`) and checks that the
unrelated things are intact, that the VM still starts where it started before, that refusals
are one line (never a traceback), and that `rm --storage` removes exactly the domain's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import SystemLab, domain_xml, qemu_img
from tui.core import domxml
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState, VirtdeckMeta

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent


def virtdeck(
    hv: Hypervisor, *args: str, cwd: Path | None = None, check: int | None = 0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tui", "-c", hv.uri, *args],
        capture_output=True, text=True, cwd=cwd or REPO, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def refused(hv: Hypervisor, *args: str, match: str, cwd: Path | None = None) -> str:
    """The command fails with one line on stderr that says `match`."""
    proc = virtdeck(hv, *args, cwd=cwd, check=1)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("virtdeck: plan:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr
    return lines[0]


def checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def define_with(
    lab: SystemLab,
    suffix: str,
    extra_disks: str,
    *,
    first: str | None = None,
    meta: VirtdeckMeta | None = None,
) -> tuple[str, str]:
    """A lab domain with a qcow2 `vda` and extra <disk> elements; (name, vda path)."""
    name = lab.name(suffix)
    vda = first or lab.disk(f"{suffix}.qcow2")
    xml = domain_xml(name, [(vda, "qcow2")], virt_type=lab.virt_type)
    root = domxml.parse(xml.replace("</devices>", extra_disks + "</devices>"))
    if meta is not None:
        domxml.write_meta(root, meta)
    lab.hv.conn.defineXML(domxml.to_string(root))
    return name, vda


def starts(hv: Hypervisor, name: str) -> bool:
    hv.start(name)
    ok = hv.domain(name).state == DomainState.RUNNING
    hv.destroy(name)
    return ok


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


TEMPLATE = VirtdeckMeta(role="template", sealed=True, created="2026-01-01T00:00:00+00:00")


@contextlib.contextmanager
def nbd_export(image: Path, name: str, sock: Path) -> Iterator[str]:
    """qemu-nbd serving `image` as export `name` on a unix socket beside it (no network: the
    chrooted daemon has a network namespace of its own, but sees the image directory)."""
    proc = subprocess.Popen(
        ["qemu-nbd", "--persistent", "--shared=4", "-x", name, "-k", str(sock), "-f", "raw",
         str(image)],
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        os.chmod(sock, 0o666)  # QEMU runs as libvirt-qemu on the host's daemon
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(10)


def test_nbd_export_and_same_named_local_file(lab: SystemLab, tmp_path: Path) -> None:
    hv = lab.hv
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    victim = cwd / "victim"
    victim.write_text("an operator's unrelated file\n")
    os.chmod(victim, 0o640)
    export = lab.dir / "export.raw"
    qemu_img("create", "-q", "-f", "raw", str(export), "16M")
    with nbd_export(export, "victim", lab.dir / "nbd.sock") as sock:
        nbd = (
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            f"<source protocol='nbd' name='victim'><host transport='unix' socket='{sock}'/>"
            "</source><target dev='vdb' bus='virtio'/></disk>"
        )
        name, vda = define_with(lab, "nbd", nbd)
        assert starts(hv, name)
        refused(hv, "template", "create", name, "--no-seal", "--backup-dir",
                str(lab.dir / "b"), match="vdb", cwd=cwd)  # fmt: skip
        refused(hv, "snapshot", "create", name, "s1", "--external",
                match=f"network disk nbd://{sock}/victim", cwd=cwd)  # fmt: skip
        tname, _ = define_with(lab, "tnbd", nbd, meta=TEMPLATE)
        refused(hv, "clone", tname, lab.name("x"), match="network disk", cwd=cwd)
        refused(hv, "clone", tname, lab.name("x"), "--full", match="network disk", cwd=cwd)
        assert not hv.exists(lab.name("x"))
        assert starts(hv, name)  # it started before; it starts after the refusals
        proc = virtdeck(hv, "rm", name, "--storage", cwd=cwd)
    assert f"keep vdb: network disk nbd://{sock}/victim" in proc.stderr
    assert proc.stdout.strip() == f"{name}: removed (deleted {vda})"
    assert victim.read_text() == "an operator's unrelated file\n"
    assert victim.stat().st_mode & 0o777 == 0o640 and export.exists()


@pytest.fixture
def loop_device(lab: SystemLab) -> Iterator[str]:
    backing = lab.dir / "loop.raw"
    qemu_img("create", "-q", "-f", "raw", str(backing), "32M")
    with open(backing, "r+b") as fh:
        fh.write(b"block device content\n")
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_is_shown_never_written(lab: SystemLab, loop_device: str) -> None:
    hv = lab.hv
    node = os.stat(loop_device)
    content = checksum(loop_device)
    block = (
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        f"<source dev='{loop_device}'/><target dev='vdb' bus='virtio'/></disk>"
    )
    name, vda = define_with(lab, "blk", block)
    assert starts(hv, name)
    refused(hv, "template", "create", name, "--no-seal", "--backup-dir", str(lab.dir / "b"),
            match=f"block device {loop_device}")  # fmt: skip
    refused(hv, "snapshot", "create", name, "s1", "--external", match="block device")
    assert starts(hv, name)
    assert hv.xml(name, inactive=True).count(loop_device) == 1  # never rewritten as a file
    tname, _ = define_with(lab, "tblk", block, meta=TEMPLATE)
    refused(hv, "clone", tname, lab.name("y"), match=f"block device {loop_device}")
    proc = virtdeck(hv, "rm", name, "--storage")
    assert f"keep vdb: block device {loop_device}" in proc.stderr
    assert not os.path.exists(vda)
    after = os.stat(loop_device)
    assert (after.st_mode, after.st_rdev) == (node.st_mode, node.st_rdev)
    assert checksum(loop_device) == content


def test_cdrom_media_is_shared_and_kept(lab: SystemLab) -> None:
    hv = lab.hv
    iso = lab.dir / "install.iso"
    iso.write_bytes(b"CD001" * 20000)
    before = checksum(iso)
    cdroms = (
        f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
        f"<source file='{iso}'/><target dev='hdc' bus='ide'/><readonly/></disk>"
        "<disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>"
    )
    vm, vda = define_with(lab, "cd", cdroms)
    assert starts(hv, vm)
    backups = str(lab.dir / "backups")
    virtdeck(hv, "template", "create", vm, "--no-seal", "--name", lab.name("tcd"),
             "--backup-dir", backups)  # fmt: skip
    tname = lab.name("tcd")
    assert os.stat(vda).st_mode & 0o222 == 0 and os.stat(iso).st_mode & 0o200  # ISO untouched
    virtdeck(hv, "clone", tname, lab.name("thin"), "--allow-unsealed", "--start",
             "--backup-dir", backups)  # fmt: skip
    virtdeck(hv, "clone", tname, lab.name("full"), "--full", "--allow-unsealed",
             "--backup-dir", backups)  # fmt: skip
    for clone in (lab.name("thin"), lab.name("full")):
        disks = {d.target: d for d in hv.domain(clone).disks}
        assert disks["hdc"].path == str(iso) and disks["hdc"].readonly
        assert disks["hdd"].path is None
    assert starts(hv, lab.name("full"))
    hv.destroy(lab.name("thin"))
    for clone in (lab.name("thin"), lab.name("full")):
        proc = virtdeck(hv, "rm", clone, "--storage", "--backup-dir", backups)
        assert f"keep hdc: cdrom file {iso}" in proc.stderr and str(iso) not in proc.stdout
    virtdeck(hv, "rm", tname, "--storage", "--backup-dir", backups)
    assert not os.path.exists(vda) and checksum(iso) == before


def test_path_with_spaces_through_every_command(lab: SystemLab) -> None:
    hv = lab.hv
    spaced = lab.dir / "with space"
    spaced.mkdir()
    raw = spaced / "db disk.img"
    qemu_img("create", "-q", "-f", "raw", str(raw), "32M")
    name = lab.name("spc")
    hv.conn.defineXML(domain_xml(name, [(str(raw), "raw")], virt_type=lab.virt_type))
    before = listing(lab.dir)
    virtdeck(hv, "snapshot", "create", name, "s1", "--external")
    virtdeck(hv, "snapshot", "create", name, "s2", "--external")
    virtdeck(hv, "snapshot", "revert", name, "s1")
    virtdeck(hv, "snapshot", "delete", name, "s2")
    assert starts(hv, name)
    backups = str(lab.dir / "backups")
    tname = lab.name("tspc")
    virtdeck(hv, "snapshot", "delete", name, "s1")
    virtdeck(hv, "template", "create", name, "--no-seal", "--name", tname,
             "--backup-dir", backups)  # fmt: skip
    for flag in ((), ("--full",)):
        virtdeck(hv, "clone", tname, lab.name("c" + "".join(flag)), *flag,
                 "--allow-unsealed", "--backup-dir", backups)  # fmt: skip
        assert starts(hv, lab.name("c" + "".join(flag)))
        virtdeck(hv, "rm", lab.name("c" + "".join(flag)), "--storage", "--backup-dir", backups)
    virtdeck(hv, "rm", tname, "--storage", "--backup-dir", backups)
    assert listing(lab.dir) - {"backups"} == before - {"with space/db disk.img"}


def test_symlinked_image_directory_is_one_place(lab: SystemLab) -> None:
    hv = lab.hv
    real = lab.dir / "real"
    real.mkdir()
    link = lab.dir / "link"
    link.symlink_to(real)
    qemu_img("create", "-q", "-f", "qcow2", str(real / "base.qcow2"), "32M")
    name = lab.name("sym")
    hv.conn.defineXML(
        domain_xml(name, [(str(link / "base.qcow2"), "qcow2")], virt_type=lab.virt_type)
    )
    backups = str(lab.dir / "backups")
    tname = lab.name("tsym")
    virtdeck(hv, "template", "create", name, "--no-seal", "--name", tname,
             "--backup-dir", backups)  # fmt: skip
    assert os.stat(real / "base.qcow2").st_mode & 0o222 == 0
    clone = lab.name("csym")
    virtdeck(hv, "clone", tname, clone, "--dir", str(real), "--allow-unsealed",
             "--backup-dir", backups)  # fmt: skip
    refused(hv, "rm", tname, "--storage", "--backup-dir", backups, match=clone)
    listed = json.loads(virtdeck(hv, "template", "ls", "--json", "--backup-dir", backups).stdout)
    assert [t["thin_clones"] for t in listed if t["name"] == tname] == [[clone]]
    usage = json.loads(virtdeck(hv, "usage", "--json").stdout)
    # (only this lab's: another run on the same daemon may have a base.qcow2 of its own)
    mine = [i["path"] for i in usage["images"] if i["path"].startswith(f"{lab.dir}/")]
    paths = [p for p in mine if p.endswith("/base.qcow2")]
    assert paths == [str(real / "base.qcow2")]  # one identity, counted once
    virtdeck(hv, "rm", clone, "--storage", "--backup-dir", backups)
    virtdeck(hv, "rm", tname, "--storage", "--backup-dir", backups)
    assert not list(real.iterdir()) and link.is_symlink()


def test_missing_layer_directory_and_broken_image_never_traceback(lab: SystemLab) -> None:
    hv = lab.hv
    backups = str(lab.dir / "backups")
    gone = lab.disk("gone.qcow2")
    top = str(lab.dir / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", gone, top)
    os.unlink(gone)
    vm, _ = define_with(lab, "miss", "", first=top)
    refused(hv, "template", "create", vm, "--no-seal", "--backup-dir", backups, match=gone)
    tname, _ = define_with(lab, "tmiss", "", first=top, meta=TEMPLATE)
    for extra in ((), ("--full",)):
        refused(hv, "clone", tname, lab.name("m"), *extra, match=gone)
        assert not hv.exists(lab.name("m")) and not (lab.dir / f"{lab.name('m')}.qcow2").exists()
    adir = lab.dir / "adir.qcow2"
    adir.mkdir()
    dvm, _ = define_with(lab, "dir", "", first=str(adir))
    refused(hv, "template", "create", dvm, "--no-seal", "--backup-dir", backups,
            match="is a directory")  # fmt: skip
    broken = lab.dir / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 65532)
    bname, _ = define_with(lab, "tbroken", "", first=str(broken), meta=TEMPLATE)
    listed = {t["name"]: t for t in json.loads(
        virtdeck(hv, "template", "ls", "--json", "--backup-dir", backups).stdout)}  # fmt: skip
    assert listed[bname]["virtual_bytes"] is None and listed[bname]["problems"]
    assert listed[tname]["base_images"][0]["problem"]  # its missing layer, named
    usage = json.loads(virtdeck(hv, "usage", "--json").stdout)
    img = next(i for i in usage["images"] if i["path"] == str(broken))
    assert img["actual_bytes"] is None and img["reason"]
    proc = virtdeck(hv, "rm", dvm, "--storage")
    assert adir.is_dir() and "deleted" not in proc.stdout  # a directory is never deleted
    refused(hv, "rm", vm, "--storage", match=f"depend on its image(s): {tname}")  # same file
    virtdeck(hv, "rm", vm)  # only undefined: nothing another domain reads is touched
    assert os.path.exists(top)
    virtdeck(hv, "rm", tname, "--storage", "--backup-dir", backups)
    assert not os.path.exists(top)


def test_snapshot_ls_json_shows_a_lost_file_as_unknown(lab: SystemLab) -> None:
    hv = lab.hv
    name = lab.define("lost")
    hv.start(name)
    virtdeck(hv, "snapshot", "create", name, "s1", "--external")
    hv.destroy(name)
    mem = next(f for f in lab.dir.iterdir() if f.name.endswith(".mem"))
    mem.unlink()
    nodes = json.loads(virtdeck(hv, "snapshot", "ls", name, "--json").stdout)
    files = {f["role"]: f for f in nodes[0]["files"]}
    assert files["memory"]["size_bytes"] is None and "no such file" in files["memory"]["problem"]
    assert files["disk vda"]["size_bytes"] is not None


# -- issue 14: rm --storage after external snapshots and a revert --------------------------


@pytest.mark.parametrize("mode", ["thin", "full"])
def test_rm_storage_after_snapshots_and_revert_removes_every_own_file(
    lab: SystemLab, mode: str
) -> None:
    hv = lab.hv
    backups = str(lab.dir / "backups")
    base = lab.disk("base.qcow2")
    vm = lab.define("tpl", disks=[(base, "qcow2")])
    tname = lab.name("t")
    virtdeck(hv, "template", "create", vm, "--no-seal", "--name", tname,
             "--backup-dir", backups)  # fmt: skip
    base_sum = checksum(base)
    # Another domain with internal snapshots beside it, which must keep all its files.
    other = lab.define("other")
    other_files = {f for f in listing(lab.dir) if f.startswith(lab.name("other"))}
    virtdeck(hv, "snapshot", "create", other, "i1")
    virtdeck(hv, "snapshot", "create", other, "i2")
    before = listing(lab.dir)
    x = lab.name("x")
    virtdeck(hv, "clone", tname, x, "--allow-unsealed", "--backup-dir", backups,
             *(["--full"] if mode == "full" else []))  # fmt: skip
    virtdeck(hv, "snapshot", "create", x, "a", "--external")
    virtdeck(hv, "snapshot", "create", x, "b", "--external")
    time.sleep(1.1)  # libvirt >= 9.9 names a revert's overlay by the second
    virtdeck(hv, "snapshot", "revert", x, "a")
    existing = {str(lab.dir / f) for f in listing(lab.dir)}
    proc = virtdeck(hv, "rm", x, "--storage", "--backup-dir", backups)
    deleted = proc.stdout.strip().split("(deleted ", 1)[1].rstrip(")").split(", ")
    assert deleted and set(deleted) <= existing  # never claims a file that did not exist
    assert listing(lab.dir) == before  # no file of x remains
    assert checksum(base) == base_sum
    assert other_files <= listing(lab.dir) and hv.exists(other)
    assert not hv.exists(x)


# -- another host: nothing local is ever touched ----------------------------------------------

NAMESPACE_SCRIPT = r"""
import hashlib, json, os, subprocess, sys
lab, uri, repo, commands = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
names = json.loads(sys.argv[5])
# This client's view of the image directory: a tmpfs with decoys at the very same paths.
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", lab], check=True)
for name in names:
    with open(os.path.join(lab, name), "w") as fh:
        fh.write("decoy " + name * 100)
def sums():
    out = {}
    for name in names:
        with open(os.path.join(lab, name), "rb") as fh:
            out[name] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(fh.fileno()).st_mode)
    return out
before = sums()
results = []
for argv in commands:
    p = subprocess.run([sys.executable, "-m", "tui", "-c", uri, *argv], cwd=repo,
                       capture_output=True, text=True, timeout=600)  # virt-sysprep, TCG, loaded
    results.append([argv, p.returncode, p.stdout, p.stderr])
print(json.dumps({"results": results, "unchanged": sums() == before,
                  "listing": sorted(os.listdir(lab)) == sorted(names)}))
"""


def test_remote_host_commands_touch_no_local_file(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """The daemon (reached over qemu+ssh, so another host as far as virtdeck can prove) sees
    the real images; the client runs in a private mount namespace where the same paths hold
    decoys. Every command works through the host's storage pools (and SSH for what libvirt
    cannot do), no decoy changes, and the real files show the work on the host's side."""

    lab = host_lab  # the ssh rig reaches the host's own daemon
    hv = lab.hv
    base = lab.disk("base.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", base], check=True,
                   capture_output=True)  # fmt: skip
    tname, _ = define_with(lab, "tr", "", first=base, meta=TEMPLATE)
    clone = lab.name("cr")
    virtdeck(hv, "clone", tname, clone, "--allow-unsealed")
    vm = lab.define("vr")
    vm_disk = str(lab.dir / "vr.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 0x22 0 1M", vm_disk], check=True,
                   capture_output=True)  # fmt: skip
    virtdeck(hv, "snapshot", "create", vm, "s1", "--external")
    names = sorted(p.name for p in lab.dir.iterdir() if p.is_file())
    commands = [
        ["rm", clone, "--storage"],
        ["clone", tname, lab.name("x1"), "--allow-unsealed"],
        ["clone", tname, lab.name("x2"), "--full", "--allow-unsealed"],
        ["snapshot", "revert", vm, "s1"],
        ["snapshot", "delete", vm, "s1"],
        ["template", "create", vm, "--name", vm, "--no-seal", "--backup-dir",
         str(tmp_path / "b")],
        ["template", "ls", "--json", "--backup-dir", str(tmp_path / "b")],
        ["usage", "--json"],
        ["snapshot", "ls", vm, "--json"],
    ]  # fmt: skip
    script = tmp_path / "ns.py"
    script.write_text(NAMESPACE_SCRIPT)
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, str(script),
         str(lab.dir), ssh_root_uri, str(REPO), json.dumps(commands), json.dumps(names)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["unchanged"] and out["listing"]
    for argv, code, _stdout, err in out["results"]:
        assert code == 0 and "Traceback" not in err, (argv, err)
    results = {" ".join(argv[:2]): stdout for argv, _code, stdout, _err in out["results"]}
    templates = json.loads(results["template ls"])
    mine = next(t for t in templates if t["name"] == tname)
    assert mine["virtual_bytes"] == 64 * 1024**2 and not mine["problems"]
    assert lab.name("x1") in mine["thin_clones"]
    usage = json.loads(results["usage --json"])
    real = next(i for i in usage["images"] if i["path"] == base)
    facts = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", base],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert real["actual_bytes"] == facts["actual-size"]  # fmt: skip
    # Outside the namespace: the host's files show the work.
    assert not hv.exists(clone) and not (lab.dir / f"{clone}.qcow2").exists()
    assert hv.exists(lab.name("x1")) and hv.exists(lab.name("x2"))
    assert stat.S_IMODE(os.stat(vm_disk).st_mode) == 0o444  # the new template's base
    assert hv.domain(vm).is_template
    for path, pattern in ((base, 0x11), (str(lab.dir / f"{lab.name('x2')}.qcow2"), 0x11),
                          (vm_disk, 0x22)):  # fmt: skip
        read = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} 0 1M", path],
                              capture_output=True, text=True)  # fmt: skip
        assert read.returncode == 0 and "verification failed" not in read.stdout, path
