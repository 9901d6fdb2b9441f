"""The operations framework: journals, unwinding, recover (CLI and the dashboard's offer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from tests.waiting import wait_for
from tui.app import VirtdeckApp
from tui.cli import main
from tui.core import ops, private
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
    journal = ops.Journal(hv.uri, "deploying 1 full clone(s) of 'template-web'", dirs=[tmp_path])
    journal.push("undefine 'half'", "undefine", uuid=uuid, name="half", keep_nvram=True)
    journal.push(f"remove {disk}", "delete_file", path=str(disk))
    journal.identify(private.identity(str(disk)))
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


def test_a_command_a_signal_stopped_ends_as_interrupted_even_when_it_reports_a_failure() -> None:
    """A command that catches its member's failure (its child killed by the signal) and
    returns 1 ends with the signal's status; one that finished (0) stays finished."""
    from tui.core.cancel import run_cancellable

    def failed_member() -> int:
        ops.cancel("interrupted by SIGHUP", 1)  # as the handler does when the signal comes
        return 1

    try:
        with pytest.raises(ops.Interrupted, match="SIGHUP") as caught:
            run_cancellable(failed_member)
        assert caught.value.exit_status == 129
    finally:
        ops.reset_cancel()
    try:
        assert run_cancellable(lambda: (ops.cancel("interrupted by SIGTERM", 15), 0)[1]) == 0
    finally:
        ops.reset_cancel()


def test_cancel_ends_a_child_with_what_it_started_in_its_group() -> None:
    """`timeout CMD` puts CMD in a process group of its own (the appliance probe of
    tui.core.templates runs that way): cancel() ends CMD too, so the reader of the pipe CMD
    holds returns, and nothing goes on alone."""
    import threading

    from tui.core import procs

    lines: list[str] = []
    statuses: list[int] = []
    argv = ["timeout", "60", "sh", "-c", "echo started; echo $$; exec sleep 60"]
    reader = threading.Thread(target=lambda: statuses.append(procs.stream(argv, lines.append)))
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines[:1] == ["started"], lines
        grandchild = int(lines[1])  # the sh that became `sleep 60`, timeout's child
        ops.cancel("interrupted by SIGTERM", 15)
        reader.join(30)
        assert not reader.is_alive()  # the pipe closed: the grandchild is gone too
        assert statuses and statuses[0] != 0
    finally:
        ops.reset_cancel()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{grandchild}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{grandchild}")


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


