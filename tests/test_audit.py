"""The audit trail: what records an operation, rotation, concurrent writers, `virtdeck log`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tui.cli import main
from tui.core import audit, ops
from tui.core.errors import OperationError, StateError
from tui.core.hypervisor import Hypervisor


def records() -> list[audit.Record]:
    found, bad = audit.read()
    assert bad == 0
    return found


def test_lifecycle_verbs_record_results_and_refusals(test_hv: Hypervisor) -> None:
    test_hv.start("beta")
    test_hv.suspend("beta")
    with pytest.raises(StateError):
        test_hv.start("alpha")  # already running: refused, and recorded as such
    first, second, refused = records()
    assert (first.operation, first.domains, first.result) == ("starting 'beta'", ("beta",), "ok")
    assert (second.operation, second.result) == ("suspending 'beta'", "ok")
    assert refused.result == "failed" and refused.error == "'alpha' is already running"
    assert first.host == test_hv.uri and first.pid == os.getpid() and first.user
    assert first.time.endswith("+00:00") and first.duration >= 0
    assert stat.S_IMODE(audit.log_path().stat().st_mode) == 0o600


def test_an_operation_records_its_steps_and_how_it_ended(test_hv: Hypervisor) -> None:
    ops.UNDO["_test"] = lambda hv, what: None
    try:
        with ops.running(test_hv, "testing ok", domains=["beta"]) as undo:
            undo.push("step one", "_test", what="1")
        with (
            pytest.raises(OperationError),
            ops.running(test_hv, "testing failure", domains=["beta", "gamma"]) as undo,
        ):
            undo.push("step two", "_test", what="2")
            raise OperationError("boom")
        with pytest.raises(ops.Interrupted), ops.running(test_hv, "testing interrupt"):
            raise KeyboardInterrupt
    finally:
        del ops.UNDO["_test"]
    ok, failed, interrupted = records()
    assert (ok.operation, ok.domains, ok.steps, ok.result) == (
        "testing ok", ("beta",), ("step one",), "ok")  # fmt: skip
    assert (failed.domains, failed.steps, failed.result) == (
        ("beta", "gamma"), ("step two",), "failed")  # fmt: skip
    assert failed.error == "boom (undid 1 step(s))"
    assert interrupted.result == "interrupted" and "nothing had changed" in interrupted.error


def test_a_failure_after_a_cancel_is_an_interrupt(test_hv: Hypervisor) -> None:
    """A signal kills the operation's child first; the step then fails: still an interrupt."""
    ops.cancel("interrupted by SIGTERM", 15)
    try:
        with pytest.raises(OperationError), audit.recorded(test_hv.uri, "sealing", ["beta"]):
            raise OperationError("virt-sysprep failed (exit -9)")
    finally:
        ops.reset_cancel()
    (rec,) = records()
    assert rec.result == "interrupted" and rec.error == "interrupted: virt-sysprep failed (exit -9)"


def test_a_lifecycle_verb_inside_an_operation_is_the_operation_s(test_hv: Hypervisor) -> None:
    with ops.running(test_hv, "deploying", domains=["beta"]):
        test_hv.start("beta")
    assert [r.operation for r in records()] == ["deploying"]


def test_recover_records_what_it_undid(test_hv: Hypervisor) -> None:
    from tests.test_ops import dead_pid

    journal = ops.Journal(test_hv.uri, "deploying 'half'", domains=["half"])
    journal.push("undefine 'half'", "undefine", uuid="0" * 32, name="half", keep_nvram=True)
    data = json.loads(journal.path.read_text())
    data["pid"] = dead_pid()
    journal.path.write_text(json.dumps(data))
    (item,) = ops.pending()
    assert ops.recover(test_hv, item) == []
    (rec,) = records()
    assert (rec.operation, rec.domains, rec.result) == ("recovering: deploying 'half'",
                                                        ("half",), "undone")  # fmt: skip
    assert rec.steps == ("undefine 'half'",)


