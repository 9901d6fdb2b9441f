"""Clones with their own identity on the host's daemon, in a real Debian guest's disk.

The template is the test guest (tests/guest.py) on an overlay, marked sealed (sealing itself
is tested in test_templates_system; here it would only add another 30 s of TCG). Each
virt-customize run boots libguestfs' appliance under TCG (about 40 s), so this file runs two
parallel batches and reads every result back with one read-only guestfish.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab, domain_xml, qemu_img
from tui.cli import main
from tui.core import domxml
from tui.core.models import VirtdeckMeta

pytestmark = pytest.mark.system

SEALED = VirtdeckMeta(
    role="template", sealed=True, operations=("machine-id",), created="2026-01-01T00:00:00+00:00"
)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def guest_template(lab: SystemLab, suffix: str) -> tuple[str, str]:
    """A shut-off template on an overlay of the test guest's disk; (name, its base image)."""
    image = guest.build()
    name = lab.name(suffix)
    base = str(lab.dir / f"{suffix}.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), base)
    root = domxml.parse(guest.domain_xml(name, image, base))
    domxml.write_meta(root, SEALED)
    lab.hv.conn.defineXML(domxml.to_string(root))
    os.chmod(base, 0o444)  # a template's base is read-only, as virtdeck leaves it
    return name, base


def guestfish_cat(disks: list[str], files: list[str]) -> list[list[str]]:
    """Each file of each disk (a whole-disk ext4 filesystem), read in one read-only appliance."""
    script = []
    for i in range(len(disks)):
        script += [f"mount-ro /dev/sd{chr(ord('a') + i)} /"]
        script += [f"echo ==={i}:{f}===\ncat {f}" for f in files]
        script += ["umount /"]
    argv = ["guestfish", "--ro"]
    for d in disks:
        argv += ["--format=qcow2", "-a", d]
    done = subprocess.run(
        argv, input="run\n" + "\n".join(script) + "\n", capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    out: list[list[str]] = [[] for _ in disks]
    current: list[str] = []
    for line in done.stdout.splitlines():
        if line.startswith("===") and line.endswith("==="):
            i = int(line[3:].split(":")[0])
            out[i].append("")
            current = out[i]
        elif current:
            current[-1] += line + "\n"
    return out


@pytest.mark.timeout(900)  # three virt-customize runs under TCG, on a loaded machine too
def test_three_clones_get_their_hostname_and_key_the_base_is_unchanged(
    host_lab: SystemLab, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lab = host_lab
    tname, base = guest_template(lab, "tid")
    before = sha256(base), sha256(guest.build().disk)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@virtdeck-test",
         "-f", str(tmp_path / "k")], check=True)  # fmt: skip
    key = (tmp_path / "k.pub").read_text().strip()
    web = lab.name("web")
    rc = main(["-c", lab.hv.uri, "clone", tname, web, "--count", "3",
               "--ssh-key", str(tmp_path / "k.pub")])  # fmt: skip
    err = capfd.readouterr().err
    assert rc == 0, err
    for n in (1, 2, 3):  # the plan said what each clone gets, then each was customised
        assert f"identity: hostname {web}-{n}; ssh key for root (ed25519 ops@virtdeck-test)" in err
        assert f"virtdeck: {web}-{n}: customised in " in err
    disks = [str(lab.dir / f"{web}-{n}.qcow2") for n in (1, 2, 3)]
    found = guestfish_cat(disks, ["/etc/hostname", "/root/.ssh/authorized_keys"])
    for n, (hostname, keys) in enumerate(found, 1):
        assert hostname.strip() == f"{web}-{n}"
        assert key in keys.splitlines()
    assert (sha256(base), sha256(guest.build().disk)) == before
    for n in (1, 2, 3):
        meta = lab.hv.domain(f"{web}-{n}").meta
        assert meta.role == "clone" and meta.complete


def test_a_failed_customisation_rolls_back_every_clone(
    host_lab: SystemLab, capfd: pytest.CaptureFixture[str]
) -> None:
    lab = host_lab
    # A blank disk has no OS: virt-customize refuses it after its appliance started.
    tname = lab.name("tblank")
    xml = domain_xml(tname, [(lab.disk("tblank.qcow2"), "qcow2")], virt_type=lab.virt_type)
    root = domxml.parse(xml)
    domxml.write_meta(root, VirtdeckMeta(role="template", sealed=False))
    lab.hv.conn.defineXML(domxml.to_string(root))
    before = sorted(p.name for p in lab.dir.iterdir())
    rc = main(["-c", lab.hv.uri, "clone", tname, lab.name("bad"), "--count", "2",
               "--allow-unsealed", "--first-boot", "touch /first-boot-ran"])  # fmt: skip
    err = capfd.readouterr().err
    assert rc == 1, err
    assert "customising" in err and "failed" in err and "Traceback" not in err
    assert sorted(p.name for p in lab.dir.iterdir()) == before
    names = {d.name for d in lab.hv.domains()}
    assert not {lab.name("bad-1"), lab.name("bad-2")} & names
    # No appliance outlives the operation (libguestfs' recovery fork of a killed
    # virt-customize ends its qemu, then itself, within moments).
    deadline = time.monotonic() + 30
    while (left := pgrep(f"virt-customize.*{lab.prefix}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left


def pgrep(pattern: str) -> list[str]:
    """Command lines of the processes matching `pattern` (a regular expression)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        if re.search(pattern, text):
            found.append(text)
    return found


def test_an_interrupt_during_customisation_ends_it_and_undoes_the_clones(
    host_lab: SystemLab, tmp_path: Path
) -> None:
    """SIGTERM to the command's process group while virt-customize runs for two clones."""
    from tests.test_interrupts_system import Runner, wait_until

    lab = host_lab
    tname, base = guest_template(lab, "tint")
    before = sha256(base), sorted(p.name for p in lab.dir.iterdir())
    runner = Runner(lab, tmp_path / "state")
    proc = runner.start("clone", tname, lab.name("int"), "--count", "2", "--first-boot", "true")
    mine = f"virt-customize.*{lab.prefix}"
    assert wait_until(lambda: bool(pgrep(mine)), proc), proc.communicate()
    time.sleep(1.0)  # inside the appliance's start
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in err.splitlines()[-1], err
    assert not {lab.name("int-1"), lab.name("int-2")} & {d.name for d in lab.hv.domains()}
    assert (sha256(base), sorted(p.name for p in lab.dir.iterdir())) == before
    deadline = time.monotonic() + 30
    while pgrep(mine) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pgrep(mine), "virt-customize went on alone"
    assert runner.left_journals() == []