def test_recover_lists_while_the_host_is_down(
    test_hv: Hypervisor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listing reads only the journals: it said "cannot connect" (exit 1) when the default
    host did not answer, when what a crash left is wanted most; --yes still needs the host."""
    path, disk = stale_journal(test_hv, tmp_path)
    down = f"qemu+unix:///system?socket={tmp_path}/no-such-socket"
    assert main(["-c", down, "recover"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("half-done: deploying") and err == ""
    assert main(["-c", down, "recover", "--json"]) == 0
    assert [i["undo"] for i in json.loads(capsys.readouterr().out)] == [
        [f"remove {disk}", "undefine 'half'"]
    ]
    assert main(["-c", down, "recover", "--yes"]) == 1
    assert "cannot connect" in capsys.readouterr().err and path.exists()
    assert ops.recover(test_hv, ops.pending()[0]) == []


async def test_dashboard_offers_to_roll_back(test_hv: Hypervisor, tmp_path: Path) -> None:
    path, disk = stale_journal(test_hv, tmp_path)
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        # The notification comes as a message after `interrupted` is set: it was read in
        # between once (a full fast run), so wait for both.
        def offered() -> bool:
            texts = [n.message for n in app._notifications]
            return bool(app.interrupted) and any(
                "left half-done" in t and "Roll back interrupted" in t for t in texts
            )

        await wait_for(pilot, offered, what="the offer to roll back, with its notification")
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


# -- recover acts only on what its operation made and still owns (issue 17, case 5) ------------


def hand_journal(
    tmp_path: Path, dirs: list[str], undo: list[dict[str, object]], **kw: object
) -> Path:
    """A journal as an attacker or a stale crash would leave it (a dead pid)."""
    data = {"schema": ops.SCHEMA, "id": "hand", "host": kw.get("host", "test:///default"),
            "title": kw.get("title", "hand-written"), "domains": [], "dirs": dirs,
            "started": "2026-01-01T00:00:00+00:00", "pid": kw.get("pid", dead_pid()),
            "boot": "", "undo": undo}  # fmt: skip
    ops.journal_dir().mkdir(parents=True, exist_ok=True)
    path = ops.journal_dir() / f"hand.{kw.get('id', 'x')}.json"
    path.write_text(json.dumps(data))
    return path


def test_a_journal_naming_a_path_outside_its_directories_is_refused_as_tampered(
    test_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    decoy = tmp_path / "decoy.qcow2"
    decoy.write_bytes(b"precious")
    path = hand_journal(tmp_path, [str(images)], [
        {"label": "remove x", "kind": "delete_file", "args": {"path": str(decoy)},
         "identity": private.identity(str(decoy)), "at": 0},
    ])  # fmt: skip
    dotdot = hand_journal(tmp_path, [str(images)], [
        {"label": "remove y", "kind": "delete_file", "args": {"path": f"{images}/../decoy.qcow2"},
         "identity": None, "at": 0},
    ], id="y")  # fmt: skip
    try:
        assert main(["-c", test_uri, "recover", "--yes"]) == 1
        out = capsys.readouterr().out
        assert f"broken journal {path}: tampered: step 'remove x' names '{decoy}'" in out
        assert f"broken journal {dotdot}: tampered" in out
        assert decoy.read_bytes() == b"precious" and path.exists() and dotdot.exists()
    finally:
        path.unlink()
        dotdot.unlink()


def test_broken_journals_are_listed_with_the_reason_and_do_not_stop_the_others(
    test_uri: str, test_hv: Hypervisor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, disk = stale_journal(test_hv, tmp_path)
    jdir = ops.journal_dir()
    bad = {
        "empty.json": "",
        "truncated.json": good.read_text()[:40],
        "garbage.json": "\x00\x01 not json",
        "list.json": "[1, 2]",
        "old.json": json.dumps({"id": "o", "pid": 1, "undo": []}),
    }
    for name, text in bad.items():
        (jdir / name).write_text(text)
    unknown = hand_journal(tmp_path, [str(tmp_path)], [
        {"label": "format the disk", "kind": "mkfs", "args": {}, "identity": None, "at": 0},
    ], id="unknown")  # fmt: skip
    try:
        assert main(["-c", test_uri, "recover", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        reasons = {Path(i["path"]).name: i["broken"] for i in listed if "broken" in i}
        assert reasons["empty.json"] == "empty"
        assert reasons["truncated.json"].startswith("truncated or not JSON")
        assert reasons["garbage.json"].startswith("truncated or not JSON")
        assert reasons["list.json"] == "not a journal (not a JSON object)"
        assert reasons["old.json"].startswith("unknown journal version None")
        assert reasons[unknown.name] == "unknown undo step 'mkfs'"
        assert [i["title"] for i in listed if "broken" not in i] == [
            "deploying 1 full clone(s) of 'template-web'"
        ]
        # The good one is rolled back (through the test driver's own connection); the broken
        # ones stay, untouched, for the operator.
        item = ops.pending()[0]
        assert ops.recover(test_hv, item) == []
        assert not Path(disk).exists() and not good.exists()
        assert (jdir / "truncated.json").read_text() == bad["truncated.json"]
    finally:
        for name in bad:
            (jdir / name).unlink()
        unknown.unlink()


@pytest.mark.parametrize("pid", [1e400, 10**20, 0, -1, "7", True])
def test_a_journal_whose_pid_is_not_a_process_id_is_broken_not_a_traceback(
    test_uri: str,
    test_hv: Hypervisor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pid: object,
) -> None:
    """pid 1e400 (JSON reads it as infinity) or 10**20 made `recover` die with a traceback;
    0 or -1 made os.kill(pid, 0) ask a process group, so the journal looked alive forever."""
    good, _disk = stale_journal(test_hv, tmp_path)
    data = json.loads(good.read_text())
    data["pid"] = pid
    good.write_text(json.dumps(data))
    assert main(["-c", test_uri, "recover", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["broken"] for i in listed if "broken" in i] == [
        f"malformed: pid {pid!r} is not a process id".replace("1e+400", "inf")
    ]
    good.unlink()


def test_a_stale_journal_deletes_nothing_made_later_under_the_same_names(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    """A SIGKILLed clone's journal; the leftovers removed by hand; the same name deployed
    again (a new file at the same path, used by a new domain): recover takes nothing."""
    path, disk = stale_journal(test_hv, tmp_path)
    test_hv.conn.lookupByName("half").undefine()
    Path(disk).unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "2M"], check=True)
    new_data = Path(disk).read_bytes()
    test_hv.conn.defineXML(
        "<domain type='test'><name>half</name><memory>65536</memory><os><type>hvm</type></os>"
        f"<devices><disk type='file' device='disk'><source file='{disk}'/>"
        "<target dev='vda'/></disk></devices></domain>"
    )
    skipped: list[str] = []
    assert ops.recover(test_hv, ops.pending()[0], skipped) == []
    assert test_hv.exists("half") and Path(disk).read_bytes() == new_data
    # (whether the new file got the old inode number or not, it is not taken)
    assert len(skipped) == 1 and skipped[0].startswith(f"remove {disk}: skipped, {disk} ")
    assert "is in use by domain 'half'" in skipped[0] or "was replaced since" in skipped[0]
    assert not path.exists()


def test_a_file_replaced_since_is_skipped_even_when_no_domain_uses_it(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    path, disk = stale_journal(test_hv, tmp_path)
    Path(disk).rename(tmp_path / "keep")  # the inode survives elsewhere: a new one is made
    Path(disk).write_bytes(b"someone else's")
    skipped: list[str] = []
    assert ops.recover(test_hv, ops.pending()[0], skipped) == []
    assert Path(disk).read_bytes() == b"someone else's"
    assert skipped == [f"remove {disk}: skipped, {disk} was replaced since (another file has "
                       "that name now)"]  # fmt: skip
    assert not test_hv.exists("half")  # the domain the operation made is undone


def test_a_failed_undo_step_is_retried_alone(test_hv: Hypervisor, tmp_path: Path) -> None:
    path, disk = stale_journal(test_hv, tmp_path)
    calls: list[str] = []

    def flaky(hv: Hypervisor, path: str) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OperationError("the host refused")
        Path(path).unlink()

    real = ops.UNDO["delete_file"]
    ops.UNDO["delete_file"] = flaky
    try:
        failed = ops.recover(test_hv, ops.pending()[0])
        assert failed == [f"remove {disk} (the host refused)"]
        assert not test_hv.exists("half")
        left = json.loads(path.read_text())
        assert [a["kind"] for a in left["undo"]] == ["delete_file"]  # the undefine is done
        assert ops.recover(test_hv, ops.pending()[0]) == []
    finally:
        ops.UNDO["delete_file"] = real
    assert calls == [disk, disk] and not Path(disk).exists() and not path.exists()


def test_recover_says_when_a_journal_is_of_a_running_operation(
    test_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = hand_journal(tmp_path, [str(tmp_path)], [], pid=os.getpid(), title="cloning now")
    try:
        assert main(["-c", test_uri, "recover", "--yes"]) == 0
        assert f"skipped: 'cloning now' on test:///default is still running (pid {os.getpid()})" \
            in capsys.readouterr().out  # fmt: skip
        assert path.exists()
    finally:
        path.unlink()


def test_restoring_a_definition_changed_since_is_skipped(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    """The operation changed 'beta' and recorded how it left it; the operator changed it
    again (setmem): recover keeps the operator's definition."""
    dom = test_hv.conn.lookupByName("beta")
    old = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    journal = ops.Journal(test_hv.uri, "making 'beta' a template", dirs=[tmp_path])
    journal.push("restore the definition of 'beta'", "define", xml=old)
    test_hv.conn.defineXML(old.replace("</name>", "</name><description>template</description>"))
    undo = ops.Undo(test_hv, journal)
    undo.domain_left(dom.UUIDString())
    data = json.loads(journal.path.read_text())
    data["pid"] = dead_pid()
    journal.path.write_text(json.dumps(data))
    dom.setMemoryFlags(262144, libvirt.VIR_DOMAIN_AFFECT_CONFIG)  # the operator's change
    changed = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    skipped: list[str] = []
    assert ops.recover(test_hv, ops.pending()[0], skipped) == []
    assert skipped == ["restore the definition of 'beta': skipped, the domain's definition "
                       "changed since the operation left it (kept as it is now)"]  # fmt: skip
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == changed


def test_restoring_a_definition_as_the_operation_left_it(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    dom = test_hv.conn.lookupByName("beta")
    old = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    journal = ops.Journal(test_hv.uri, "making 'beta' a template", dirs=[tmp_path])
    journal.push("restore the definition of 'beta'", "define", xml=old)
    test_hv.conn.defineXML(old.replace("</name>", "</name><description>template</description>"))
    ops.Undo(test_hv, journal).domain_left(dom.UUIDString())
    data = json.loads(journal.path.read_text())
    data["pid"] = dead_pid()
    journal.path.write_text(json.dumps(data))
    assert ops.recover(test_hv, ops.pending()[0]) == []
    assert "template" not in dom.XMLDesc(0)


def test_a_snapshot_taken_again_under_the_same_name_is_kept(
    test_hv: Hypervisor, tmp_path: Path
) -> None:
    dom = test_hv.conn.lookupByName("beta")
    journal = ops.Journal(test_hv.uri, "group snapshot 's1' of beta", dirs=[tmp_path])
    journal.push("delete snapshot 's1' of 'beta'", "delete_snapshot", domain="beta", name="s1")
    journal.identify({"created": "2020-01-01T00:00:00+00:00"})  # the one the group took
    data = json.loads(journal.path.read_text())
    data["pid"] = dead_pid()
    journal.path.write_text(json.dumps(data))
    dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)  # taken again
    skipped: list[str] = []
    assert ops.recover(test_hv, ops.pending()[0], skipped) == []
    assert "s1" in dom.snapshotListNames(0)
    assert len(skipped) == 1 and "snapshot 's1' was taken again since" in skipped[0]


def _virtdeck_in(journal_dir_mount: str, uri: str, state: Path) -> subprocess.CompletedProcess[str]:
    """`virtdeck rm alpha --yes` with the journal directory replaced by a small tmpfs,
    prepared by `journal_dir_mount` (a shell snippet; $J is the directory)."""
    jdir = state / "virtdeck" / "journal"
    jdir.mkdir(parents=True, exist_ok=True)
    script = (f"J={jdir}; mount -t tmpfs -o size=8k,mode=700 tmpfs $J && {journal_dir_mount} "
              f"&& exec {Path(sys.executable).parent}/virtdeck -c {uri} rm beta; "
              "echo left: $(ls -A $J)")  # fmt: skip
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "XDG_STATE_HOME": str(state)}, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    "prepare,why",
    [
        ("mount -o remount,ro $J", "Read-only file system"),
        ("(cat /dev/zero > $J/fill 2>/dev/null; true)", "No space left on device"),
    ],
    ids=["read-only", "full"],
)
def test_a_journal_directory_that_cannot_be_written_refuses_in_one_line(
    test_uri: str, tmp_path: Path, prepare: str, why: str
) -> None:
    proc = _virtdeck_in(prepare, test_uri, tmp_path / "state")
    assert proc.returncode == 1, proc
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("virtdeck: plan:")]
    assert len(lines) == 1 and "cannot write the undo journal" in lines[0], proc.stderr
    assert why in lines[0] and "nothing was changed" in lines[0]
    assert "Traceback" not in proc.stderr
    # `exec` replaced the shell: nothing was listed, and the tmpfs went with the namespace.
    assert "left:" not in proc.stdout