def test_a_demo_deploy_is_recorded_with_the_clone_and_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tui.core import demo
    from tui.core.clones import execute_clone, plan_clone

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    hv = Hypervisor.open(demo.ensure_lab(), demo=True)
    try:
        execute_clone(hv, plan_clone(hv, "template-web", "api", count=1))
    finally:
        hv.close()
    (rec,) = records()
    assert rec.result == "ok" and rec.domains == ("template-web", "api")
    assert "undefine 'api'" in rec.steps and len(rec.steps) >= 2


def test_snapshot_create_revert_and_delete_by_libvirt_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tui.core import demo, snapshots

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    hv = Hypervisor.open(demo.ensure_lab(), demo=True)
    try:
        snapshots.create(hv, snapshots.plan_create(hv, "web-2", "s1"))
        snapshots.revert(hv, snapshots.plan_revert(hv, "web-2", "s1"))
        snapshots.delete(hv, snapshots.plan_delete(hv, "web-2", "s1"))
    finally:
        hv.close()
    taken, reverted, deleted = records()
    assert reverted.operation == "reverting 'web-2' to 's1'"
    assert [r.result for r in (taken, reverted, deleted)] == ["ok"] * 3
    assert all(r.domains == ("web-2",) for r in (taken, reverted, deleted))


def test_a_failing_audit_write_warns_and_the_operation_goes_on(
    test_hv: Hypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(audit.ENV, str(tmp_path / "file" / "audit.log"))  # a dir that cannot be
    monkeypatch.setattr(audit, "_warned", [False])
    test_hv.start("beta")
    assert test_hv.domain("beta").state.active
    assert "virtdeck: warning: audit log" in capsys.readouterr().err


def test_rotation_keeps_a_few_files_and_reading_spans_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit, "MAX_BYTES", 2000)
    for i in range(200):
        audit.write(audit.make_record("test:///x", f"op {i}", ["d"], [], "ok"))
    path = audit.log_path()
    files = audit.files()
    assert files[-1] == path and len(files) == audit.KEEP + 1
    assert all(p.stat().st_size <= 2000 for p in files)
    ops_read = [r.operation for r in records()]
    assert ops_read[-1] == "op 199" and len(ops_read) < 200  # the oldest were rotated out
    numbers = [int(o.split()[1]) for o in ops_read]
    assert numbers == list(range(numbers[0], 200))  # in order, nothing lost in between


WRITER = """
import sys
from tui.core import audit
n, tag = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    rec = audit.make_record("test:///x", f"{tag} {i}", [tag], ["x" * 300], "ok")
    assert audit.write(rec)
"""


# 600 records of ~500 bytes: rotating at 120 kB fills 3 of the 5 files, so none is lost.
@pytest.mark.parametrize("max_bytes", [1 << 30, 120_000], ids=["append", "rotating"])
def test_concurrent_writers_leave_whole_lines(max_bytes: int, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    code = f"from tui.core import audit\naudit.MAX_BYTES = {max_bytes}\n" + WRITER
    env = {**os.environ, audit.ENV: str(log)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, "150", f"w{i}"], env=env) for i in range(4)
    ]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    found, bad = audit.read(log)
    assert bad == 0
    for i in range(4):  # each writer's records in its own order
        mine = [int(r.operation.split()[1]) for r in found if r.domains == (f"w{i}",)]
        assert mine == sorted(mine) and mine
    assert len(found) == 600
    assert (len(audit.files(log)) > 1) == (max_bytes < 1 << 20)  # it did rotate


