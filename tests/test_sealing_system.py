"""Sealing that really seals, on the real Debian guest (tests/guest.py) under TCG.

The VM is an overlay of the cached guest: an installed Debian 12 with its own machine-id,
random seed and SSH host keys, and no unit of its own that recreates host keys. virtdeck
seals it (one virt-sysprep run with the default operations), deploys two thin clones with
per-clone identity (a hostname and an SSH key: virt-customize) and one full clone without,
and boots the three at once. Everything is read inside the clones through the guest agent.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab, qemu_img
from tests.test_identity_system import sha256
from tui.cli import main
from tui.core import sealing
from tui.core.templates import execute_template, plan_template

pytestmark = [pytest.mark.system, pytest.mark.sysprep]


def read_base(base: str) -> list[str]:
    """What sealing left in the base, read by one read-only appliance (one line per command)."""
    commands = [
        "filesize /etc/machine-id",
        "exists /var/lib/systemd/random-seed",
        "exists /etc/ssh/ssh_host_ed25519_key",
        f"is-file {sealing.UNIT_PATH}",
        f"readlink /etc/systemd/system/multi-user.target.wants/{sealing.UNIT}",
        "is-symlink /var/lib/dbus/machine-id",
        "is-file /var/lib/dbus/machine-id",
        "-readlink /var/lib/dbus/machine-id",  # last: prints nothing when it is gone
    ]
    done = subprocess.run(
        ["guestfish", "--ro", "--format=qcow2", "-a", base, "-i"],
        input="\n".join(commands) + "\n", capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


# Three clones boot at once beside a libguestfs appliance (four TCG guests): beside six busy
# loops each in its own session "boot and read 3 clones" took 528 s in one loaded run and 720 s
# in the next, too near guest.BOOT_DEADLINE (one guest's boot) for a failure detector.
THREE_BOOTS_DEADLINE = 1500.0


def inside(hv_conn: object, name: str) -> dict[str, str]:
    """A booted clone's identity, through its guest agent once boot has finished."""
    dom = hv_conn.lookupByName(name)  # type: ignore[attr-defined]
    # The agent answers before boot is over: wait for systemd (it may end "degraded").
    _, state = guest.agent_run(
        dom, "systemctl is-system-running --wait", timeout=THREE_BOOTS_DEADLINE
    )
    facts = {"state": state.strip()}
    for key, command in {
        "machine_id": "cat /etc/machine-id",
        "host_key": "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub",
        "ssh": "systemctl is-active ssh",
        "hostname": "hostname",
        "seed": "sha256sum /var/lib/systemd/random-seed",
        "keys": "cat /root/.ssh/authorized_keys 2>/dev/null",
    }.items():
        _, out = guest.agent_run(dom, command, timeout=60)
        facts[key] = out.strip()
    return facts


@pytest.mark.timeout(2400)  # three TCG guests and an appliance at once, loaded
def test_clones_of_a_sealed_debian_have_their_own_machine_id_and_host_keys(
    host_lab: SystemLab, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lab = host_lab
    times: dict[str, float] = {}
    image = guest.build()
    disk = str(lab.dir / "vm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), disk)
    vm = lab.name("deb")
    lab.hv.define(guest.domain_xml(vm, image, disk))
    backups = lab.dir / "backups"

    plan = plan_template(lab.hv, vm, name=lab.name("tdeb"), backup_dir=backups)
    assert plan.additions == (sealing.MACHINE_ID, sealing.SSH_HOST_KEYS)
    summary = "\n".join(plan.summary())
    assert "empty /etc/machine-id" in summary and f"install {sealing.UNIT}" in summary
    started = time.monotonic()
    t = execute_template(lab.hv, plan)
    times["seal"] = time.monotonic() - started
    with capfd.disabled():
        print("times:", {k: round(v) for k, v in times.items()}, flush=True)
    base_sum = sha256(disk)

    assert main(["-c", lab.hv.uri, "template", "ls", "--json", "--backup-dir", str(backups)]) == 0
    listed = {x["name"]: x for x in json.loads(capfd.readouterr().out)}[t.name]
    assert listed["sealing"] == ["machine-id", "ssh-host-keys"]
    assert listed["first_boot"] == {
        "regenerates": ["machine-id", "random-seed", "ssh-host-keys"],
        "shared": [],
    }

    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@virtdeck-seal",
         "-f", str(tmp_path / "k")], check=True)  # fmt: skip
    key = (tmp_path / "k.pub").read_text().strip()
    web, full = lab.name("web"), lab.name("full")
    started = time.monotonic()
    # Per-clone identity on the thin clones (hostname by default, an SSH key), none on the
    # full clone: sealing alone must be enough there.
    rc = main(["-c", lab.hv.uri, "clone", t.name, web, "--count", "2", "--backup-dir",
               str(backups), "--ssh-key", str(tmp_path / "k.pub")])  # fmt: skip
    assert rc == 0, capfd.readouterr().err
    times["thin clones with identity"] = time.monotonic() - started
    started = time.monotonic()
    rc = main(["-c", lab.hv.uri, "clone", t.name, full, "--full", "--keep-hostname",
               "--backup-dir", str(backups)])  # fmt: skip
    assert rc == 0, capfd.readouterr().err
    times["full clone"] = time.monotonic() - started
    clones = [f"{web}-1", f"{web}-2", full]
    with capfd.disabled():
        print("times:", {k: round(v) for k, v in times.items()}, flush=True)

    started = time.monotonic()
    for name in clones:
        lab.hv.start(name)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        base_read = pool.submit(read_base, disk)  # read-only, beside the clones' QEMUs
        found = dict(zip(clones, pool.map(lambda n: inside(lab.hv.conn, n), clones), strict=True))
        base = base_read.result()
    times["boot and read 3 clones"] = time.monotonic() - started
    with capfd.disabled():
        print("times:", {k: round(v) for k, v in times.items()}, flush=True)
        print("base:", base, "clones:", {n: f["state"] for n, f in found.items()}, flush=True)

    # The base: no machine identity, no host keys, the unit that makes them.
    assert base[:5] == ["0", "false", "false", "true", sealing.UNIT_PATH], base
    # /etc/machine-id is empty, not missing; dbus's machine-id is still the link to it
    assert base[5:] == ["true", "false", "/etc/machine-id"], base
    # Three clones, three identities, none the VM's; ssh up in each.
    ids = [f["machine_id"] for f in found.values()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), found
    assert len(set(ids)) == 3 and guest.MACHINE_ID not in ids, found
    fingerprints = [f["host_key"].split()[1] for f in found.values()]
    assert all(fp.startswith("SHA256:") for fp in fingerprints) and len(set(fingerprints)) == 3
    assert [f["ssh"] for f in found.values()] == ["active"] * 3, found
    assert len({f["seed"].split()[0] for f in found.values()}) == 3, found
    # Identity kept working on top of sealing; the full clone kept the VM's hostname.
    assert [found[n]["hostname"] for n in clones] == [f"{web}-1", f"{web}-2", guest.HOSTNAME]
    assert key in found[f"{web}-1"]["keys"] and key in found[f"{web}-2"]["keys"]
    assert key not in found[full]["keys"]
    for name in clones:
        lab.hv.destroy(name)
    assert sha256(disk) == base_sum  # the clones never wrote to the base
