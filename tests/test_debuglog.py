"""`virtdeck --debug` writes what it did (steps, XML diff, commands run) and no secrets."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_templates import Lab
from tui.cli import main
from tui.core import debuglog


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        debuglog.disable()
        lab.hv.close()


def test_debug_clone_logs_steps_xml_diff_and_argv(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not debuglog.log_path().exists()
    assert main(["--debug", "-c", lab.uri, "clone", "template-base", "dbg", "--full"]) == 0
    path = debuglog.log_path()
    assert path.parent == Path(os.environ["XDG_STATE_HOME"]) / "virtdeck"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "operation on " in text and "operation done: " in text  # the plan run
    assert "step: undefine 'dbg'" in text and "(its undo: undefine)" in text
    assert "step: remove " in text and "dbg.qcow2 (its undo: delete_file)" in text
    # the definition as a diff (a new domain: against nothing)
    assert "define dbg on " in text and "+++ dbg (after)" in text and "+  <name>dbg</name>" in text
    # the qemu-img copy: its argv and exit status
    assert "qemu-img convert" in text and "status 0" in text
    capsys.readouterr()
    assert main(["log", "--debug", "--limit", "500"]) == 0
    assert "operation done: " in capsys.readouterr().out


def test_without_debug_nothing_is_written(lab: Lab) -> None:
    assert main(["-c", lab.uri, "clone", "template-base", "quiet", "--full"]) == 0
    assert not debuglog.log_path().exists()


def test_secrets_never_reach_the_log() -> None:
    argv = ["virt-customize", "--root-password", "password:hunter2", "--ssh-inject",
            "root:string:ssh-ed25519 AAAAC3Nza", "--password=abc", "-a", "/img.qcow2"]  # fmt: skip
    shown = " ".join(debuglog.redact_argv(argv))
    assert "hunter2" not in shown and "AAAAC3Nza" not in shown and "abc" not in shown
    assert "/img.qcow2" in shown and "--root-password <secret>" in shown
    diff = debuglog.xml_diff(None, "<graphics type='vnc' passwd='s3cret'/>", "d")
    assert "s3cret" not in diff and "passwd='<secret>'" in diff
