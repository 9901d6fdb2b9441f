"""Template identity and migrate plans that need no daemon (issue 20)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tui.core import baseid, domxml
from tui.core.errors import OperationError
from tui.core.models import VirtdeckMeta
from tui.core.storage.digest import (
    READBACK_SCRIPT,
    SEGMENT,
    BackgroundDigest,
    SegmentDigest,
    SegmentReadback,
    StreamDigest,
    _local,
    combine,
    parse_readback,
    readback,
)


def test_base_identity_round_trips_through_the_metadata() -> None:
    ident = (
        ("vda", ("sha256:" + "a" * 64, "sha256:" + "b" * 64)),
        ("vdb", ("sha256:" + "c" * 64,)),
    )
    root = domxml.parse("<domain type='kvm'><name>t</name></domain>")
    domxml.write_meta(root, VirtdeckMeta(role="template", base_identity=ident))
    again = domxml.read_meta(domxml.parse(domxml.to_string(root)))
    assert again.base_identity == ident
    assert domxml.read_meta(domxml.parse("<domain><name>x</name></domain>")).base_identity is None
    assert baseid.find_base(ident, ident[1][1]) == "vdb"
    assert baseid.find_base(ident, ("sha256:" + "d" * 64,)) is None
    assert baseid.find_base(None, ident[0][1]) is None  # unknown is never a match


def test_a_stream_of_data_and_holes_hashes_as_the_file_does(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as fh:
        fh.write(b"x" * 4096)
        fh.seek(3 * 1024**2 + 17)
        fh.write(b"end")
    digest = StreamDigest()
    digest.data(b"x" * 4096)
    digest.hole(3 * 1024**2 + 17 - 4096)
    digest.data(b"end")
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest.hexdigest() == expected == _local(str(path), None)
    assert digest.length == os.path.getsize(path)
    with BackgroundDigest() as background:  # hashed on its own thread, in the same order
        for _ in range(40):  # more than its queue holds
            background.data(b"x" * 4096)
            background.hole(5000)
    serial = StreamDigest()
    for _ in range(40):
        serial.data(b"x" * 4096)
        serial.hole(5000)
    assert background.hexdigest() == serial.hexdigest()


def test_a_failing_stream_ends_the_hashing_thread() -> None:
    with pytest.raises(OSError), BackgroundDigest() as digest:
        digest.data(b"y" * 100)
        raise OSError("the stream broke")
    assert not digest._thread.is_alive()


class _Here:
    """A hypervisor that is this machine, as SegmentReadback sees one."""

    local = True
    uri = "qemu:///system"


HERE: Any = _Here()


def _segments_of(data: bytes) -> str:
    return combine([hashlib.sha256(data[i : i + SEGMENT]).digest()
                    for i in range(0, len(data), SEGMENT)])  # fmt: skip


def _sparse(path: Path, size: int) -> bytes:
    """A file of `size` bytes, data across segment edges and holes between; its bytes."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for at in (0, SEGMENT - 3000, 2 * SEGMENT + 5, size - 10):
            if 0 <= at < size:
                fh.seek(at)
                fh.write(os.urandom(min(6000, size - at)))
    return path.read_bytes()


