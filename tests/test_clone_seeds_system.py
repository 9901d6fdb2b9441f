"""Clones with cloud-init seeds on real daemons (issue 22): the seed, 0600 and holding the
clone's identity, is a CD-ROM QEMU opens when the clone starts (libvirt hands it to QEMU's
user); `rm --storage` deletes it with the clone's overlay; SIGTERM in the middle of a deploy
leaves no seed, overlay or domain."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab import SystemLab
from tests.test_bases_system import REPO, cli, make_template
from tui.core import cloudinit, domxml

pytestmark = pytest.mark.system


def _key(tmp_path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "seed@test", "-f",
                    str(tmp_path / "id")], check=True)  # fmt: skip
    return tmp_path / "id.pub"


def test_seeded_clones_start_with_their_seed_and_rm_storage_removes_it(
    lab: SystemLab, tmp_path: Path
) -> None:
    uri = lab.hv.uri
    t, _base = make_template(lab, tmp_path)
    key = _key(tmp_path)
    name = lab.name("c")
    r = cli(uri, "clone", t, name, "--count", "2", "--allow-unsealed", "--identity",
            "cloud-init", "--ssh-key", str(key), "--ip", "10.99.0.10/24+", "--start",
            "--backup-dir", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    for n in (1, 2):
        clone = f"{name}-{n}"
        seed = lab.dir / f"{clone}-seed.iso"
        dom = lab.hv.conn.lookupByName(clone)
        assert dom.isActive(), clone
        live = domxml.parse(dom.XMLDesc(0))
        sources = [s.get("file") for s in live.findall("devices/disk[@device='cdrom']/source")]
        assert sources == [str(seed)]  # QEMU opened it
        files = cloudinit.read_iso(seed.read_bytes())
        meta = json.loads(files["meta-data"])
        assert meta["local-hostname"] == clone
        assert key.read_text().split()[1] in files["user-data"]
        assert f"10.99.0.{9 + n}/24" in files["network-config"]
        dom.destroy()
    seed = lab.dir / f"{name}-1-seed.iso"
    assert stat.S_IMODE(os.stat(seed).st_mode) == 0o600
    r = cli(uri, "rm", f"{name}-1", "--storage")
    assert r.returncode == 0, r.stderr
    assert not seed.exists() and not (lab.dir / f"{name}-1.qcow2").exists()
    assert (lab.dir / f"{name}-2-seed.iso").exists()


def test_sigterm_in_the_middle_of_a_seeded_deploy_leaves_nothing(
    lab: SystemLab, tmp_path: Path
) -> None:
    uri = lab.hv.uri
    t, _base = make_template(lab, tmp_path)
    name = lab.name("s")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui", "-c", uri, "clone", t, name, "--count", "40",
         "--allow-unsealed", "--identity", "cloud-init", "--backup-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(lab.dir.glob(f"{name}-*-seed.iso")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and proc.returncode != 0, err
    left = sorted(p.name for p in lab.dir.iterdir() if p.name.startswith(name))
    assert left == [], left
    assert not [d.name() for d in lab.hv.conn.listAllDomains(0) if d.name().startswith(name)]


def test_seeds_on_a_remote_host_are_uploaded_as_volumes(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """Over qemu+ssh from a private mount namespace (decoys over the lab directory): the seed
    is a volume of the host's pool, written by libvirt; nothing local is touched; rm
    --storage removes it there."""
    from tests.test_remote_system import TEMPLATE, define_with, in_namespace, ok, write

    lab = host_lab
    base = lab.disk("base.qcow2")
    write(base, 0x11)
    os.chmod(base, 0o444)
    tname, _ = define_with(lab, "tpl", "", first=base, meta=TEMPLATE)
    key = _key(tmp_path)
    name = lab.name("r")
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["clone", tname, name, "--identity", "cloud-init", "--ssh-key", str(key)],
        ["rm", name, "--storage"],
    ])  # fmt: skip
    ok(out, 0)
    seed = lab.dir / f"{name}-seed.iso"
    assert not lab.hv.exists(name) and not seed.exists()  # made there, then removed there
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["clone", tname, name, "--identity", "cloud-init", "--ssh-key", str(key)],
    ])  # fmt: skip
    ok(out, 0)
    files = cloudinit.read_iso(seed.read_bytes())
    assert json.loads(files["meta-data"])["local-hostname"] == name
    assert key.read_text().split()[1] in files["user-data"]


def test_import_to_a_remote_host_uploads_a_checked_copy(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """`template import FILE` over qemu+ssh from a private mount namespace: the image lands
    as a volume of the host's pool (the client's view of that directory is a decoy), the
    template's clone gets a seed there by default; an image naming a backing file is
    refused before anything is uploaded."""
    from tests.lab import qemu_img
    from tests.test_remote_system import in_namespace, ok

    lab = host_lab
    src = tmp_path / "cloud.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "64M")
    tricky = tmp_path / "tricky.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(src), str(tricky))
    t, bad = lab.name("imp"), lab.name("bad")
    out = in_namespace(lab, ssh_root_uri, tmp_path, [
        ["template", "import", str(src), "--name", t, "--dir", str(lab.dir),
         "--virt-type", "qemu", "--backup-dir", str(tmp_path / "b")],
        ["clone", t, lab.name("c")],
        ["template", "import", str(tricky), "--name", bad, "--dir", str(lab.dir)],
    ])  # fmt: skip
    ok(out, 0)
    ok(out, 1)
    placed = lab.dir / f"{t}.qcow2"
    assert placed.read_bytes() == src.read_bytes() and not os.stat(placed).st_mode & 0o222
    assert (lab.dir / f"{lab.name('c')}-seed.iso").exists()
    code, _out, err = out["results"][2][1:]
    assert code == 1 and "names a backing file" in err, err
    assert not (lab.dir / f"{bad}.qcow2").exists() and not lab.hv.exists(bad)
