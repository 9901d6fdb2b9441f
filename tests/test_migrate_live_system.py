"""Live migrate between two hypervisors (issue 20).

Host A is the host's qemu:///system, reached over the SSH rig; host B is the test user's
qemu:///session over the same sshd, with a host identity of its own (tests/rigs.SessionRig)
and its own pool directory. Their QEMUs reach each other over loopback. The domains need no
operating system (BIOS finds nothing to boot and waits), so they run under TCG on both sides;
what they hold is a pattern written into the clone's overlay before it starts, read back on
B with qemu-io.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.lab import SystemLab
from tests.test_migrate_system import MIB, Target, allocated, chain, template
from tests.test_remote_system import in_namespace, ok, reads, write
from tests.test_storage_system import virtdeck
from tests.waiting import wait_until

pytestmark = pytest.mark.system
REPO = Path(__file__).resolve().parent.parent


def host_uuid(conn: libvirt.virConnect) -> str:
    return ET.fromstring(conn.getCapabilities()).findtext("host/uuid") or ""


@pytest.fixture
def peers(host_lab: SystemLab, session_uri: str) -> Iterator[Target]:
    """B, checked to be another host for libvirt (else it refuses a live migration)."""
    t = Target(session_uri)
    assert host_uuid(host_lab.hv.conn) != host_uuid(t.conn), "the rig's daemons share a host UUID"
    yield t


def running_clone(
    lab: SystemLab, tname: str, suffix: str, pattern: int, length: str
) -> tuple[str, Path]:
    name = lab.name(suffix)
    virtdeck(lab.hv, "clone", tname, name, "--allow-unsealed")
    overlay = lab.dir / f"{name}.qcow2"
    write(str(overlay), pattern, length)
    lab.hv.conn.lookupByName(name).create()
    return name, overlay


def state_on(conn: libvirt.virConnect, name: str) -> tuple[int, bool]:
    dom = conn.lookupByName(name)
    return dom.state()[0], bool(dom.isPersistent())


def test_live_migration_keeps_a_thin_clone_running_and_thin(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, peers: Target, tmp_path: Path
) -> None:
    lab, target = host_lab, peers
    base = lab.disk("lbase.qcow2", "256M")
    write(base, 0x11, "8M")
    os.chmod(base, 0o444)
    tname = template(lab, "ltpl", base)
    c1, o1 = running_clone(lab, tname, "l1", 0x21, "64M")
    c2, o2 = running_clone(lab, tname, "l2", 0x31, "6M")
    uuid = lab.hv.conn.lookupByName(c1).UUIDString()
    o1_alloc, o2_alloc = o1.stat().st_blocks * 512, o2.stat().st_blocks * 512
    files = ["lbase.qcow2", o1.name, o2.name]
    try:
        out = in_namespace(lab, ssh_root_uri, tmp_path, [
            ["migrate", c1, "--to", session_uri, "--dry-run"],
            ["migrate", c1, "--to", session_uri, "--live", "--dry-run"],
            ["migrate", c1, "--to", session_uri, "--live", "--max-downtime", "300", "--json"],
        ])  # fmt: skip
        # Without --live a running domain is refused, with the way out.
        argv, code, _stdout, err = out["results"][0]
        assert code == 1 and "--live" in err, (argv, err)
        dry = ok(out, 1) + out["results"][1][3]
        assert "copy the template there first" in dry and "live" in dry, dry
        result = json.loads(ok(out, 2))
        plan = result["plans"][0]
        assert plan["live"] and plan["template_copy"] is not None and plan["max_downtime"] == 300
        assert plan["bytes_sent"] <= 1.1 * o1_alloc, (plan["bytes_sent"], o1_alloc)
        (res,) = result["results"]
        assert res["ok"] and res["live"] and "downtime" in res["result"], res
        # It runs on B, defined there, same UUID; nothing of it on A.
        assert state_on(target.conn, c1) == (libvirt.VIR_DOMAIN_RUNNING, True)
        assert target.conn.lookupByName(c1).UUIDString() == uuid
        assert not lab.hv.exists(c1) and not o1.exists()
        moved, tbase = target.dir / o1.name, target.dir / "lbase.qcow2"
        layers = chain(moved)
        assert len(layers) == 2 and layers[1]["filename"] == str(tbase), layers
        assert reads(str(moved), 0x21, "64M")  # the pattern written before, read back on B
        assert reads(str(tbase), 0x11, "8M")

        # A second running clone of the same template: the base is not sent again.
        before = allocated(target.dir)
        out = in_namespace(lab, ssh_root_uri, tmp_path, [
            ["migrate", c2, "--to", session_uri, "--live"],
        ])  # fmt: skip
        text = ok(out, 0) + out["results"][0][3]
        assert "already on" in text and "downtime" in text, text
        grew = allocated(target.dir) - before
        assert grew <= 1.05 * o2_alloc + MIB, (grew, o2_alloc)
        assert reads(str(target.dir / o2.name), 0x31, "6M")
        assert state_on(target.conn, c2) == (libvirt.VIR_DOMAIN_RUNNING, True)
    finally:
        target.cleanup([c1, c2, tname], files)


KILL_SCRIPT = """
import os, signal, sys
from tui.core import migrate
from tui.core.hypervisor import Hypervisor, start_event_loop
src, dst, name, moment = sys.argv[1:]
start_event_loop()
s, t = Hypervisor.open(src), Hypervisor.open(dst)
plan = migrate.plan_migrate(s, t, name, live=True, bandwidth=8)
def progress(message, fraction):
    if message.startswith(moment) and (moment != "migrating" or "sent" in message):
        os.kill(os.getpid(), signal.SIGKILL)
