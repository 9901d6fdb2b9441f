"""Offline migrate between two hypervisors with separate image directories (issue 20).

Host A is the host's qemu:///system, reached over the SSH rig (from a private mount namespace
with decoys over the lab directory, as in tests/test_remote_system.py); host B is the test
user's qemu:///session over the same sshd, with its own pool directory. Results are checked
on the host side with qemu-img and qemu-io.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import SystemLab
from tests.test_remote_system import in_namespace, ok, pool_target, reads, write
from tests.test_storage_system import TEMPLATE, virtdeck

pytestmark = pytest.mark.system
MIB = 1024**2


def allocated(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


def chain(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                           str(path)], capture_output=True, text=True, check=True)  # fmt: skip
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def snapshot_names(path: Path) -> list[str]:
    return [s["name"] for s in chain(path)[0].get("snapshots", [])]


class Target:
    """Host B (the session daemon): its pool directory and a cleanup of what a test left."""

    def __init__(self, uri: str) -> None:
        import libvirt

        self.libvirt = libvirt
        self.conn = libvirt.open(uri)
        self.pool = self.conn.storagePoolLookupByName("vdtest-pool")
        self.dir = Path(pool_target(self.pool.XMLDesc(0)))

    def has(self, name: str) -> bool:
        return name in [d.name() for d in self.conn.listAllDomains(0)]

    def cleanup(self, names: list[str], files: list[str]) -> None:
        lv = self.libvirt
        for name in names:
            try:
                d = self.conn.lookupByName(name)
            except lv.libvirtError:
                continue
            if d.isActive():
                d.destroy()
            d.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        self.pool.refresh(0)
        for vol in self.pool.listAllVolumes(0):
            if vol.name() in files:
                os.chmod(self.dir / vol.name(), 0o644)
                vol.delete(0)
        self.conn.close()


@pytest.fixture
def target(session_uri: str) -> Iterator[Target]:
    t = Target(session_uri)
    yield t


def template(lab: SystemLab, suffix: str, base: str) -> str:
    """A template as one made before identities were recorded (qemu: B has no KVM)."""
    from tests.lab import domain_xml
    from tui.core import domxml

    name = lab.name(suffix)
    root = domxml.parse(domain_xml(name, [(base, "qcow2")], virt_type="qemu"))
    domxml.write_meta(root, TEMPLATE)
    lab.hv.conn.defineXML(domxml.to_string(root))
    return name


def thin_clone(lab: SystemLab, base: str, tname: str, suffix: str) -> tuple[str, Path]:
    name = lab.name(suffix)
    virtdeck(lab.hv, "clone", tname, name, "--allow-unsealed")
    return name, lab.dir / f"{name}.qcow2"


def test_migrate_a_thin_clone_sends_only_its_own_layers(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, target: Target, tmp_path: Path
) -> None:
    lab = host_lab
    base = lab.disk("mbase.qcow2", "256M")
    write(base, 0x11, "8M")
    subprocess.run(["qemu-io", "-c", "write -P 0x12 200M 1M", base], check=True,
                   capture_output=True)  # fmt: skip
    os.chmod(base, 0o444)
    tname = template(lab, "mtpl", base)  # no identity recorded
    c1, o1 = thin_clone(lab, base, tname, "m1")
    c2, o2 = thin_clone(lab, base, tname, "m2")
    c3, o3 = thin_clone(lab, base, tname, "m3")  # migrated with c1, in one command
    subprocess.run(["qemu-io", "-c", "write -P 0x21 0 64M", str(o1)], check=True,
                   capture_output=True)  # fmt: skip
    virtdeck(lab.hv, "snapshot", "create", c1, "s1")  # internal: inside the overlay
    subprocess.run(["qemu-io", "-c", "write -P 0x22 64M 2M", str(o1)], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["qemu-io", "-c", "write -P 0x31 0 6M", str(o2)], check=True,
                   capture_output=True)  # fmt: skip
    o1_alloc = o1.stat().st_blocks * 512
    o2_alloc = o2.stat().st_blocks * 512
    assert o1_alloc > 60 * MIB
    files = ["mbase.qcow2", o1.name, o2.name, o3.name]
    try:
        out = in_namespace(lab, ssh_root_uri, tmp_path, [
            ["migrate", c1, "--to", session_uri, "--dry-run"],
            ["migrate", c1, c3, "--to", session_uri, "--json"],
        ])  # fmt: skip
        dry = ok(out, 0) + out["results"][0][3]
        assert "copy the template there first" in dry, dry
        assert "computed now" in dry, dry  # the identity of an older template, cost said
        result = json.loads(ok(out, 1))
        plan = result["plans"][0]
        # c3's plan also said "copy the template first"; it is planned again on c1's copy.
        assert result["results"] == [
            {"domain": c1, "ok": True, "live": False},
            {"domain": c3, "ok": True, "live": False},
        ]
        assert target.has(c3) and not o3.exists()
        assert plan["template_copy"] is not None
        # Bytes sent for the clone: its own allocation, not the base's.
        assert plan["bytes_sent"] <= 1.1 * o1_alloc, (plan["bytes_sent"], o1_alloc)
        moved, tbase = target.dir / o1.name, target.dir / "mbase.qcow2"
        layers = chain(moved)
        assert len(layers) == 2 and layers[0]["full-backing-filename"] == str(tbase), layers
        assert layers[1]["filename"] == str(tbase)
        assert reads(str(moved), 0x21, "64M")
        assert subprocess.run(["qemu-io", "-r", "-U", "-c", "read -P 0x22 64M 2M", "-c",
                               "read -P 0x12 200M 1M", str(moved)], capture_output=True,
                              text=True).stdout.count("verification failed") == 0  # fmt: skip
        assert snapshot_names(moved) == ["s1"]
        dom = target.conn.lookupByName(c1)
        assert dom.snapshotListNames() == ["s1"] and dom.snapshotCurrent().getName() == "s1"
        assert dom.UUIDString() and not dom.isActive()
        # Nothing of it on A; the template is still there, and now has its identity.
        assert not lab.hv.exists(c1) and not o1.exists()
        ident = lab.hv.domain(tname).meta.base_identity
        from tui.core import domxml

        there = domxml.read_meta(domxml.parse(target.conn.lookupByName(tname).XMLDesc(0)))
        assert ident is not None and there.base_identity == ident

        # A second clone: the base is not sent again.
        before = allocated(target.dir)
        out = in_namespace(lab, ssh_root_uri, tmp_path, [
            ["migrate", c2, "--to", session_uri],
        ])  # fmt: skip
        ok(out, 0)
        assert "already on" in out["results"][0][3], out["results"][0][3]
        grew = allocated(target.dir) - before
        assert grew <= 1.05 * o2_alloc, (grew, o2_alloc)
        assert reads(str(target.dir / o2.name), 0x31, "6M")
        assert not lab.hv.exists(c2) and not o2.exists()
    finally:
        target.cleanup([c1, c2, c3, tname], files)


def test_migrate_refusals_say_why(host_lab: SystemLab, session_uri: str, target: Target) -> None:
    lab = host_lab
    vm = lab.define("mr")
    try:
        proc = virtdeck(lab.hv, "migrate", vm, "--to", session_uri, "--live", check=1)
        assert proc.stderr.count("\n") == 1 and "--live moves a running domain" in proc.stderr
        proc = virtdeck(lab.hv, "migrate", vm, "--to", session_uri, "--max-downtime", "50",
                        check=2)  # fmt: skip
        assert "apply to a live migration" in proc.stderr
        proc = virtdeck(lab.hv, "migrate", vm, "--to", lab.hv.uri, check=1)
        assert "nothing to migrate" in proc.stderr
        proc = virtdeck(lab.hv, "migrate", "--to", session_uri, check=2)
        assert "name at least one domain" in proc.stderr
        lab.hv.start(vm)
        proc = virtdeck(lab.hv, "migrate", vm, "--to", session_uri, check=1)
        assert "is running" in proc.stderr and "--live" in proc.stderr
        assert not target.has(vm) and lab.hv.exists(vm)
    finally:
        target.cleanup([], [])


KILL_SCRIPT = r"""
import os, signal, sys
from tui.core import migrate
from tui.core.hypervisor import Hypervisor, start_event_loop
src, dst, name, moment = sys.argv[1:]
start_event_loop()
s, t = Hypervisor.open(src), Hypervisor.open(dst)
plan = migrate.plan_migrate(s, t, name)
def progress(message, fraction):
    if message.startswith(moment) and (fraction is None or fraction > 0):
        os.kill(os.getpid(), signal.SIGKILL)
