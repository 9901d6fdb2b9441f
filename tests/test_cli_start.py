"""Fast CLI start: the command table is what the modules register, and `virtdeck ls` imports
only its own path (benchmarks/bench_start.py measures the time against `virsh list --all`)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from tui.cli import COMMANDS, build_parser


def _registered() -> dict[str, tuple[str, str]]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    out = {}
    for module in sorted({m for m, _ in COMMANDS.values()}):
        before = len(sub._choices_actions)
        importlib.import_module(f"tui.cli.{module}").register(sub)
        for action in sub._choices_actions[before:]:
            out[action.dest] = (module, action.help or "")
    return out


def test_the_command_table_is_what_the_modules_register() -> None:
    assert _registered() == COMMANDS


def test_main_help_lists_every_command_with_its_help() -> None:
    text = build_parser().format_help()
    for name, (_module, helptext) in COMMANDS.items():
        assert f"    {name} " in text and helptext.split()[0] in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_s_help_shows_its_own_options(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: virtdeck {name} ") and "-h, --help" in out


def test_ls_imports_only_its_own_path() -> None:
    code = (
        "import sys, io, contextlib\nfrom tui.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['-c', 'test:///default', 'ls']) == 0\n"
        "print('\\n'.join(sys.modules))"
    )
    mods = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout.split())  # fmt: skip
    assert "tui.cli.domains" in mods
    heavy = {"tui.cli.snapshots", "tui.cli.templates", "tui.cli.usage", "tui.cli.details",
             "tui.core.storage", "tui.core.ops", "tui.core.details", "tui.core.audit",
             "tomllib", "json", "textual", "rich"}  # fmt: skip
    assert not heavy & mods


def test_a_command_the_table_names_but_no_module_registers_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tui.cli

    monkeypatch.setitem(tui.cli.COMMANDS, "gone", ("log", "a command that was removed"))
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["gone"])
    assert done.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "virtdeck: error: command 'gone' is not available"
    )