def test_the_segmented_figure_is_the_same_fed_as_a_stream_read_here_or_by_the_script(
    tmp_path: Path,
) -> None:
    """migrate proves a layer with the SEGMENTED figure: the source hashes it as it streams
    (data and holes, chunks across segment edges), the target reads it back on this machine
    (threads) or over SSH (READBACK_SCRIPT, run here by sh as the host would run it). The
    three agree, for a file of segments and a bit, of exactly one, and empty; the script also
    hashes ranges, flushes, and gives the whole-file figure (template copy)."""
    script = ["sh", "-c", READBACK_SCRIPT, "sh"]
    for name, size in (("bit", 2 * SEGMENT + 4321), ("one", SEGMENT), ("empty", 0)):
        path = tmp_path / name
        data = _sparse(path, size)
        expected = _segments_of(data)
        fed = SegmentDigest()
        at = 0
        for step in (1, 70000, SEGMENT, 3 * SEGMENT):  # chunks that straddle the edges
            fed.data(data[at : at + step])
            at = min(size, at + step)
        assert at == size
        holes = SegmentDigest()  # the same bytes, the zeros fed as holes
        for offset in range(0, size, 1 << 20):
            chunk = data[offset : offset + (1 << 20)]
            holes.hole(len(chunk)) if not chunk.strip(b"\0") else holes.data(chunk)
        assert fed.hexdigest() == holes.hexdigest() == expected, name
        assert fed.length == size
        assert readback(HERE, str(path), expected) == expected
        assert readback(HERE, str(path), "sha256:") == _local(str(path), None)
        for args in (["segments", "0", "-", "flush"], ["segments", "0", "-", ""]):
            proc = subprocess.run([*script, str(path), *args], capture_output=True, text=True)
            got_size, got = parse_readback(proc.stdout, str(path), "here")
            assert proc.returncode == 0 and got_size == size, proc.stderr
            assert combine([got[i] for i in range(len(got))]) == expected, name
        proc = subprocess.run([*script, str(path), "whole", "0", "-", "flush"],
                              capture_output=True, text=True)  # fmt: skip
        assert parse_readback(proc.stdout, str(path), "here")[1][-1].hex() == (
            hashlib.sha256(data).hexdigest()
        )
    path = tmp_path / "bit"
    proc = subprocess.run([*script, str(path), "segments", "1", "2", ""], capture_output=True,
                          text=True)  # fmt: skip
    assert sorted(parse_readback(proc.stdout, str(path), "here")[1]) == [1]
    os.symlink(path, tmp_path / "link")
    proc = subprocess.run([*script, str(tmp_path / "link"), "segments", "0", "-", "flush"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 3 and "not a regular file" in proc.stderr
    with pytest.raises(OperationError, match="checksumming /x on here"):
        parse_readback("", "/x", "here")


def test_a_readback_reads_what_landed_early_and_finds_a_changed_byte(tmp_path: Path) -> None:
    path = tmp_path / "layer"
    data = _sparse(path, 3 * SEGMENT + 99)
    expected = _segments_of(data)
    with SegmentReadback(HERE, str(path)) as reading:
        reading.landed(SEGMENT // 2)  # no whole segment yet: nothing asked
        assert reading._reads == []
        reading.landed(2 * SEGMENT + 1)  # two whole segments: read now, on a worker
        assert len(reading._reads) == 1 and reading._next == 2
        assert reading.hexdigest() == expected
    with open(path, "r+b") as fh:  # a byte of the first segment changes after it was read
        fh.seek(SEGMENT - 3000)
        fh.write(bytes([data[SEGMENT - 3000] ^ 1]))
    with SegmentReadback(HERE, str(path)) as reading:
        reading.landed(3 * SEGMENT)
        assert reading.hexdigest() != expected


async def test_key_m_and_the_palette_offer_migrate(tmp_path: Path) -> None:
    """`M` and "Migrate NAME" in the palette: with one host connected, one clear line."""
    import pytest

    from tests.test_palette import _choose, _ready
    from tui.app import VirtdeckApp
    from tui.core import demo
    from tui.core.hypervisor import Hypervisor
    from tui.widgets.domains import DomainsTable

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        hv = Hypervisor.open(demo.ensure_lab(), demo=True)
    app = VirtdeckApp([hv], poll_interval=3600)
    try:
        async with app.run_test(size=(140, 45)) as pilot:
            await _ready(app, pilot)
            hit = await _choose(app, pilot, "migrate web-3")
            assert hit.startswith("Migrate web-3")
            assert any("nowhere to migrate to" in n.message for n in app._notifications)
            table = app.main.query_one(DomainsTable)
            assert table.select_name("db")
            await pilot.press("M")
            await pilot.pause()
            assert sum("nowhere to migrate" in n.message for n in app._notifications) == 2
    finally:
        hv.close()


async def test_key_m_asks_for_the_target_host_and_directory(tmp_path: Path) -> None:
    """With two hosts `M` asks where to: the other hosts, and an image directory there (the
    CLI's --dir); a relative directory gets one line in the form, Escape plans nothing, Enter
    plans (here the plan is refused: the test driver holds no image files)."""
    import pytest
    from textual.widgets import Input, Select, Static

    from tests.test_palette import _ready
    from tests.waiting import wait_for
    from tui.app import VirtdeckApp
    from tui.core import demo
    from tui.core.hypervisor import Hypervisor
    from tui.modals.confirm import PlanScreen
    from tui.modals.migrate_form import MigrateScreen
    from tui.widgets.domains import DomainsTable

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        hv = Hypervisor.open(demo.ensure_lab(), demo=True)
    other = Hypervisor.open("test:///default")
    app = VirtdeckApp([hv, other], poll_interval=3600)
    try:
        async with app.run_test(size=(140, 45)) as pilot:
            await _ready(app, pilot)
            assert app.main.query_one(DomainsTable).select_name("db")
            await pilot.press("M")
            await wait_for(pilot, lambda: isinstance(app.screen, MigrateScreen), what="the form")
            form = app.screen
            assert form.query_one("#target", Select).value == "test:///default"
            form.query_one("#dir", Input).value = "images/here"
            await pilot.press("tab", "enter")
            await pilot.pause()
            assert "not an absolute path" in str(form.query_one("#error", Static).render())
            assert app.screen is form
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, MigrateScreen))
            await app.workers.wait_for_complete()
            assert not isinstance(app.screen, PlanScreen)
            before = len(app._notifications)
            await pilot.press("M")
            await wait_for(pilot, lambda: isinstance(app.screen, MigrateScreen), what="the form")
            app.screen.query_one("#dir", Input).value = "/var/lib/elsewhere"
            app.screen.query_one("#dir", Input).focus()
            await pilot.press("enter")
            await wait_for(
                pilot,
                lambda: isinstance(app.screen, PlanScreen) or len(app._notifications) > before,
                what="a plan or its refusal",
            )
            assert not isinstance(app.screen, MigrateScreen)
    finally:
        hv.close()
        other.close()


def test_live_migration_goes_to_the_target_uri_host_and_keeps_loopback_private() -> None:
    import libvirt

    from tui.core import livemigrate

    assert livemigrate.migration_host("qemu+ssh://root@kvm2.example:2222/system") == (
        "kvm2.example",
        False,
    )
    assert livemigrate.migration_host("qemu+ssh://vdtest@127.0.0.1:41/session") == (
        "127.0.0.1",
        True,
    )
    assert livemigrate.migration_host("qemu:///system") == ("127.0.0.1", True)
    assert livemigrate.migration_host("qemu+ssh://[fd00::2]/system")[0] == "[fd00::2]"
    params, flags = livemigrate.parameters("qemu+ssh://kvm2/system", "<d/>", "<p/>", ["vda"], 40)
    assert params[libvirt.VIR_MIGRATE_PARAM_URI] == "tcp://kvm2"
    assert params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] == "tcp://kvm2"
    assert params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda"]
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 40
    assert libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS not in params  # a remote target: its own
    assert flags & libvirt.VIR_MIGRATE_NON_SHARED_INC and flags & libvirt.VIR_MIGRATE_LIVE
    # Loopback: the target listens on loopback only; shared storage: no storage copy.
    params, flags = livemigrate.parameters("qemu:///system", "<d/>", "<p/>", [], None)
    assert params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] == "127.0.0.1"
    assert not flags & libvirt.VIR_MIGRATE_NON_SHARED_INC
    assert libvirt.VIR_MIGRATE_PARAM_BANDWIDTH not in params


