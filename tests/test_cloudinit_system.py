"""The seed `virtdeck clone --identity cloud-init` gives, read by a real cloud-init (the
cloud image of tests/guest.py).

One clone boots under TCG (to the end of cloud-init) on a qcow2 overlay in the lab
directory, with its seed ISO as a read-only CD-ROM; user-mode networking, so the static
address the seed gives is configured inside the guest and nothing here sends it a packet.
Everything is read through the guest agent.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab
from tests.test_cloudimage import _served as served
from tui.core.hypervisor import Hypervisor

pytestmark = pytest.mark.system

KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    "vdtest@cloudinit"
)


# cloud-init's first boot of the three clones at once: beside six busy loops each in a session
# of its own, each QEMU got a tenth of a core and the first had not finished in 900 s (the
# guest's agent answered; cloud-init was still running): a failure detector, not a speed check.
CLOUD_INIT_DEADLINE = 1800.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.timeout(3600)  # three TCG boots at once, on a loaded machine too (CLOUD_INIT_DEADLINE)
def test_real_cloud_init_takes_the_seed_virtdeck_clone_gives(
    host_hv: Hypervisor, tmp_path: Path
) -> None:
    """`virtdeck template import URL` of the cloud image (served on 127.0.0.1, checksum
    given; from a file too, and with a wrong checksum nothing is left), then `virtdeck
    clone` of it (seeds by default: an imported cloud image): the clone boots, cloud-init
    reads its seed (NoCloud, /dev/sr0) and gives it the hostname, the key, the first-boot
    command, the static address; three clones at once, each with its own machine-id and
    host keys."""
    image = guest.build_cloud()  # ~9 min the first time on a machine, then cached
    before = _sha256(image)
    key = tmp_path / "k.pub"
    key.write_text(KEY + "\n")
    own = tmp_path / "user-data"
    own.write_text("#cloud-config\nlocale: false\n")  # the image has no locales package
    lab = SystemLab(host_hv)
    try:
        tpl = lab.name("tpl")
        with served(image.parent) as base:
            proc = subprocess.run(
                [sys.executable, "-m", "tui", "-c", host_hv.uri, "template", "import",
                 f"{base}/{image.name}", "--name", tpl, "--dir", str(lab.dir), "--checksum",
                 f"sha256:{before}", "--virt-type", "qemu", "--memory", "512",
                 "--backup-dir", str(tmp_path)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        # the same image from a file: a template too; with a wrong checksum: nothing at all
        files = set(lab.dir.iterdir())
        for tname, checksum in ((lab.name("bad"), "0" * 64), (lab.name("file"), before)):
            proc = subprocess.run(
                [sys.executable, "-m", "tui", "-c", host_hv.uri, "template", "import",
                 str(image), "--name", tname, "--dir", str(lab.dir), "--checksum",
                 f"sha256:{checksum}", "--virt-type", "qemu", "--backup-dir", str(tmp_path)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            if checksum != before:
                assert proc.returncode == 1 and "nothing was kept" in proc.stderr, proc.stderr
                assert f"its sha256 is sha256:{before}" in proc.stderr
                assert not host_hv.exists(tname) and set(lab.dir.iterdir()) == files
            else:
                assert proc.returncode == 0, proc.stderr
                assert host_hv.domain(tname).is_template
        name = lab.name("web")
        proc = subprocess.run(
            [sys.executable, "-m", "tui", "-c", host_hv.uri, "clone", tpl, name,
             "--count", "3", "--identity", "cloud-init", "--ssh-key", str(key),
             "--first-boot", "echo ran > /root/first-boot", "--user-data", str(own),
             "--ip", "10.99.0.10/24+", "--gateway", "10.99.0.1", "--dns", "10.99.0.2",
             "--start", "--backup-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        machine_ids, host_keys = set(), set()
        for n in (1, 2, 3):  # booting together under TCG
            clone = f"{name}-{n}"
            dom = host_hv.conn.lookupByName(clone)
            status, out = guest.agent_run(
                dom, "cloud-init status --wait --long", timeout=CLOUD_INIT_DEADLINE
            )
            assert "status: done" in out, out
            assert "DataSourceNoCloud" in out and "/dev/sr0" in out, out
            assert guest.agent_run(dom, "hostname")[1].strip() == clone
            keys = guest.agent_run(dom, "cat /root/.ssh/authorized_keys")[1]
            assert KEY in keys
            assert guest.agent_run(dom, "cat /root/first-boot")[1].strip() == "ran"
            addr = guest.agent_run(dom, "ip -4 -o addr show")[1]
            assert f"10.99.0.{9 + n}/24" in addr, addr
            machine_id = guest.agent_run(dom, "cat /etc/machine-id")[1].strip()
            assert len(machine_id) == 32
            machine_ids.add(machine_id)
            # cloud-init made this instance's host keys
            host_keys.add(guest.agent_run(dom, "cat /etc/ssh/ssh_host_ed25519_key.pub")[1])
            dom.destroy()  # the next ones boot faster
        assert len(machine_ids) == 3 and len(host_keys) == 3, (machine_ids, host_keys)
    finally:
        lab.cleanup()
    assert _sha256(image) == before