migrate.execute_migrate(s, t, plan, progress)
print("finished")
"""


def test_interrupted_or_killed_migration_leaves_the_vm_whole_on_the_source(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, target: Target, tmp_path: Path
) -> None:
    """An interrupt (in-process, as SIGTERM/Ctrl-C raise it) or a SIGKILL + `recover` at
    several moments: the source VM is defined as it was (UUID, snapshot tree, current
    snapshot, data), and nothing of it is on the target."""
    from tui.core import migrate, ops, transfer
    from tui.core.hypervisor import Hypervisor
    from tui.core.ops import Interrupted

    lab = host_lab
    base = lab.disk("kbase.qcow2", "64M")
    write(base, 0x41, "1M")
    os.chmod(base, 0o444)
    tname = template(lab, "ktpl", base)
    c, overlay = thin_clone(lab, base, tname, "k1")
    write(str(overlay), 0x42, "8M")
    virtdeck(lab.hv, "snapshot", "create", c, "s1")
    subprocess.run(["qemu-io", "-c", "write -P 0x43 8M 1M", str(overlay)], check=True,
                   capture_output=True)  # fmt: skip
    uuid = lab.hv.lookup(c).UUIDString()
    source, dest = Hypervisor.open(ssh_root_uri), Hypervisor.open(session_uri)
    files = ["kbase.qcow2", overlay.name]

    def whole() -> None:
        dom = lab.hv.conn.lookupByUUIDString(uuid)
        assert dom.name() == c and not dom.isActive()
        assert dom.snapshotListNames() == ["s1"] and dom.snapshotCurrent().getName() == "s1"
        assert reads(str(overlay), 0x42, "8M") and snapshot_names(overlay) == ["s1"]
        assert not target.has(c)
        target.pool.refresh(0)
        assert overlay.name not in [v.name() for v in target.pool.listAllVolumes(0)]
        assert not (target.dir / overlay.name).exists()

    try:
        transfer.execute_template_copy(
            source, dest, transfer.plan_template_copy(source, dest, tname)
        )
        for moment in ("sending", "qemu-img check", "defining", f"'{c}' left"):
            plan = migrate.plan_migrate(source, dest, c)
            assert plan.target_template == tname and plan.template_copy is None

            def stop(message: str, fraction: float | None, moment: str = moment) -> None:
                if message.startswith(moment) and (fraction is None or fraction > 0):
                    raise Interrupted("stopped by the test")

            with pytest.raises(Interrupted, match="undid"):
                migrate.execute_migrate(source, dest, plan, stop)
            lab.hv.invalidate()
            whole()
            assert not ops.pending()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        for moment in ("sending", f"'{c}' left"):
            proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ssh_root_uri, session_uri,
                                   c, moment], capture_output=True, text=True, env=env,
                                  timeout=300)  # fmt: skip
            assert proc.returncode == -9 and "finished" not in proc.stdout, proc.stderr
            assert ops.pending()  # the journal(s) it left
            rec = subprocess.run([sys.executable, "-m", "tui", "recover", "--yes"], env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            assert rec.returncode == 0, rec.stderr
            assert not ops.pending()
            lab.hv.invalidate()
            whole()
        # SIGTERM and SIGHUP (a dropped SSH session) to the command itself, while it streams
        # and once the target has the bytes: one line, the signal's exit status, as before.
        for sig, moment in ((signal.SIGTERM, "sending"), (signal.SIGHUP, "checksumming")):
            cmd = subprocess.Popen(
                [sys.executable, "-m", "tui", "-c", ssh_root_uri, "migrate", c, "--to",
                 session_uri], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=env,
            )  # fmt: skip
            assert cmd.stderr is not None
            seen = []
            for line in cmd.stderr:
                seen.append(line)
                if line.startswith(f"virtdeck: {moment}"):
                    cmd.send_signal(sig)
                    break
            _out, rest = cmd.communicate(timeout=120)
            err = "".join(seen) + rest
            assert cmd.returncode == 128 + sig and "Traceback" not in err, err
            lab.hv.invalidate()
            whole()
            assert not ops.pending()
        # And then it goes through (as the dashboard's `M` runs it: tui.core.migrate.MigrateGroup).
        group = migrate.plan_group(lambda _uri: source, dest, [(ssh_root_uri, c)])
        assert "migrated" in group.run(dest, lambda _t, _f: None)
        assert target.has(c) and not overlay.exists()
        assert reads(str(target.dir / overlay.name), 0x42, "8M")
    finally:
        source.close()
        dest.close()
        target.cleanup([c, tname], files)


def test_migrate_carries_external_snapshot_layers_of_a_standalone_vm(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, target: Target
) -> None:
    """No template: every layer is the VM's own. An external snapshot's overlay and the disk
    below it both move, rebased onto each other's new paths; the snapshot is redefined."""
    from tests.lab import domain_xml
    from tui.core import migrate
    from tui.core.hypervisor import Hypervisor

    lab = host_lab
    disk = lab.disk("xvm.qcow2", "64M")
    write(disk, 0x51, "4M")
    name = lab.name("xvm")
    lab.hv.conn.defineXML(domain_xml(name, [(disk, "qcow2")], virt_type="qemu"))
    virtdeck(lab.hv, "snapshot", "create", name, "s1", "--external")
    top = Path(lab.hv.domain(name).disks[0].path or "")
    assert top != Path(disk)
    write(str(top), 0x52, "1M")
    source, dest = Hypervisor.open(ssh_root_uri), Hypervisor.open(session_uri)
    try:
        plan = migrate.plan_migrate(source, dest, name)
        assert plan.template is None and len(plan.layers) == 2
        migrate.execute_migrate(source, dest, plan)
        moved = target.dir / top.name
        layers = chain(moved)
        assert [x["filename"] for x in layers] == [str(moved), str(target.dir / "xvm.qcow2")]
        assert reads(str(moved), 0x52, "1M")
        below = subprocess.run(["qemu-io", "-r", "-U", "-c", "read -P 0x51 1M 3M", str(moved)],
                               capture_output=True, text=True)  # fmt: skip
        assert below.returncode == 0 and "failed" not in below.stdout
        dom = target.conn.lookupByName(name)
        assert dom.snapshotListNames() == ["s1"]
        assert str(moved) in dom.snapshotLookupByName("s1").getXMLDesc(0)
        assert not lab.hv.exists(name) and not top.exists() and not Path(disk).exists()
    finally:
        source.close()
        dest.close()
        target.cleanup([name], ["xvm.qcow2", top.name])


