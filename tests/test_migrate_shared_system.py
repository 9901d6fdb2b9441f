"""Migrate between two hosts on shared storage (issue 20): the host's qemu:///system and the
chrooted daemon, which sees /var/lib/libvirt/images at the same path (tests/test_bases_system's
`other_lab`). A file the target holds in one of its pools is the very file: only the
definition moves, nothing is copied or deleted; without that proof migrate never writes over
the file it sees."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.lab import SystemLab, remove_prefixed
from tests.test_bases_system import cli, other_lab  # noqa: F401  (the fixture)

pytestmark = pytest.mark.system


@contextlib.contextmanager
def pool_on(conn: libvirt.virConnect, directory: Path, name: str) -> Iterator[None]:
    """A transient directory pool for `directory` on the daemon of `conn`."""
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>", 0
    )
    try:
        yield
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()


def test_migrate_on_shared_storage_moves_only_the_definition(
    host_lab: SystemLab,
    other_lab: SystemLab,  # noqa: F811
) -> None:
    a, b = host_lab.hv.uri, other_lab.hv.uri
    disk = host_lab.disk("vm.qcow2")
    vm = host_lab.define("vm", [(disk, "qcow2")])
    dom = host_lab.hv.conn.lookupByName(vm)
    dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    inode = os.stat(disk).st_ino
    try:
        # The target sees the file but holds it in no pool: no proof of shared storage, and
        # the copy would land on the file itself: refused, nothing changed.
        r = cli(a, "-c", b, "migrate", vm, "--to", b, "--dir", str(host_lab.dir))
        assert r.returncode != 0 and "already exists" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert (
            host_lab.hv.conn.lookupByName(vm) and vm not in other_lab.hv.conn.listDefinedDomains()
        )

        with pool_on(other_lab.hv.conn, host_lab.dir, host_lab.prefix):
            dry = cli(a, "-c", b, "migrate", vm, "--to", b, "--dry-run", "--json")
            assert dry.returncode == 0, dry.stderr
            plan = json.loads(dry.stdout)
            plan = plan["plans"][0] if "plans" in plan else plan
            assert plan["shared_storage"] and plan["layers"] == [], plan
            r = cli(a, "-c", b, "migrate", vm, "--to", b)
            assert r.returncode == 0, r.stderr
        assert vm not in [d.name() for d in host_lab.hv.conn.listAllDomains(0)]
        moved = other_lab.hv.conn.lookupByName(vm)
        assert disk in moved.XMLDesc(0)
        assert [s.getName() for s in moved.listAllSnapshots(0)] == ["s1"]
        assert moved.snapshotCurrent(0).getName() == "s1"
        assert os.stat(disk).st_ino == inode  # the very file, neither copied nor deleted
    finally:
        remove_prefixed(other_lab.hv.conn, host_lab.prefix)


def test_a_seeded_clone_takes_its_seed_along(
    host_lab: SystemLab,
    other_lab: SystemLab,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A clone's cloud-init seed is virtdeck's own file: migrate streams it with the overlay
    (into --dir on a host with no pool there), the metadata and the CD-ROM name its new
    place, and rm --storage there deletes it."""
    from tests.test_bases_system import make_template
    from tui.core import domxml

    a, b = host_lab.hv.uri, other_lab.hv.uri
    t, _base = make_template(host_lab, tmp_path)
    name = host_lab.name("sc")
    try:
        r = cli(a, "clone", t, name, "--allow-unsealed", "--identity", "cloud-init",
                "--backup-dir", str(tmp_path))  # fmt: skip
        assert r.returncode == 0, r.stderr
        seed = host_lab.dir / f"{name}-seed.iso"
        data = seed.read_bytes()
        r = cli(a, "-c", b, "migrate", name, "--to", b, "--dir", str(other_lab.dir))
        assert r.returncode == 0, r.stderr
        moved = other_lab.dir / seed.name
        assert moved.read_bytes() == data and not seed.exists()
        root = domxml.parse(other_lab.hv.conn.lookupByName(name).XMLDesc(0))
        assert domxml.read_meta(root).seed == str(moved)
        cdrom = root.find("devices/disk[@device='cdrom']/source")
        assert cdrom is not None and cdrom.get("file") == str(moved)
        r = cli(b, "rm", name, "--storage")
        assert r.returncode == 0, r.stderr
        assert not moved.exists() and not (other_lab.dir / f"{name}.qcow2").exists()
    finally:
        remove_prefixed(other_lab.hv.conn, host_lab.prefix)