migrate.execute_migrate(s, t, plan, progress)
print("finished")
"""


def test_an_interrupted_live_migration_leaves_it_running_on_the_source(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, peers: Target
) -> None:
    """An interrupt (as SIGTERM/Ctrl-C raise it in-process), a SIGKILL + `recover`, and
    SIGTERM/SIGHUP to the command, while the overlay is made on B and while the domain is
    being sent: it runs on A as before, with its data, and nothing of it is on B."""
    from tui.core import migrate, ops, transfer
    from tui.core.hypervisor import Hypervisor
    from tui.core.ops import Interrupted

    lab, target = host_lab, peers
    base = lab.disk("kbase.qcow2", "64M")
    write(base, 0x41, "1M")
    os.chmod(base, 0o444)
    tname = template(lab, "ktpl", base)
    c, overlay = running_clone(lab, tname, "k1", 0x42, "48M")
    uuid = lab.hv.conn.lookupByName(c).UUIDString()
    source, dest = Hypervisor.open(ssh_root_uri), Hypervisor.open(session_uri)
    files = ["kbase.qcow2", overlay.name]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def settled() -> bool:
        dom = lab.hv.conn.lookupByUUIDString(uuid)
        return dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

    def whole() -> None:
        wait_until(settled, 60, "the source's migration job ended")
        dom = lab.hv.conn.lookupByUUIDString(uuid)
        assert dom.name() == c and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
        assert reads(str(overlay), 0x42, "48M")
        assert not target.has(c)
        target.pool.refresh(0)
        assert overlay.name not in [v.name() for v in target.pool.listAllVolumes(0)]
        assert not ops.pending()

    try:
        transfer.execute_template_copy(
            source, dest, transfer.plan_template_copy(source, dest, tname)
        )
        for moment in ("creating", "migrating"):
            plan = migrate.plan_migrate(source, dest, c, live=True, bandwidth=8)
            assert plan.target_template == tname and plan.template_copy is None

            def stop(message: str, fraction: float | None, moment: str = moment) -> None:
                if message.startswith(moment):
                    raise Interrupted("stopped by the test")

            # (at "creating" the overlay is not made yet: nothing to undo)
            with pytest.raises(Interrupted, match="undid" if moment == "migrating" else "nothing"):
                migrate.execute_migrate(source, dest, plan, stop)
            whole()
        for moment in ("creating", "migrating"):
            proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ssh_root_uri, session_uri,
                                   c, moment], capture_output=True, text=True, env=env,
                                  timeout=300)  # fmt: skip
            assert proc.returncode == -9 and "finished" not in proc.stdout, proc.stderr
            assert ops.pending()  # the journal(s) it left
            wait_until(settled, 60, "the source's migration job ended")
            rec = subprocess.run([sys.executable, "-m", "tui", "recover", "--yes"], env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            assert rec.returncode == 0, rec.stderr
            whole()
        # Killed after the switchover, while the source's copy is removed: `recover`
        # finishes it (the finished result), and never touches what runs on B.
        proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ssh_root_uri, session_uri, c,
                               "undefining"], capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip
        assert proc.returncode == -9, proc.stderr
        assert ops.pending()
        rec = subprocess.run([sys.executable, "-m", "tui", "recover", "--yes"], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert rec.returncode == 0, rec.stderr
        assert not ops.pending()
        assert state_on(target.conn, c) == (libvirt.VIR_DOMAIN_RUNNING, True)
        assert reads(str(target.dir / overlay.name), 0x42, "48M")
        lab.hv.invalidate()
        assert not lab.hv.exists(c) and not overlay.exists()
        # ... and back, live, for the signals to the command.
        back = migrate.plan_migrate(dest, source, c, live=True, directory=str(lab.dir))
        migrate.execute_migrate(dest, source, back)
        assert overlay.exists() and not target.has(c)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            cmd = subprocess.Popen(
                [sys.executable, "-m", "tui", "-c", ssh_root_uri, "migrate", c, "--to",
                 session_uri, "--live", "--bandwidth", "8"],
                stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            assert cmd.stderr is not None
            seen = []
            for line in cmd.stderr:  # its progress, until the domain is being sent
                seen.append(line)
                if "live:" in line and "sent" in line:
                    cmd.send_signal(sig)
                    break
            _out, rest = cmd.communicate(timeout=120)
            err = "".join(seen) + rest
            assert cmd.returncode == 128 + sig, err
            assert "Traceback" not in err and "migrated to" not in err, err
            whole()
        # And then it goes through, live.
        group = migrate.plan_group(lambda _uri: source, dest, [(ssh_root_uri, c)])
        assert group.plans[0].live
        assert "live" in group.run(dest, lambda _t, _f: None)
        assert state_on(target.conn, c) == (libvirt.VIR_DOMAIN_RUNNING, True)
        assert reads(str(target.dir / overlay.name), 0x42, "48M")
        assert not overlay.exists()
    finally:
        source.close()
        dest.close()
        target.cleanup([c, tname], files)


def test_uefi_variables_move_with_the_domain_offline_and_live(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, peers: Target
) -> None:
    """A UEFI domain (OVMF, its NVRAM holding a marker): offline to B, its variables beside
    its disk there, the source's file gone; started there, then live back to A."""
    import hashlib

    from tests.test_clones_system import MARKER, NVRAM_DIR, OVMF_CODE, OVMF_VARS
    from tui.core import migrate
    from tui.core.hypervisor import Hypervisor

    lab, target = host_lab, peers
    name = lab.name("efi")
    disk = lab.disk("efi.qcow2", "64M")
    write(disk, 0x61, "4M")
    nvram = NVRAM_DIR / f"{name}_VARS.fd"
    vars_ = bytearray(Path(OVMF_VARS).read_bytes())
    vars_[-len(MARKER) :] = MARKER
    nvram.write_bytes(bytes(vars_))
    os.chmod(nvram, 0o600)
    digest = hashlib.sha256(bytes(vars_)).hexdigest()
    lab.hv.conn.defineXML(f"""
    <domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='q35'>hvm</type>
        <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
        <nvram template='{OVMF_VARS}'>{nvram}</nvram></os>
      <features><acpi/></features>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices>
    </domain>""")
    source, dest = Hypervisor.open(ssh_root_uri), Hypervisor.open(session_uri)
    there = target.dir / f"{name}_VARS.fd"
    back = lab.dir / f"{name}_VARS.fd"
    try:
        plan = migrate.plan_migrate(source, dest, name)
        assert plan.nvram == (str(nvram), str(there), len(vars_))
        assert any("UEFI variables" in line for line in plan.summary())
        migrate.execute_migrate(source, dest, plan)
        root = ET.fromstring(target.conn.lookupByName(name).XMLDesc(0))
        assert root.findtext("os/nvram") == str(there)
        assert hashlib.sha256(there.read_bytes()).hexdigest() == digest
        assert not nvram.exists() and not Path(disk).exists()
        target.conn.lookupByName(name).create()  # OVMF starts on B with its variables

        # Live back to A (into the lab's directory): the variables come along.
        dest.invalidate()
        plan = migrate.plan_migrate(dest, source, name, live=True, directory=str(lab.dir))
        assert plan.live and plan.nvram is not None and plan.nvram[1] == str(back)
        migrate.execute_migrate(dest, source, plan)
        assert state_on(lab.hv.conn, name) == (libvirt.VIR_DOMAIN_RUNNING, True)
        root = ET.fromstring(lab.hv.conn.lookupByName(name).XMLDesc(0))
        assert root.findtext("os/nvram") == str(back)
        assert MARKER in back.read_bytes()
        assert reads(disk, 0x61, "4M")
        assert not target.has(name) and not there.exists()
    finally:
        source.close()
        dest.close()
        target.cleanup([name], [there.name, Path(disk).name])
        nvram.unlink(missing_ok=True)