def test_keep_source_leaves_a_stopped_renamed_copy(
    host_lab: SystemLab, ssh_root_uri: str, session_uri: str, target: Target
) -> None:
    from tests.lab import domain_xml
    from tui.core import migrate
    from tui.core.hypervisor import Hypervisor

    lab = host_lab
    disk = lab.disk("kvm.qcow2", "64M")
    write(disk, 0x61, "2M")
    name = lab.name("keep")
    lab.hv.conn.defineXML(domain_xml(name, [(disk, "qcow2")], virt_type="qemu"))
    uuid = lab.hv.lookup(name).UUIDString()
    source, dest = Hypervisor.open(ssh_root_uri), Hypervisor.open(session_uri)
    try:
        plan = migrate.plan_migrate(source, dest, name, keep_source=True)
        assert plan.keep_source == f"{name}-migrated"
        assert f"rename the source to '{name}-migrated'" in " ".join(plan.summary())
        migrate.execute_migrate(source, dest, plan)
        kept = lab.hv.conn.lookupByUUIDString(uuid)
        assert kept.name() == f"{name}-migrated" and not kept.isActive()
        assert reads(disk, 0x61, "2M")  # its files stay
        assert target.has(name) and reads(str(target.dir / "kvm.qcow2"), 0x61, "2M")
    finally:
        source.close()
        dest.close()
        target.cleanup([name], ["kvm.qcow2"])


