"""A seed from tui.core.cloudinit read by a real cloud-init (the cloud image of tests/guest.py).

One guest boots under TCG (the end of cloud-init) on a qcow2 overlay in the lab
directory, with its seed ISO as a read-only CD-ROM; user-mode networking, so the static
address the seed gives is configured inside the guest and nothing here sends it a packet.
Everything is read through the guest agent.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab, qemu_img
from tui.core import cloudinit
from tui.core.cloudinit import Network, Seed
from tui.core.hypervisor import Hypervisor
from tui.core.identity import read_ssh_keys

pytestmark = pytest.mark.system

KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    "vdtest@cloudinit"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.timeout(600)
def test_real_cloud_init_takes_the_seed(host_hv: Hypervisor, tmp_path: Path) -> None:
    image = guest.build_cloud()  # ~9 min the first time on a machine, then cached
    before = _sha256(image)
    key = tmp_path / "k.pub"
    key.write_text(KEY + "\n")
    lab = SystemLab(host_hv)
    try:
        name = lab.name("ci")
        overlay = lab.dir / "root.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay))
        mac = "52:54:00:" + ":".join(secrets.token_hex(1) for _ in range(3))
        seed = Seed(
            "web-1",
            ssh_keys=read_ssh_keys(key),
            first_boot=("echo ran > /root/first-boot",),
            network=Network("10.99.0.10/24", "10.99.0.1", ("10.99.0.2",)),
            mac=mac,
            # The operator's own part (a MIME second part): the image has no locales package.
            user_data="#cloud-config\nlocale: false\n",
        )
        seed_path = lab.dir / "web-1-seed.iso"
        cloudinit.write_seed(seed_path, cloudinit.iso_bytes(seed))
        dom = host_hv.define(
            guest.cloud_domain_xml(name, str(overlay), seed=str(seed_path), mac=mac)
        )
        dom.create()
        status, out = guest.agent_run(dom, "cloud-init status --wait --long", timeout=420)
        assert "status: done" in out, out
        assert "DataSourceNoCloud" in out and "/dev/sr0" in out, out
        assert guest.agent_run(dom, "hostname")[1].strip() == "web-1"
        keys = guest.agent_run(dom, "cat /root/.ssh/authorized_keys")[1]
        assert KEY in keys
        assert guest.agent_run(dom, "cat /root/first-boot")[1].strip() == "ran"
        addr = guest.agent_run(dom, "ip -4 -o addr show")[1]
        assert "10.99.0.10/24" in addr, addr
        machine_id = guest.agent_run(dom, "cat /etc/machine-id")[1].strip()
        assert len(machine_id) == 32
        host_keys = guest.agent_run(dom, "ls /etc/ssh/ssh_host_ed25519_key.pub")[0]
        assert host_keys == 0  # cloud-init made this instance's host keys
    finally:
        lab.cleanup()
    assert _sha256(image) == before
