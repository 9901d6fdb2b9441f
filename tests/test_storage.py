"""Fast tests of the storage layer: disk kinds from XML, the resolver's unknowns, the graph's
answer to "what does removing this free", and the guards of the local-files backend.

Images are real qcow2 files made with qemu-img in a temporary directory; the hypervisor is
libvirt's test driver (a local one, so its image paths are this machine's files).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tui.core import domxml
from tui.core.errors import InvalidInputError, OperationError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DiskKind
from tui.core.storage import LocalFiles, Owner, RemoteHostError, Resolver, StorageGraph

DISKS = """<domain type='kvm'><name>k</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/img/a.qcow2'/><target dev='vda'/></disk>
<disk type='block' device='disk'><source dev='/dev/loop7'/><target dev='vdb'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='nbd' name='victim'><host name='127.0.0.1' port='10809'/></source>
  <target dev='vdc'/></disk>
<disk type='volume' device='disk'><source pool='default' volume='v1.qcow2'/>
  <target dev='vdd'/></disk>
<disk type='file' device='cdrom'><source file='/iso/debian.iso'/><target dev='sda'/>
  <readonly/></disk>
<disk type='file' device='cdrom'><target dev='sdb'/><readonly/></disk>
<disk type='dir' device='disk'><source dir='/srv/share'/><target dev='vde'/></disk>
</devices></domain>"""


def make(path: Path, backing: Path | None = None, fmt: str = "qcow2") -> str:
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*args, str(path), *([] if backing else ["16M"])], check=True)
    return str(path)


def test_every_disk_has_a_kind_and_only_files_have_a_path() -> None:
    disks = {d.target: d for d in domxml.disks(domxml.parse(DISKS))}
    assert {t: d.kind for t, d in disks.items()} == {
        "vda": DiskKind.FILE,
        "vdb": DiskKind.BLOCK,
        "vdc": DiskKind.NETWORK,
        "vdd": DiskKind.VOLUME,
        "sda": DiskKind.FILE,
        "sdb": DiskKind.EMPTY,
        "vde": DiskKind.DIR,
    }
    # An NBD export's name, a device node or a volume name is never taken for an image path.
    assert {t for t, d in disks.items() if d.path} == {"vda", "sda"}
    assert disks["vdc"].source == "nbd://127.0.0.1/victim"
    assert disks["vdd"].source == "default/v1.qcow2"
    assert [t for t, d in disks.items() if d.is_image] == ["vda"]
    assert disks["vdb"].described == "block device /dev/loop7"
    assert disks["sda"].described == "cdrom file /iso/debian.iso"
    assert disks["sdb"].described == "empty drive"


def test_unknown_is_not_zero_and_says_why(tmp_path: Path, test_hv: Hypervisor) -> None:
    base = tmp_path / "base.qcow2"
    make(base)
    top = make(tmp_path / "top.qcow2", base)
    (tmp_path / "adir").mkdir()
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 4092)  # a qcow2 magic and a garbage header
    base.unlink()
    r = Resolver(test_hv)
    chain = r.chain(top)
    assert not chain.complete and chain.problem and str(base) in chain.problem
    assert chain.links[-1].virtual_bytes is None and chain.links[-1].actual_bytes is None
    assert "no such file" in (chain.links[-1].reason or "")
    d = r.image(str(tmp_path / "adir"))
    assert d.virtual_bytes is None and "directory" in (d.reason or "")
    b = r.image(str(broken))
    assert b.actual_bytes is None and b.reason
    # Another host: nothing is read from this machine, even where the path exists here.
    remote = Resolver(Hypervisor("qemu+ssh://far.example/system", test_hv.conn))
    img = remote.image(top)
    assert img.actual_bytes is None and "another host" in (img.reason or "")
    assert remote.reader.parsed == 0 and remote.reader.qemu_img_calls == 0


def test_symlinked_directory_is_one_identity(tmp_path: Path, test_hv: Hypervisor) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    base = make(real / "base.qcow2")
    clone = make(real / "clone.qcow2", tmp_path / "link" / "base.qcow2")
    g = StorageGraph(
        Resolver(test_hv),
        [
            Owner(
                "tpl", domxml.disks(domxml.parse(_dom("tpl", str(tmp_path / "link/base.qcow2"))))
            ),
            Owner("c", domxml.disks(domxml.parse(_dom("c", clone)))),
        ],
    )
    assert g.chain_paths(clone) == (clone, base)
    assert {u.name for u in g.users([str(tmp_path / "link" / "base.qcow2")], exclude="tpl")} == {
        "c"
    }


def test_what_a_removal_frees(tmp_path: Path, test_hv: Hypervisor) -> None:
    base = make(tmp_path / "base.qcow2")
    os.chmod(base, 0o444)
    mine = make(tmp_path / "mine.qcow2", Path(base))
    snap = make(tmp_path / "mine.s1.qcow2", Path(mine))
    other = make(tmp_path / "other.qcow2", Path(base))
    by_hand = make(tmp_path / "by-hand.qcow2", Path(mine))  # nobody's disk, but it builds on mine
    owners = [
        Owner("me", domxml.disks(domxml.parse(_dom("me", snap)))),
        Owner("you", domxml.disks(domxml.parse(_dom("you", other)))),
    ]
    g = StorageGraph(Resolver(test_hv), owners)
    freed = g.freed([snap], exclude="me", own_tops=[snap], read_only_is_shared=True)
    assert freed.delete == (snap,)
    why = dict(freed.kept)
    assert why[mine] == f"backs {by_hand}"
    assert why[base].startswith("used by you") or "read-only" in why[base]
    os.unlink(by_hand)
    g = StorageGraph(Resolver(test_hv), owners)
    freed = g.freed([snap], exclude="me", own_tops=[snap], read_only_is_shared=True)
    assert freed.delete == (snap, mine) and [p for p, _ in freed.kept] == [base]


def test_local_files_touch_only_regular_files_of_this_machine(
    tmp_path: Path, test_hv: Hypervisor
) -> None:
    with pytest.raises(RemoteHostError, match="rm --storage needs the image files on this"):
        LocalFiles(Hypervisor("qemu+ssh://far.example/system", test_hv.conn), "rm --storage")
    files = LocalFiles(test_hv, "test")
    (tmp_path / "d").mkdir()
    with pytest.raises(OperationError, match="not a regular file"):
        files.delete(str(tmp_path / "d"))
    with pytest.raises(OperationError, match="not a regular file"):
        files.delete("/dev/null")
    assert files.delete(str(tmp_path / "never-was")) is False
    existing = make(tmp_path / "x.qcow2")
    with pytest.raises(InvalidInputError, match="never overwrites"):
        files.create_overlay(existing, existing, "qcow2")
    with pytest.raises(OperationError, match="is a directory"):
        files.make_read_only(str(tmp_path / "d"))
    assert os.path.isdir(tmp_path / "d") and os.path.exists("/dev/null")


def _dom(name: str, path: str) -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{path}'/><target dev='vda'/></disk>"
        "</devices></domain>"
    )


def test_small_files_are_read_whole_and_written_new_never_over_another(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    """NVRAM variables move as small files (tui.core.migrate): read whole, written new (0600);
    an existing file is never overwritten, a file over the limit never read."""
    from tui.core.storage.local import AlreadyExists

    files = LocalFiles(test_hv, "migrate")
    path = str(tmp_path / "vm_VARS.fd")
    files.write_small(path, b"\x00efi\xff" * 1000)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert files.read_small(path) == b"\x00efi\xff" * 1000
    with pytest.raises(AlreadyExists):
        files.write_small(path, b"other")
    assert files.read_small(path) == b"\x00efi\xff" * 1000
    with pytest.raises(OperationError, match="larger than"):
        files.read_small(path, limit=100)
    with pytest.raises(OperationError, match="does not exist"):
        files.read_small(str(tmp_path / "missing"))