class _RollBack(Exception):
    """Ends the test's operation so that its undo removes what it uploaded."""


def test_a_layer_travels_in_windows_and_is_read_back_as_it_lands(
    host_lab: SystemLab, session_uri: str, target: Target
) -> None:
    """migrate's upload (tui.core.transfer.upload with a SegmentReadback): a sparse file of
    five and a bit segments, data across each window's edge and holes spanning windows,
    arrives byte for byte; the figure read back as the windows land is the figure of what was
    sent and of the file; a byte changed on the target after it landed is found; and the
    operation's undo removes the copy."""
    from tui.core import ops, transfer
    from tui.core.hypervisor import Hypervisor
    from tui.core.storage.digest import SEGMENT, SegmentReadback, readback
    from tui.core.storage.remote import RemoteFiles

    lab = host_lab
    src = lab.dir / "windows.raw"
    size = 5 * SEGMENT + 12345
    with open(src, "wb") as fh:
        fh.truncate(size)
        for at, n in ((0, 4096), (SEGMENT - MIB, 2 * MIB), (3 * SEGMENT + 7, 3 * MIB),
                      (size - 100, 100)):  # fmt: skip
            fh.seek(at)
            fh.write(os.urandom(n))
    assert transfer._window(size) == SEGMENT  # (so the windows are the segments here)
    source, dest = lab.hv, Hypervisor.open(session_uri)
    copy = target.dir / src.name
    try:
        src_files, dst_files = RemoteFiles(source, "test"), RemoteFiles(dest, "test")
        pool = dst_files.ensure_pool(str(target.dir))
        landed: list[int] = []
        title, named = "test upload", [lab.name("windows")]
        with pytest.raises(_RollBack), ops.running(dest, title, domains=named,
                                                   dirs=[str(target.dir)]) as undo:  # fmt: skip
            with SegmentReadback(dest, str(copy)) as reading:
                real_landed = reading.landed

                def noted(end: int) -> None:
                    landed.append(end)
                    real_landed(end)

                reading.landed = noted  # type: ignore[method-assign]
                sent = transfer.upload(
                    source, dest, transfer._source_volume(src_files, str(src)),
                    (dst_files, pool), undo, str(copy), size, lambda _n: None,
                    reading=reading,
                )  # fmt: skip
                assert subprocess.run(["cmp", str(src), str(copy)]).returncode == 0
                assert reading.hexdigest() == sent == readback(source, str(src), sent)
            assert landed == [SEGMENT * k for k in range(1, 6)] + [size], landed
            with open(copy, "r+b") as fh:  # a byte of the last window changes there
                fh.seek(size - 50)
                fh.write(b"\0" if fh.read(1) != b"\0" else b"\1")
            with SegmentReadback(dest, str(copy)) as again:
                again.landed(5 * SEGMENT)  # (the first five read early, the rest at the end)
                assert again.hexdigest() != sent
            raise _RollBack
        assert not copy.exists()  # the undo removed the upload
    finally:
        dest.close()
        target.cleanup([], [src.name])
