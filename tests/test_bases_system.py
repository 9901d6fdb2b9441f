"""A template's base never changes under its clones, and `clone` and `rm --storage` of one
template serialise (issue 17, cases 1, 2 and 4): real CLI processes against real daemons.

Checked by what is on disk: the base's sha256, the clones' data read with `qemu-io -r read
-P`, `qemu-img check` of every clone with its backing file present.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import SystemLab, qemu_img
from tui.core import templates
from tui.core.hypervisor import Hypervisor

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent
PATTERN = "0x5a"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reads_pattern(path: str) -> bool:
    """The first MiB of the image (through its backing chain) is the base's pattern."""
    p = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {PATTERN} 0 1M", path],
                       capture_output=True, text=True)  # fmt: skip
    return p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr


def cli(uri: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui", "-c", uri, *argv], cwd=REPO,
                          env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def make_template(lab: SystemLab, tmp_path: Path, suffix: str = "t") -> tuple[str, str]:
    """A VM whose disk holds PATTERN, made a template (not sealed): (name, base path)."""
    disk = lab.disk(f"{suffix}.qcow2")
    subprocess.run(["qemu-io", "-c", f"write -P {PATTERN} 0 1M", disk], check=True,
                   capture_output=True)  # fmt: skip
    vm = lab.define(suffix, [(disk, "qcow2")])
    plan = templates.plan_template(lab.hv, vm, name=vm, seal=False, backup_dir=tmp_path)
    templates.execute_template(lab.hv, plan)
    return vm, disk


def test_snapshots_of_a_template_with_clones_are_refused(lab: SystemLab, tmp_path: Path) -> None:
    """Case 1: revert, rollback, create (internal and --external) and delete of a template's
    snapshot exit non-zero in one line naming the clones; the base and the clones' data stay."""
    uri = lab.hv.uri
    t, base = make_template(lab, tmp_path)
    # A snapshot taken behind virtdeck's back (virsh), before the clones: what an operator
    # could still have; virtdeck's own `template create` now refuses a VM with snapshots.
    dom = lab.hv.conn.lookupByName(t)
    dom.snapshotCreateXML("<domainsnapshot><name>s0</name></domainsnapshot>", 0)
    c = cli(uri, "clone", t, lab.name("c"), "--count", "2", "--keep-hostname", "--allow-unsealed",
            "--backup-dir", str(tmp_path))  # fmt: skip
    assert c.returncode == 0, c.stderr
    clones = [lab.name("c-1"), lab.name("c-2")]
    overlays = [str(lab.dir / f"{n}.qcow2") for n in clones]
    assert all(os.path.exists(p) for p in overlays), sorted(os.listdir(lab.dir))
    before = sha256(base)
    size = os.path.getsize(base)
    for argv in (
        ("snapshot", "revert", t, "s0"),
        ("rollback", t),
        ("snapshot", "create", t, "s1"),
        ("snapshot", "create", t, "s2", "--external"),
        ("snapshot", "delete", t, "s0"),
    ):
        r = cli(uri, *argv)
        assert r.returncode != 0, (argv, r.stdout)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "template" in lines[0] and all(n in lines[0] for n in clones), lines[0]
        assert sha256(base) == before and os.path.getsize(base) == size, argv
    assert [s.getName() for s in dom.listAllSnapshots(0)] == ["s0"]
    for overlay in overlays:
        assert reads_pattern(overlay), overlay
        qemu_img("check", overlay)


def test_template_create_refuses_snapshots_and_shared_disks(lab: SystemLab, tmp_path: Path) -> None:
    """Case 4: a VM with a snapshot, or whose disk another domain also uses, does not become a
    template (one line naming the snapshot or the other domain); its disk stays writable."""
    uri = lab.hv.uri
    snapped = lab.define("snapped")
    lab.hv.conn.lookupByName(snapped).snapshotCreateXML(
        "<domainsnapshot><name>old</name></domainsnapshot>", 0
    )
    r = cli(uri, "template", "create", snapped, "--no-seal", "--backup-dir", str(tmp_path))
    assert r.returncode != 0 and "snapshots (old)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    shared = lab.disk("shared.qcow2")
    a = lab.define("a", [(shared, "qcow2")])
    b = lab.define("b", [(shared, "qcow2")])
    mode = os.stat(shared).st_mode
    r = cli(uri, "template", "create", a, "--no-seal", "--backup-dir", str(tmp_path))
    assert r.returncode != 0 and b in r.stderr and "uses it as its disk" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert os.stat(shared).st_mode == mode
    assert not lab.hv.domain(a).is_template
    assert not list(tmp_path.glob("*.xml"))


def test_clone_and_rm_storage_serialise(lab: SystemLab, tmp_path: Path) -> None:
    """Case 2: `rm T --storage` and `clone T x` started together (0-50 ms apart, either first)
    20 times: never both succeed; a clone that exists afterwards has its base and passes
    `qemu-img check`. Each round makes a fresh template."""
    rng = random.Random(17)
    outcomes = {"rm": 0, "clone": 0}
    for i in range(20):
        t, base = make_template(lab, tmp_path, f"r{i}")
        x = lab.name(f"x{i}")
        env = dict(os.environ)
        rm = [sys.executable, "-m", "tui", "-c", lab.hv.uri, "rm", t, "--storage",
              "--backup-dir", str(tmp_path)]  # fmt: skip
        clone = [sys.executable, "-m", "tui", "-c", lab.hv.uri, "clone", t, x,
                 "--keep-hostname", "--allow-unsealed", "--backup-dir", str(tmp_path)]  # fmt: skip
        first, second = (rm, clone) if i % 2 else (clone, rm)
        p1 = subprocess.Popen(first, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(rng.uniform(0, 0.05))
        p2 = subprocess.Popen(second, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        out1, err1 = p1.communicate(timeout=300)
        out2, err2 = p2.communicate(timeout=300)
        codes = {"rm" if first is rm else "clone": p1.returncode,
                 "rm" if second is rm else "clone": p2.returncode}  # fmt: skip
        why = f"round {i}: {codes} / {err1.strip()} / {err2.strip()}"
        assert not (codes["rm"] == 0 and codes["clone"] == 0), why
        for n in (k for k, v in codes.items() if v == 0):
            outcomes[n] += 1
        exists = any(d.name() == x for d in lab.hv.conn.listAllDomains(0))
        if codes["clone"] == 0 or exists:
            assert exists and os.path.exists(base), why
            overlay = str(lab.dir / f"{x}.qcow2")
            assert os.path.exists(overlay), why
            qemu_img("check", overlay)
            assert reads_pattern(overlay), why
        if codes["rm"] == 0:
            assert not os.path.exists(base) and not exists, why
    # Both orders happened: the lock, not the timing, decided.
    assert outcomes["rm"] and outcomes["clone"], outcomes


# -- shared storage between two hosts (issue 17, case 3) -------------------------------------


@pytest.fixture
def other_lab() -> Iterator[SystemLab]:
    """A lab on the chrooted daemon, which sees /var/lib/libvirt/images at the same path as
    the host's: two hypervisors on shared storage."""
    from tests.conftest import _other_uri

    try:
        uri = _other_uri()
        hv = Hypervisor.open(uri)
    except Exception as err:  # noqa: BLE001
        pytest.fail(
            f"the other daemon does not answer ({err}): bash scripts/other-libvirt.sh start"
        )
    lab = SystemLab(hv)
    try:
        yield lab
    finally:
        lab.cleanup()
        hv.close()


def test_a_base_another_host_reads_survives(
    host_lab: SystemLab, other_lab: SystemLab, tmp_path: Path
) -> None:
    """A template base made on A, a domain on B with an overlay on it in another directory of
    the shared storage: `rm T --storage` is refused naming B's domain, given both URIs and
    given only A when B is a saved host of config.toml; a domain on B that uses the same disk
    as A's domain keeps it; a saved host that cannot be asked refuses the deletion unless
    --force; the plan says "shared storage"."""
    a, b = host_lab.hv.uri, other_lab.hv.uri
    t, base = make_template(host_lab, tmp_path)
    overlay = str(other_lab.dir / "on-base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, overlay)
    reader = other_lab.define("reader", [(overlay, "qcow2")])
    before = sha256(base)
    backups = ["--backup-dir", str(tmp_path)]

    both = cli(a, "-c", b, "rm", t, "--storage", *backups)
    assert both.returncode != 0 and f"{reader} (on {b})" in both.stderr, both.stderr
    assert len(both.stderr.strip().splitlines()) == 1, both.stderr

    config = tmp_path / "config"
    (config / "virtdeck").mkdir(parents=True)
    (config / "virtdeck" / "config.toml").write_text(f'[hosts]\nother = "{b}"\n')
    env = {**os.environ, "XDG_CONFIG_HOME": str(config)}
    only_a = cli(a, "rm", t, "--storage", *backups, env=env)
    assert only_a.returncode != 0 and f"{reader} (on {b})" in only_a.stderr, only_a.stderr
    assert os.path.exists(base) and sha256(base) == before
    assert reads_pattern(overlay)
    assert host_lab.hv.conn.lookupByName(t)
    usage = cli(a, "-c", b, "usage")
    assert usage.returncode == 0, usage.stderr
    assert f"  shared storage: {base} (also used on {b})" in usage.stdout, usage.stdout

    # The same disk used by a domain on each host: not A's alone, not deleted as A's.
    disk = host_lab.disk("both.qcow2")
    mine = host_lab.define("mine", [(disk, "qcow2")])
    theirs = other_lab.define("theirs", [(disk, "qcow2")])
    r = cli(a, "-c", b, "rm", mine, "--storage")
    assert r.returncode != 0 and f"{theirs} (on {b})" in r.stderr, r.stderr
    assert os.path.exists(disk)
    # Nor written in place by an internal snapshot.
    r = cli(a, "-c", b, "snapshot", "create", mine, "s1")
    assert r.returncode != 0 and f"{theirs} (on {b})" in r.stderr, r.stderr
    assert not host_lab.hv.conn.lookupByName(mine).listAllSnapshots(0)
    # Nor made a read-only template base (B is a saved host here).
    mode = os.stat(disk).st_mode
    for argv in ((a, "-c", b), (a,)):  # B connected, or B a saved host
        r = cli(*argv, "template", "create", mine, "--no-seal", *backups,
                env=None if len(argv) > 1 else env)  # fmt: skip
        assert r.returncode != 0 and f"{theirs} (on {b})" in r.stderr, r.stderr
    assert os.stat(disk).st_mode == mode and not host_lab.hv.domain(mine).is_template

    # Without users on B, the plan says the storage is shared.
    other_lab.hv.conn.lookupByName(theirs).undefine()
    dry = cli(a, "rm", mine, "--storage", "--dry-run", env=env)
    assert dry.returncode == 0 and f"shared storage: also seen by {b}" in dry.stderr, dry.stderr

    # A saved host of this machine that cannot be asked: refused, unless --force.
    (config / "virtdeck" / "config.toml").write_text(
        f'[hosts]\nother = "{b}"\ngone = "qemu:///system?socket={tmp_path}/no-such-sock"\n'
    )
    r = cli(a, "rm", mine, "--storage", env=env)
    assert r.returncode != 0 and "no-such-sock" in r.stderr and "--force" in r.stderr, r.stderr
    assert os.path.exists(disk)
    r = cli(a, "rm", mine, "--storage", "--force", env=env)
    assert r.returncode == 0 and "--force: not asked whether" in r.stderr, r.stderr
    assert not os.path.exists(disk)
    log = Path(os.environ["VIRTDECK_AUDIT_LOG"]).read_text().splitlines()
    assert any(mine in x and "--force, not asked: " in x and "no-such-sock" in x for x in log)


# -- the lock of a remote host's images (over SSH) -------------------------------------------


def test_remote_images_are_locked_on_their_host(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clients with lock directories of their own (two machines) managing one host over
    SSH serialise on the host's lock files, which a virtdeck on the host itself uses too; a
    SIGKILLed holder's locks go with its SSH session."""
    from tui.core import bases
    from tui.core.errors import OperationError

    image = str(host_lab.dir / "remote-family.qcow2")
    code = (
        "import time; from tui.core import bases; from tui.core.hypervisor import Hypervisor; "
        f"hv = Hypervisor.open({ssh_root_uri!r}); "
        f"cm = bases.family_lock(hv, [{image!r}], chains=False); cm.__enter__(); "
        "print('held', flush=True); time.sleep(120)"
    )
    env = {**os.environ, "VIRTDECK_LOCK_DIR": str(tmp_path / "client-1")}
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE)  # fmt: skip
    monkeypatch.setenv("VIRTDECK_LOCK_DIR", str(tmp_path / "client-2"))
    remote = Hypervisor.open(ssh_root_uri)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(OperationError, match="has held .*remote-family.qcow2 on 127.0.0.1"),
            bases.family_lock(remote, [image], chains=False, timeout=1),
        ):
            pass
        monkeypatch.delenv("VIRTDECK_LOCK_DIR")  # a virtdeck on the host: its own lock files
        with (
            pytest.raises(OperationError, match="has held"),
            bases.family_lock(host_lab.hv, [image], chains=False, timeout=0.5),
        ):
            pass
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 20
        while True:
            try:
                with bases.family_lock(remote, [image], chains=False, timeout=1):
                    break
            except OperationError:
                assert time.monotonic() < deadline, "the killed holder's lock stayed"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        remote.close()


def test_one_daemon_under_two_uris_is_not_its_own_dependent(
    host_lab: SystemLab, ssh_root_uri: str, tmp_path: Path
) -> None:
    """The host daemon also saved under another URI (SSH): its domain, seen there with the
    same UUID, is the same domain, not a user of its own disk."""
    vm = host_lab.define("twice")
    disk = str(host_lab.dir / "twice.qcow2")
    (tmp_path / "virtdeck").mkdir()
    (tmp_path / "virtdeck" / "config.toml").write_text(f'[hosts]\nself = "{ssh_root_uri}"\n')
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    r = cli(host_lab.hv.uri, "rm", vm, "--storage", env=env)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(disk)