def test_migrate_live_options_refuse_bad_values_with_one_line() -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tui", "-c", "test:///default", "migrate",
                               *args], capture_output=True, text=True, timeout=60)  # fmt: skip

    for args, says in (
        (["test", "--to", "test:///default", "--max-downtime", "50"], "apply to a live"),
        (["test", "--to", "test:///default", "--live", "--bandwidth", "0"], "positive"),
        (["test", "--to", "test:///default", "--live", "--max-downtime", "x"], "whole number"),
    ):
        proc = run(*args)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_uefi_variables_that_are_no_file_are_refused_not_dropped(tmp_path: Path) -> None:
    """An <nvram> with a network source names no path to copy: refused in one line (before,
    the plan would have gone on and left the variables behind)."""
    from tui.core import migrate
    from tui.core.errors import InvalidInputError
    from tui.core.hypervisor import Hypervisor
    from tui.core.testdriver import node_xml

    node = tmp_path / "node.xml"
    node.write_text(node_xml([]))
    source, target = Hypervisor.open(f"test://{node}"), Hypervisor.open("test:///default")
    try:
        source.define(
            "<domain type='test'><name>uefi-net</name><memory>65536</memory><os>"
            "<type>hvm</type><loader readonly='yes' type='pflash'>/x/OVMF_CODE.fd</loader>"
            "<nvram type='network'><source protocol='nbd' name='vars'>"
            "<host name='127.0.0.1' port='10809'/></source></nvram></os></domain>"
        )
        with pytest.raises(InvalidInputError, match="UEFI variables that are not a file"):
            migrate.plan_migrate(source, target, "uefi-net")
    finally:
        source.close()
        target.close()
