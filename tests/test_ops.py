"""The operations framework: journals, unwinding, recover (CLI and the dashboard's offer)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tui.app import VirtdeckApp
from tui.cli import main
from tui.core import ops
from tui.core.errors import OperationError
from tui.core.hypervisor import Hypervisor


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def stale_journal(hv: Hypervisor, tmp_path: Path) -> tuple[Path, str]:
    """What a SIGKILLed clone leaves: a journal naming a defined domain and a made file."""
    disk = tmp_path / "half.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    hv.conn.defineXML(
        "<domain type='test'><name>half</name><memory>65536</memory><os><type>hvm</type></os>"
        "</domain>"
    )
    uuid = hv.conn.lookupByName("half").UUIDString()
    journal = ops.Journal(hv.uri, "deploying 1 full clone(s) of 'template-web'")
    journal.push("undefine 'half'", "undefine", uuid=uuid, name="half", keep_nvram=True)
    journal.push(f"remove {disk}", "delete_file", path=str(disk))
    data = json.loads(journal.path.read_text())
    data["pid"] = dead_pid()
    journal.path.write_text(json.dumps(data))
    return journal.path, str(disk)


def test_running_unwinds_newest_first_and_leaves_no_journal(test_hv: Hypervisor) -> None:
    done: list[str] = []
    ops.UNDO["_test"] = lambda hv, what: done.append(what)
    try:
        with (
            pytest.raises(OperationError, match=r"boom \(undid 2 step\(s\)\)"),
            ops.running(test_hv, "testing") as undo,
        ):
            undo.push("first", "_test", what="first")
            undo.push("second", "_test", what="second")
            raise OperationError("boom")
    finally:
        del ops.UNDO["_test"]
    assert done == ["second", "first"]
    assert ops.pending() == []


def test_cancel_stops_at_the_next_progress_report() -> None:
    seen: list[str] = []
    report = ops.cancellable(lambda m, _f: seen.append(m))
    report("one", None)
    ops.cancel("interrupted by SIGTERM", 15)
    try:
        with pytest.raises(ops.Interrupted, match="SIGTERM") as caught:
            report("two", None)
        assert caught.value.exit_status == 143
    finally:
        ops.reset_cancel()
    assert seen == ["one"]


def test_recover_lists_and_rolls_back(test_uri: str, test_hv: Hypervisor, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path, disk = stale_journal(test_hv, tmp_path)
    assert main(["-c", test_uri, "recover", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["undo"] for i in listed] == [[f"remove {disk}", "undefine 'half'"]]
    # The test driver keeps its state per connection: roll back through the same one.
    item = ops.pending()[0]
    assert ops.recover(test_hv, item) == []
    assert not test_hv.exists("half") and not Path(disk).exists() and not path.exists()
    assert main(["-c", test_uri, "recover"]) == 0
    assert capsys.readouterr().out.startswith("nothing to recover")


async def test_dashboard_offers_to_roll_back(test_hv: Hypervisor, tmp_path: Path) -> None:
    path, disk = stale_journal(test_hv, tmp_path)
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        deadline = time.monotonic() + 30
        while not app.interrupted:
            assert time.monotonic() < deadline, "no offer to roll back"
            await pilot.pause(0.05)
        texts = [n.message for n in app._notifications]
        assert any("left half-done" in t and "Roll back interrupted" in t for t in texts)
        commands = [c.title for c in app.get_system_commands(app.screen)]
        assert "Roll back interrupted operations" in commands
        app.roll_back_interrupted()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not app.interrupted
    assert not test_hv.exists("half") and not Path(disk).exists() and not path.exists()


def test_count_is_refused_at_once(test_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main(["-c", test_uri, "clone", "template-web", "x", "--count", "1000000000000"])
    assert exit_.value.code == 2 and time.monotonic() - started < 1.0
    assert "from 1 to 1000" in capsys.readouterr().err