def _log(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["log", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_log_without_a_log_is_empty(capsys: pytest.CaptureFixture[str]) -> None:
    assert _log(capsys) == (0, "", "")
    assert _log(capsys, "--json") == (0, "[]\n", "")
    status, out, err = _log(capsys, "--host", "nosuch")
    assert (status, out) == (0, "") and err.startswith("virtdeck: no operation on host 'nosuch'")


def test_log_filters_limits_and_skips_corrupt_lines(capsys: pytest.CaptureFixture[str]) -> None:
    for host, op, dom, result in [
        ("qemu:///system", "starting 'a'", "a", "ok"),
        ("qemu:///system", "starting 'b'", "b", "failed"),
        ("qemu+ssh://h/system", "removing 'a'", "a", "ok"),
    ]:
        audit.write(audit.make_record(host, op, [dom], [], result, "boom" * (result != "ok")))
    with open(audit.log_path(), "a") as fh:
        fh.write("not json\n" + json.dumps({"result": "ok"}) + "\n")
    status, out, err = _log(capsys, "--json")
    assert status == 0 and err.strip().startswith("virtdeck: skipped 2 line(s)")
    assert [r["operation"] for r in json.loads(out)] == ["starting 'a'", "starting 'b'",
                                                        "removing 'a'"]  # fmt: skip
    _, out, _ = _log(capsys, "a", "--json")
    assert [r["operation"] for r in json.loads(out)] == ["starting 'a'", "removing 'a'"]
    _, out, _ = _log(capsys, "a", "--json", "--limit", "1", "--host", "qemu+ssh://h/system")
    assert [r["host"] for r in json.loads(out)] == ["qemu+ssh://h/system"]
    status, out, _ = _log(capsys)
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["TIME", "USER", "HOST", "OPERATION", "DOMAINS",
                                                "RESULT", "DURATION"]  # fmt: skip
    assert "failed" in lines[2] and lines[3].strip() == "boom"


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--limit", "x"], ["--bogus"]])
def test_log_bad_input_is_one_usage_line(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tui", "log", *argv],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(("virtdeck log: error:", "virtdeck: error:"))


def test_show_lists_the_domain_s_recent_operations(
    test_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tui.core.details import read_details

    hv = Hypervisor.open(test_uri)
    try:
        for _ in range(3):
            hv.start("beta")
            hv.destroy("beta")
        details = read_details(hv, "beta")
    finally:
        hv.close()
    assert [r.operation for r in details.operations] == [
        "forcing off 'beta'", "starting 'beta'", "forcing off 'beta'", "starting 'beta'",
        "forcing off 'beta'"]  # fmt: skip
    from tui.cli.details import describe

    lines = describe(details)
    at = lines.index("Recent operations")
    assert "forcing off 'beta'  ok" in lines[at + 1]
    assert details.to_json()["operations"][0]["result"] == "ok"


def test_recent_reads_back_across_rotated_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_BYTES", 1500)
    for i in range(30):
        dom = 'we"b' if i % 3 == 0 else "db"
        audit.write(audit.make_record(f"test:///{i % 2}", f"op {i}", [dom], [], "ok"))
    assert len(audit.files()) > 2
    assert [r.operation for r in audit.recent('we"b')] == [f"op {i}" for i in (15, 18, 21, 24, 27)]
    assert [r.operation for r in audit.recent('we"b', "test:///1", 2)] == ["op 21", "op 27"]
    assert audit.recent("nope") == []


def test_a_huge_line_or_file_is_read_in_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse 2 GB audit.log (no newline) grew `virtdeck log` past 2 GB (MemoryError under a
    limit); the details view read every file whole. Now a line longer than MAX_LINE is one
    skipped line, read in pieces, and `recent` reads the last MAX_TAIL bytes of each file."""
    monkeypatch.setattr(audit, "MAX_LINE", 1000)
    monkeypatch.setattr(audit, "MAX_TAIL", 4000)
    audit.write(audit.make_record("test:///1", "op before", ["web"], [], "ok"))
    with open(audit.log_path(), "a") as fh:
        fh.write("\0" * 10_000 + "\n" + "x" * 1000 + "\n" + "y" * 999 + "\n")
    audit.write(audit.make_record("test:///1", "op after", ["web"], [], "ok"))
    found, bad = audit.read()
    assert [r.operation for r in found] == ["op before", "op after"] and bad == 3
    assert [r.operation for r in audit.recent("web")] == ["op after"]  # "op before": 12 kB back


async def test_details_screen_shows_the_domain_s_recent_operations(tmp_path: Path) -> None:
    from tests.test_details import SPECS, _open, _screen_text
    from tui.app import VirtdeckApp
    from tui.core.testdriver import node_xml
    from tui.screens.details import DetailsScreen

    (tmp_path / "node.xml").write_text(node_xml(SPECS))
    hv = Hypervisor.open(f"test://{tmp_path / 'node.xml'}")
    try:
        hv.suspend("web")
        with pytest.raises(StateError):
            hv.suspend("web")
        hv.resume("web")
        hv.start("off")  # another domain's: not shown
        app = VirtdeckApp([hv], poll_interval=3600)
        async with app.run_test(size=(140, 45)) as pilot:
            await _open(app, pilot, "web")
            await pilot.press("i")
            await pilot.pause()
            assert isinstance(app.screen, DetailsScreen)
            await app.screen.workers.wait_for_complete()
            await pilot.pause()
            shown = _screen_text(app)
    finally:
        hv.close()
    recent = shown[shown.index("Recent operations") :]
    assert "suspending 'web'" in recent and "resuming 'web'" in recent
    assert "'web' is not running, so it cannot be suspended" in recent
    assert "'off'" not in recent


# -- files virtdeck writes for itself (issue 17, case 6) --------------------------------------


@pytest.mark.parametrize("where", ["link", "open-dir", "foreign-dir"])
def test_the_audit_log_is_never_written_through_a_link_or_in_a_directory_not_ours(
    where: str, test_hv: Hypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    logdir = tmp_path / "logs"
    logdir.mkdir(mode=0o700)
    log = logdir / "audit.log"
    if where == "link":
        log.symlink_to(target)
        expected = f"{log} is a symbolic link; virtdeck does not write through it"
    elif where == "open-dir":
        logdir.chmod(0o777)
        expected = f"{logdir} is writable by other users (mode 777)"
    else:
        os.chown(logdir, 12345, 12345)
        expected = f"{logdir} belongs to uid 12345, not to this user"
    monkeypatch.setenv(audit.ENV, str(log))
    monkeypatch.setattr(audit, "_warned", [False])
    test_hv.start("beta")  # the operation goes on
    assert test_hv.domain("beta").state.active
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"virtdeck: warning: audit log {log} not written")
    assert expected in err[0]
    assert target.read_text() == "precious\n"
    assert not (log.exists() and not log.is_symlink())


def test_the_audit_log_and_its_lock_are_created_0600(
    test_hv: Hypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "new" / "audit.log"
    monkeypatch.setenv(audit.ENV, str(log))
    os.umask(0o022)
    test_hv.start("beta")
    for p in (log, Path(f"{log}.lock")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    assert [r.result for r in audit.read(log)[0]] == ["ok"]


def test_log_host_matches_a_saved_host_name_and_a_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17, case 8d: `log --host` takes what an operator calls the host."""
    import socket

    far = "qemu+ssh://root@kvm2.example:2222/system?keyfile=/k"
    for host, op in [(far, "removing 'a'"), ("qemu:///system", "starting 'b'"),
                     ("qemu+ssh://kvm3.example/system", "starting 'c'")]:  # fmt: skip
        audit.write(audit.make_record(host, op, ["x"], [], "ok"))
    (tmp_path / "virtdeck").mkdir()
    (tmp_path / "virtdeck" / "config.toml").write_text(f'[hosts]\nkvm2 = "{far}"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for wanted, expected in [
        ("kvm2", ["removing 'a'"]),  # a saved host's name
        ("kvm2.example", ["removing 'a'"]),  # the host name in its URI
        (far, ["removing 'a'"]),  # the URI itself
        (socket.gethostname(), ["starting 'b'"]),  # this machine: URIs without a host
        ("KVM3.example", ["starting 'c'"]),
        ("nosuch", []),
    ]:
        _, out, _ = _log(capsys, "--json", "--host", wanted)
        assert [r["operation"] for r in json.loads(out)] == expected, wanted
