"""Disk usage on real images: numbers against qemu-img and du, shared bases once, caches, pools.

The fast tests use real qcow2 files made by qemu-img in a tmp dir and libvirt's test driver for
the domains; the `system` tests use qemu:///system (a dir pool, a running domain).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tests.lab import SystemLab
from tui.cli import main
from tui.core.hypervisor import Hypervisor, is_local_uri
from tui.core.models import DiskInfo, VirtdeckMeta
from tui.core.storage.qemuimg import QemuImg
from tui.core.storage.reader import ImageReader, parse_qcow2
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml
from tui.core.usage import UsageCollector, parse_block_stats

MiB = 1024**2


def run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


def qemu_img_info(path: str) -> dict:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path))


def du(*paths: str) -> int:
    """`du -B1` of distinct files, total (du counts a file given twice once, like us)."""
    out = run("du", "-B1", "-c", *paths)
    return int(out.strip().splitlines()[-1].split()[0])


def write(path: str, pattern: str, offset: int, length: int) -> None:
    run("qemu-io", "-c", f"write -P {pattern} {offset} {length}", path)


@dataclass
class Lab:
    dir: Path
    base: str
    thin: list[str]
    full: str
    specs: list[DomainSpec]
    uri: str

    def all_files(self) -> list[str]:
        return [self.base, *self.thin, self.full]


def thin_spec(name: str, path: str, base: str, state: str = "shutoff") -> DomainSpec:
    return DomainSpec(
        name,
        state,
        disks=(DiskSpec(path, backing=base),),
        meta=VirtdeckMeta(role="clone", source="tpl", mode="thin"),
    )


def write_node(path: Path, specs: Sequence[DomainSpec], extra: str = "") -> str:
    xml = node_xml(list(specs))
    if extra:
        xml = xml.replace("</node>", extra + "</node>")
    path.write_text(xml)
    return f"test://{path}"


@pytest.fixture
def ulab(tmp_path: Path) -> Lab:
    """A template base holding 8 MiB, three thin clones (4 MiB written into the first), one full
    clone made with qemu-img convert; test-driver domains pointing at them."""
    d = tmp_path
    base = str(d / "tpl.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    write(base, "0x11", 0, 8 * MiB)
    thin = []
    for i in (1, 2, 3):
        p = str(d / f"thin{i}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, p)
        thin.append(p)
    write(thin[0], "0xab", 0, 4 * MiB)
    full = str(d / "full1.qcow2")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", base, full)
    specs = [
        DomainSpec("tpl", disks=(DiskSpec(base),), meta=VirtdeckMeta(role="template")),
        thin_spec("thin1", thin[0], base, "running"),
        thin_spec("thin2", thin[1], base),
        thin_spec("thin3", thin[2], base),
        DomainSpec(
            "full1",
            disks=(DiskSpec(full),),
            meta=VirtdeckMeta(role="clone", source="tpl", mode="full"),
        ),
    ]
    return Lab(d, base, thin, full, specs, write_node(d / "node.xml", specs))


@pytest.fixture
def hv(ulab: Lab) -> Iterator[Hypervisor]:
    h = Hypervisor.open(ulab.uri)
    yield h
    h.close()


# -- numbers against qemu-img and du -------------------------------------------------------


def test_every_image_agrees_with_qemu_img_info_and_du(ulab: Lab, hv: Hypervisor) -> None:
    report = UsageCollector(hv).report()
    assert sorted(i.path for i in report.images) == sorted(ulab.all_files())
    for img in report.images:
        info = qemu_img_info(img.path)
        assert img.format == info["format"] == "qcow2"
        assert img.virtual_bytes == info["virtual-size"] == 64 * MiB
        assert img.actual_bytes == info["actual-size"] == du(img.path)
        assert img.actual_bytes == os.stat(img.path).st_blocks * 512
        assert img.backing == info.get("full-backing-filename")
        assert img.source == "file"
    assert report.image(ulab.thin[0]).actual_bytes > 4 * MiB  # the data written into it
    assert report.image(ulab.base).actual_bytes > 8 * MiB
    assert report.problems == ()


def test_template_totals_thin_against_full(ulab: Lab, hv: Hypervisor) -> None:
    report = UsageCollector(hv).report()
    (t,) = report.templates
    assert t.name == "tpl" and t.base == ulab.base and t.defined
    assert t.base_bytes == du(ulab.base)
    assert [(c.domain, c.path) for c in t.thin] == [
        ("thin1", ulab.thin[0]),
        ("thin2", ulab.thin[1]),
        ("thin3", ulab.thin[2]),
    ]
    assert [c.actual_bytes for c in t.thin] == [du(p) for p in ulab.thin]
    assert t.thin_bytes == du(*ulab.thin)
    assert [(c.domain, c.path, c.actual_bytes) for c in t.full] == [
        ("full1", ulab.full, du(ulab.full))
    ]
    assert t.full_bytes == du(ulab.full)
    # As full copies each thin clone would hold the base's data and its own.
    expected = sum(min(64 * MiB, du(ulab.base) + du(p)) for p in ulab.thin)
    assert t.full_equivalent_bytes == expected
    assert t.saved_bytes == expected - t.thin_bytes
    # The point of thin clones: all three together cost less than the one full clone.
    assert t.thin_bytes < t.full_bytes
    assert t.saved_bytes > 3 * 8 * MiB


def test_shared_base_is_counted_once(ulab: Lab, hv: Hypervisor) -> None:
    report = UsageCollector(hv).report()
    base = du(ulab.base)
    assert report.total_actual_bytes == du(*ulab.all_files())
    assert report.total_actual_bytes < base * 4  # counted per clone it would exceed this
    for i, name in enumerate(("thin1", "thin2", "thin3")):
        dom = report.domain(name)
        assert dom is not None
        assert dom.owned_bytes == du(ulab.thin[i])
        assert dom.shared_bytes == base
        assert dom.disks[0].chain == (ulab.thin[i], ulab.base)
    tpl = report.domain("tpl")
    assert tpl is not None and (tpl.owned_bytes, tpl.shared_bytes) == (0, base)
    full = report.domain("full1")
    assert full is not None and (full.owned_bytes, full.shared_bytes) == (du(ulab.full), 0)
    # A fourth thin clone adds its overlay, never the base again.
    p4 = str(ulab.dir / "thin4.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", ulab.base, p4)
    uri = write_node(ulab.dir / "node4.xml", [*ulab.specs, thin_spec("thin4", p4, ulab.base)])
    hv4 = Hypervisor.open(uri)
    try:
        report4 = UsageCollector(hv4).report()
    finally:
        hv4.close()
    assert report4.total_actual_bytes == report.total_actual_bytes + du(p4)
    assert report4.template("tpl").thin_bytes == du(*ulab.thin, p4)  # type: ignore[union-attr]


def test_an_undefined_template_is_found_from_its_backup_or_its_clones(ulab: Lab) -> None:
    """A template kept only as an XML backup: same totals, marked undefined; an unrelated
    backup (another host's) is left out."""
    specs = [s for s in ulab.specs if s.name != "tpl"]
    h = Hypervisor.open(write_node(ulab.dir / "undefined.xml", specs))
    tpl_disks = (DiskInfo(target="vda", path=ulab.base, format="qcow2"),)
    other = (DiskInfo(target="vda", path="/elsewhere/other.qcow2", format="qcow2"),)
    try:
        with_backup = UsageCollector(
            h, backups=lambda: [("tpl", tpl_disks), ("other", other)]
        ).report()
        from_clones = UsageCollector(h, backups=lambda: []).report()
    finally:
        h.close()
    for report in (with_backup, from_clones):
        (t,) = report.templates
        assert t.name == "tpl" and not t.defined and t.base == ulab.base
        assert t.thin_domains == ("thin1", "thin2", "thin3") and t.full_domains == ("full1",)
        assert t.thin_bytes == du(*ulab.thin) and t.base_bytes == du(ulab.base)
        assert report.total_actual_bytes == du(*ulab.all_files())
        assert report.problems == ()


# -- cache ---------------------------------------------------------------------------------


def test_cache_rereads_only_the_file_that_changed(ulab: Lab, hv: Hypervisor) -> None:
    collector = UsageCollector(hv)
    reader = collector.reader
    first = collector.report()
    assert reader.parsed == 5 and reader.qemu_img_calls == 0
    collector.report()
    assert reader.parsed == 5  # warm: one stat per image, no read
    before = first.image(ulab.thin[1]).actual_bytes  # type: ignore[union-attr]
    write(ulab.thin[1], "0xcd", 0, 6 * MiB)
    after = collector.report()
    assert reader.parsed == 6
    assert after.image(ulab.thin[1]).actual_bytes == du(ulab.thin[1]) > before + 5 * MiB  # type: ignore[union-attr]
    # A changed header (new backing file) is seen through the (mtime, size, inode) key.
    other = str(ulab.dir / "other.raw")
    run("qemu-img", "create", "-q", "-f", "raw", other, "64M")
    run("qemu-img", "rebase", "-u", "-F", "raw", "-b", other, ulab.thin[2])
    rebased = collector.report()
    thin3 = rebased.image(ulab.thin[2])
    assert thin3 is not None and (thin3.backing, thin3.backing_format) == (other, "raw")
    raw = rebased.image(other)
    assert raw is not None and raw.format == "raw"
    assert raw.virtual_bytes == 64 * MiB and raw.actual_bytes == du(other)
    assert rebased.template("tpl").thin_domains == ("thin1", "thin2")  # type: ignore[union-attr]


# -- formats and sources -------------------------------------------------------------------


def test_other_formats_fall_back_to_qemu_img_and_relative_backing_resolves(
    tmp_path: Path,
) -> None:
    vdi = str(tmp_path / "disk.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", vdi, "32M")
    base = str(tmp_path / "rel-base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
    top = str(tmp_path / "rel-top.qcow2")
    # A relative backing name: qemu resolves it against the overlay's directory.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "rel-base.qcow2", top)
    reader = ImageReader()
    img = reader.read(vdi)
    info = qemu_img_info(vdi)
    assert (img.format, img.virtual_bytes, img.actual_bytes) == (
        "vdi",
        info["virtual-size"],
        info["actual-size"],
    )
    assert img.source == "qemu-img" and reader.qemu_img_calls == 1
    reader.read(vdi)
    assert reader.qemu_img_calls == 1  # cached like the others
    rel = reader.read(top, "qcow2")
    assert rel.backing == base and rel.source == "file"
    with open(top, "rb") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        assert parse_qcow2(top, read) == (16 * MiB, "rel-base.qcow2", "qcow2")


def test_a_failing_qemu_img_is_a_problem_line_not_a_crash(ulab: Lab) -> None:
    vdi = str(ulab.dir / "odd.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", vdi, "32M")
    calls: list[list[str]] = []

    def broken(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 1, "", "qemu-img: boom\n")

    spec = DomainSpec("odd", disks=(DiskSpec(vdi, format="vdi"),))
    h = Hypervisor.open(write_node(ulab.dir / "odd.xml", [*ulab.specs, spec]))
    try:
        report = UsageCollector(h, qemu_img=QemuImg(runner=broken)).report()
    finally:
        h.close()
    assert calls and calls[0][:4] == ["qemu-img", "info", "-U", "--output=json"]
    assert "--backing-chain" in calls[0]
    odd = report.image(vdi)
    assert odd is not None and odd.source == "missing"
    assert any(vdi in p and "boom" in p and "\n" not in p for p in report.problems)
    assert report.template("tpl").thin_bytes == du(*ulab.thin)  # type: ignore[union-attr]


def _pool_xml(name: str, target: str, files: dict[str, str]) -> str:
    """A test-driver pool whose volumes carry the real files' qemu-img numbers at fake paths."""
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = target
    for fake, real in files.items():
        info = qemu_img_info(real)
        vol = ET.SubElement(pool, "volume", type="file")
        ET.SubElement(vol, "name").text = os.path.basename(fake)
        ET.SubElement(vol, "capacity", unit="bytes").text = str(info["virtual-size"])
        ET.SubElement(vol, "allocation", unit="bytes").text = str(info["actual-size"])
        tgt = ET.SubElement(vol, "target")
        ET.SubElement(tgt, "path").text = fake
        ET.SubElement(tgt, "format", type=info["format"])
        if "full-backing-filename" in info:
            bs = ET.SubElement(vol, "backingStore")
            ET.SubElement(
                bs, "path"
            ).text = f"{target}/{os.path.basename(info['full-backing-filename'])}"
            ET.SubElement(bs, "format", type=info["backing-filename-format"])
    return ET.tostring(pool, encoding="unicode")


def test_remote_style_paths_go_through_the_storage_pool_alone(ulab: Lab, hv: Hypervisor) -> None:
    """Images that are not local files (here: paths that do not exist on this machine) are
    measured through libvirt's storage volume API only, and give the same numbers."""
    remote = "/nonexistent/virtdeck-remote"
    fake = {f"{remote}/{os.path.basename(p)}": p for p in ulab.all_files()}
    back = {v: k for k, v in fake.items()}
    specs = []
    for s in ulab.specs:
        disks = tuple(
            DiskSpec(back[d.path], backing=back[d.backing] if d.backing else None) for d in s.disks
        )
        specs.append(DomainSpec(s.name, s.state, disks=disks, meta=s.meta))
    uri = write_node(ulab.dir / "remote.xml", specs, _pool_xml("remote", remote, fake))
    rhv = Hypervisor.open(uri)
    try:
        collector = UsageCollector(rhv, local=False)
        remote_report = collector.report()
    finally:
        rhv.close()
    local_report = UsageCollector(hv).report()
    assert collector.reader.parsed == 0 and collector.reader.qemu_img_calls == 0
    assert collector.pool_lookups == 5
    assert remote_report.problems == ()
    assert {i.source for i in remote_report.images} == {"pool"}
    assert remote_report.total_actual_bytes == local_report.total_actual_bytes
    for img in remote_report.images:
        local = local_report.image(fake[img.path])
        assert local is not None
        assert (img.format, img.virtual_bytes, img.actual_bytes) == (
            local.format,
            local.virtual_bytes,
            local.actual_bytes,
        )
        assert (img.backing is None) == (local.backing is None)
    rt, lt = remote_report.template("tpl"), local_report.template("tpl")
    assert rt is not None and lt is not None
    assert (rt.thin_bytes, rt.full_bytes, rt.full_equivalent_bytes, rt.base_bytes) == (
        lt.thin_bytes,
        lt.full_bytes,
        lt.full_equivalent_bytes,
        lt.base_bytes,
    )
    assert rt.thin_domains == ("thin1", "thin2", "thin3")


def test_a_local_file_it_cannot_read_falls_back_to_its_pool(ulab: Lab) -> None:
    """Local first, then the storage pool: a problem line only when no source can tell."""
    vdi = str(ulab.dir / "pooled.vdi")
    run("qemu-img", "create", "-q", "-f", "vdi", vdi, "32M")

    def broken(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), 1, "", "qemu-img: boom\n")

    spec = DomainSpec("pooled", disks=(DiskSpec(vdi, format="vdi"),))
    pool = _pool_xml("local", str(ulab.dir), {vdi: vdi})
    h = Hypervisor.open(write_node(ulab.dir / "pooled.xml", [*ulab.specs, spec], pool))
    try:
        collector = UsageCollector(h, qemu_img=QemuImg(runner=broken))
        report = collector.report()
    finally:
        h.close()
    img = report.image(vdi)
    assert img is not None and img.source == "pool" and img.format == "vdi"
    assert img.actual_bytes == qemu_img_info(vdi)["actual-size"]
    assert collector.reader.qemu_img_calls == 1 and collector.pool_lookups == 1
    assert report.problems == ()


def test_local_or_remote_is_decided_from_the_uri() -> None:
    assert is_local_uri("qemu:///system")
    assert is_local_uri("qemu+unix:///system?socket=/run/libvirt/libvirt-sock")
    assert is_local_uri("test:///tmp/node.xml")
    assert not is_local_uri("qemu+ssh://root@host/system")
    assert not is_local_uri("qemu+tcp://10.0.0.2/system")
    assert not is_local_uri("qemu://host.example/system")
    assert not is_local_uri("qemu+libssh2://host/system?known_hosts=/x")


def test_block_stats_chains_are_read_top_first() -> None:
    # The shape libvirt 9 and 11 give with VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING.
    st = {
        "block.count": 3,
        "block.0.name": "vda", "block.0.path": "/i/c1.qcow2", "block.0.backingIndex": 1,
        "block.0.allocation": 123, "block.0.capacity": 64 * MiB, "block.0.physical": 4 * MiB,
        "block.1.name": "vda", "block.1.path": "/i/base.qcow2", "block.1.backingIndex": 2,
        "block.1.allocation": 8 * MiB, "block.1.capacity": 64 * MiB, "block.1.physical": 9 * MiB,
        "block.2.name": "vdb", "block.2.path": "/i/data.raw",
        "block.2.allocation": 0, "block.2.capacity": MiB, "block.2.physical": MiB,
    }  # fmt: skip
    assert parse_block_stats(st) == {
        "/i/c1.qcow2": (64 * MiB, 4 * MiB, "/i/base.qcow2"),
        "/i/base.qcow2": (64 * MiB, 9 * MiB, None),
        "/i/data.raw": (MiB, MiB, None),
    }


# -- CLI -----------------------------------------------------------------------------------


def test_cli_json_has_the_documented_shape(ulab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", ulab.uri, "usage", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_actual_bytes"] == du(*ulab.all_files())
    for img in data["images"]:
        assert {"path", "format", "virtual_bytes", "actual_bytes", "backing"} <= set(img)
    (t,) = data["templates"]
    assert {
        "name", "base", "thin", "full", "thin_bytes", "full_bytes", "full_equivalent_bytes"
    } <= set(t)  # fmt: skip
    assert t["name"] == "tpl" and t["base"] == ulab.base
    assert [c["domain"] for c in t["thin"]] == ["thin1", "thin2", "thin3"]
    assert t["full"] == [{"domain": "full1", "path": ulab.full, "actual_bytes": du(ulab.full)}]
    assert t["thin_bytes"] == du(*ulab.thin)


def test_cli_plain_output_is_humanized(ulab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", ulab.uri, "usage"]) == 0
    out = capsys.readouterr().out
    assert "template tpl" in out
    assert "thin clones: 3 using" in out and "saved" in out
    assert "MiB" in out and str(du(ulab.base)) not in out
    assert "5 images" in out


def test_cli_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", "qemu+unix:///system?socket=/nonexistent/sock", "usage"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtdeck: ") and err.count("\n") == 1


# -- the real libvirtd ---------------------------------------------------------------------


def _sys_images(lab: SystemLab) -> tuple[str, list[str], str]:
    base = lab.disk("base.qcow2", "64M")
    write(base, "0x11", 0, 8 * MiB)
    thin = []
    for i in (1, 2, 3):
        p = str(lab.dir / f"thin{i}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, p)
        thin.append(p)
    write(thin[0], "0xab", 0, 4 * MiB)
    full = str(lab.dir / "full1.qcow2")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", base, full)
    return base, thin, full


def _set_meta(hv: Hypervisor, name: str, meta: VirtdeckMeta) -> None:
    from tui.core import domxml

    hv.lookup(name).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        domxml.meta_xml(meta),
        domxml.PREFIX,
        domxml.NS,
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    hv.invalidate()


@pytest.mark.system
def test_system_pool_gives_the_numbers_of_the_files(lab: SystemLab) -> None:
    """qemu:///system with a dir pool over the lab dir, read as if remote: pool API only."""
    hv = lab.hv
    base, thin, full = _sys_images(lab)
    tpl = lab.define("tpl", disks=[(base, "qcow2")])
    _set_meta(hv, tpl, VirtdeckMeta(role="template"))
    for i, p in enumerate(thin, 1):
        name = lab.define(f"thin{i}", disks=[(p, "qcow2")])
        _set_meta(hv, name, VirtdeckMeta(role="clone", source=tpl, mode="thin"))
    name = lab.define("full1", disks=[(full, "qcow2")])
    _set_meta(hv, name, VirtdeckMeta(role="clone", source=tpl, mode="full"))
    pool = hv.conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{lab.prefix}</name><target><path>{lab.dir}</path></target></pool>",
        0,
    )
    try:
        mine = [d for d in hv.domains() if d.name.startswith(lab.prefix)]
        assert len(mine) == 5
        remote = UsageCollector(hv, local=False)
        report = remote.report(mine)
        local = UsageCollector(hv).report(mine)
    finally:
        pool.destroy()  # transient: gone once stopped; the files stay for lab.cleanup()
    assert remote.reader.parsed == 0 and remote.reader.qemu_img_calls == 0
    assert report.problems == ()
    assert {i.source for i in report.images} == {"pool"}
    files = [base, *thin, full]
    assert sorted(i.path for i in report.images) == sorted(files)
    for img in report.images:
        loc = local.image(img.path)
        assert loc is not None and loc.source == "file"
        assert (img.format, img.virtual_bytes, img.actual_bytes, img.backing) == (
            loc.format,
            loc.virtual_bytes,
            loc.actual_bytes,
            loc.backing,
        )
    (t,) = report.templates
    assert t.thin_domains == tuple(lab.name(f"thin{i}") for i in (1, 2, 3))
    assert t.full_domains == (lab.name("full1"),)
    assert report.total_actual_bytes == local.total_actual_bytes
    assert t.thin_bytes == local.templates[0].thin_bytes < t.full_bytes


@pytest.mark.system
def test_system_running_clone_grows_through_block_stats(lab: SystemLab) -> None:
    """A running thin clone writes: its bulk block stats (no pool, no local file read) grow."""
    import libvirt_qemu

    hv = lab.hv
    base = lab.disk("base.qcow2", "64M")
    write(base, "0x11", 0, 8 * MiB)
    top = str(lab.dir / "clone.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
    name = lab.define("clone", disks=[(top, "qcow2")])
    dom = hv.lookup(name)
    dom.create()
    mine = [d for d in hv.domains() if d.name == name]
    collector = UsageCollector(hv, local=False)
    before = collector.report(mine)
    assert collector.blockstats_calls >= 1
    img = before.image(top)
    assert img is not None and img.source == "blockstats"
    assert img.backing == base and img.virtual_bytes == 64 * MiB
    assert img.actual_bytes == os.stat(top).st_blocks * 512
    assert before.image(base).actual_bytes == du(base)  # type: ignore[union-attr]
    # The guest writes 6 MiB, through QEMU itself: HMP qemu-io on the disk's own block backend
    # (-d takes a qdev path; QEMU 7.2), so QEMU's write lock on the image is respected.
    reply = libvirt_qemu.qemuMonitorCommand(
        dom,
        f'qemu-io -d {_qdev_path(dom)} "write -P 0xab 0 6M"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    assert reply.strip() == ""
    deadline = time.monotonic() + 10
    while True:
        after = collector.report(mine)
        grown = after.image(top).actual_bytes  # type: ignore[union-attr]
        if grown > img.actual_bytes + 5 * MiB or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert grown > img.actual_bytes + 5 * MiB
    assert grown == os.stat(top).st_blocks * 512


def _qdev_path(dom: libvirt.virDomain) -> str:
    alias = ET.fromstring(dom.XMLDesc(0)).find("devices/disk/alias")
    assert alias is not None
    return f"/machine/peripheral/{alias.get('name')}/virtio-backend"


def test_usage_core_loads_no_textual() -> None:
    code = "import sys, tui.core.usage, tui.core.storage.reader\nprint('\\n'.join(sys.modules))"
    mods = set(run(sys.executable, "-c", code).split())
    assert "tui.core.usage" in mods
    assert not {m for m in mods if m.split(".")[0] in ("textual", "rich")}
