"""Fast snapshot tests: XML parsing, the tree, its drawing, plans and the CLI on the test driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tui.cli import main
from tui.core import snapshots as S
from tui.core.errors import InvalidInputError, NotFoundError
from tui.core.hypervisor import Hypervisor
from tui.core.testdriver import DiskSpec, DomainSpec, node_xml


def snap_xml(
    name: str,
    parent: str | None = None,
    *,
    created: int = 1_700_000_000,
    state: str = "shutoff",
    disk: str = "internal",
    memory: str = "no",
    overlay: str = "/nonexistent/ov.qcow2",
    description: str = "",
) -> str:
    parent_xml = f"<parent><name>{parent}</name></parent>" if parent else ""
    src = f"<source file='{overlay}'/>" if disk == "external" else ""
    mem_file = " file='/nonexistent/vm.mem'" if memory == "external" else ""
    return (
        f"<domainsnapshot><name>{name}</name><description>{description}</description>"
        f"<state>{state}</state>{parent_xml}<creationTime>{created}</creationTime>"
        f"<memory snapshot='{memory}'{mem_file}/>"
        f"<disks><disk name='vda' snapshot='{disk}'>{src}</disk></disks>"
        "<domain type='kvm'><name>vm</name><devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2'/><source file='/img/vm.qcow2'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain></domainsnapshot>"
    )


# virsh snapshot-list --tree, captured on libvirt 9.0 for this tree.
VIRSH_TREE = (
    "a1\n  |\n  +- a2\n  |   |\n  |   +- a3\n  |   +- c1\n  |     \n"
    "  +- b1\n      |\n      +- b2\n        \n\n"
)


def sample_tree() -> S.SnapshotTree:
    nodes = [
        S.parse_snapshot_xml(snap_xml("c1", "a2", created=6), current=True),
        S.parse_snapshot_xml(snap_xml("a1", created=1)),
        S.parse_snapshot_xml(snap_xml("b2", "b1", created=5)),
        S.parse_snapshot_xml(snap_xml("a3", "a2", created=3)),
        S.parse_snapshot_xml(snap_xml("a2", "a1", created=2)),
        S.parse_snapshot_xml(snap_xml("b1", "a1", created=4)),
    ]
    return S.build_tree("vm", nodes)


def test_tree_order_links_and_drawing() -> None:
    tree = sample_tree()
    assert tree.names == ("a1", "a2", "a3", "c1", "b1", "b2")
    assert tree.get("a1").children == ("a2", "b1")
    assert tree.current is not None and tree.current.name == "c1"
    assert [d for _, d in tree.walk()] == [0, 1, 2, 2, 1, 2]
    assert tree.render(mark_current=False) == VIRSH_TREE
    assert "c1 (current)" in tree.render()
    assert tree.descendants("a1") == ["a3", "c1", "a2", "b2", "b1"]
    with pytest.raises(NotFoundError, match="no snapshot named 'zz'"):
        tree.get("zz")


def test_single_snapshot_drawn_like_virsh() -> None:
    tree = S.build_tree("vm", [S.parse_snapshot_xml(snap_xml("s1"))])
    assert tree.render(mark_current=False) == "s1\n\n\n"  # what virsh 9.0 prints


def test_kinds_and_files(tmp_path: Path, test_hv: Hypervisor) -> None:
    ov = tmp_path / "vm.s.vda.qcow2"
    ov.write_bytes(b"x" * 8192)
    internal = S.parse_snapshot_xml(snap_xml("i", state="running", memory="internal"))
    external = S.parse_snapshot_xml(
        snap_xml("e", state="running", disk="external", memory="external", overlay=str(ov))
    )
    disk_only = S.parse_snapshot_xml(
        snap_xml("d", state="disk-snapshot", disk="external", overlay=str(ov), description="x")
    )
    assert internal.kind == "internal" and internal.files == ()
    assert external.kind == "external" and external.memory_file == "/nonexistent/vm.mem"
    assert [(f.role, f.path) for f in external.files] == [
        ("disk vda", str(ov)),
        ("memory", "/nonexistent/vm.mem"),
    ]
    # Parsing never stats files (they may live on another host); the tree asks the storage
    # resolver of the domain's hypervisor (here a local test driver) for their sizes.
    assert all(f.size_bytes is None for f in external.files)
    sized = S.tree._with_sizes(external, None, test_hv)
    assert sized.files[0].size_bytes and sized.files[0].size_bytes >= 8192
    assert sized.files[1].size_bytes is None  # gone: no size, no crash, and the reason
    assert sized.files[1].problem and "no such file" in sized.files[1].problem
    assert disk_only.kind == "disk-only" and disk_only.description == "x"
    d = disk_only.disk("vda")
    assert d is not None and d.image == "/img/vm.qcow2" and d.overlay == str(ov)
    row = external.to_json()
    assert set(row) >= {"name", "parent", "created", "state", "kind", "current", "files"}
    assert row["created"].startswith("2023-11-14T")


class _FakeConn:
    def __init__(self, caps: str) -> None:
        self.caps = caps

    def getCapabilities(self) -> str:  # noqa: N802 - libvirt's name
        return self.caps


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ("<disksnapshot default='on' toggle='no'/>", False),  # libvirt 9.0
        ("<disksnapshot default='on' toggle='no'/><externalSnapshot/>", True),  # 9.9+
    ],
)
def test_capability_probe(features: str, expected: bool) -> None:
    caps = f"<capabilities><host/><guest><features>{features}</features></guest></capabilities>"
    assert S.libvirt_handles_external(Hypervisor("fake://", _FakeConn(caps))) is expected


@pytest.fixture
def raw_uri(tmp_path: Path) -> str:
    path = tmp_path / "node.xml"
    path.write_text(
        node_xml(
            [
                DomainSpec("rawvm", "shutoff", disks=(DiskSpec("/var/tmp/vd-r.img", "raw"),)),
                DomainSpec("qvm", "shutoff", disks=(DiskSpec("/var/tmp/vd-q.qcow2"),)),
            ]
        )
    )
    return f"test://{path}"


def test_plan_refusals_on_test_driver(raw_uri: str) -> None:
    hv = Hypervisor.open(raw_uri)
    try:
        with pytest.raises(InvalidInputError, match="use --external"):
            S.plan_create(hv, "rawvm", "s1")
        with pytest.raises(InvalidInputError, match="invalid snapshot name"):
            S.plan_create(hv, "qvm", "a/b")
        with pytest.raises(InvalidInputError, match="--disk-only goes with --external"):
            S.plan_create(hv, "qvm", "s1", disk_only=True)
        plan = S.plan_create(hv, "qvm", "s1", description="before upgrade")
        assert plan.kind == "internal" and plan.overlays == ()
        assert "<description>before upgrade</description>" in plan.xml
        ext = S.plan_create(hv, "rawvm", "s1", external=True)
        assert ext.kind == "disk-only"  # shut off: nothing in memory to save
        assert ext.overlays == (("vda", "/var/tmp/vd-r.img", "/var/tmp/rawvm.s1.vda.qcow2"),)
        with pytest.raises(NotFoundError, match="no current snapshot"):
            S.plan_rollback(hv, "qvm")
    finally:
        hv.close()


def test_internal_snapshots_on_test_driver(
    test_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hv = Hypervisor.open(test_uri)
    try:
        S.create(hv, S.plan_create(hv, "beta", "one", description="first"))
        S.create(hv, S.plan_create(hv, "beta", "two"))
        tree = S.snapshot_tree(hv, "beta")
        assert tree.names == ("one", "two") and tree.get("two").parent == "one"
        assert tree.current is not None and tree.current.name == "two"
        plan = S.plan_rollback(hv, "beta")
        assert plan.snapshot == "two" and plan.method == "libvirt"
        S.revert(hv, S.plan_revert(hv, "beta", "one"))
        assert S.snapshot_tree(hv, "beta").current.name == "one"  # type: ignore[union-attr]
        with pytest.raises(InvalidInputError, match="add --external|internal"):
            S.plan_create(hv, "beta", "ext", external=True)
        S.delete(hv, S.plan_delete(hv, "beta", "one", children=True))
        assert S.snapshot_tree(hv, "beta").nodes == ()
    finally:
        hv.close()
    # The CLI on the same (fresh) test hypervisor.
    assert main(["-c", test_uri, "snapshot", "ls", "beta", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["-c", test_uri, "snapshot", "revert", "beta", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no snapshot named 'nope'" in err
    assert main(["-c", test_uri, "rollback", "beta"]) == 1
    assert "no current snapshot" in capsys.readouterr().err


def test_a_description_is_one_line_of_printable_text(
    test_uri: str, test_hv: Hypervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17, case 7: refused at planning; one another tool stored is shown escaped."""
    for text in ("line one\nforged line", "bell\x07", "esc\x1b[2J"):
        assert (
            main(["-c", test_uri, "snapshot", "create", "beta", "s1", "--description", text]) == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the description holds a control character" in err, err
    dom = test_hv.conn.lookupByName("beta")
    dom.snapshotCreateXML(
        "<domainsnapshot><name>s2</name><description>one&#10;two</description></domainsnapshot>", 0
    )
    node = S.snapshot_tree(test_hv, "beta").get("s2")
    assert node.description == "one\\ntwo"
