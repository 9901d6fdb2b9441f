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


def _leaves(parser: argparse.ArgumentParser, path: list[str]) -> list[list[str]]:
    """argv for every (sub)command under `parser`: its path and dummy required arguments."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        action = subs[0]
        if hasattr(action, "load"):
            for module in {m for m, _ in COMMANDS.values()}:
                action.load(module)
        return [
            leaf
            for name, child in action._name_parser_map.items()
            for leaf in _leaves(child, [*path, name])
        ]
    argv = list(path)
    for a in parser._actions:
        if a.option_strings and a.required:
            argv += [a.option_strings[0], "1"]
        elif not a.option_strings and a.nargs not in ("?", "*"):
            value = str(next(iter(a.choices))) if a.choices else "1"
            argv += [value] * (a.nargs if isinstance(a.nargs, int) else 1)
    return argv and [argv]


def test_every_command_takes_connect_and_host_after_its_name() -> None:
    """The README: every command takes -c/-H; before its name or after it, alike."""
    from tui.cli import parse

    leaves = _leaves(build_parser(), [])
    assert {"ls", "clone"} <= {leaf[0] for leaf in leaves} and len(leaves) >= len(COMMANDS)
    for leaf in leaves:
        args = parse(["-c", "test:///a", *leaf, "-c", "test:///b"])
        assert args.connect == ["test:///a", "test:///b"], leaf
        if leaf[0] != "log":  # (log --host filters the trail by host)
            args = parse([*leaf, "-H", "one", "--host", "two"])
            assert args.host == ["one", "two"], leaf
