"""The core and the CLI never load Textual (fast start, two faces over one core)."""

import pkgutil
import subprocess
import sys

import tui.core


def _loaded_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return set(out.split())


def core_modules() -> list[str]:
    """Every module under tui.core, discovered (a new one is covered without listing it)."""
    found = pkgutil.walk_packages(tui.core.__path__, "tui.core.")
    return sorted(m.name for m in found)


def test_core_imports_no_textual_or_rich() -> None:
    modules = core_modules()
    assert {"tui.core.hypervisor", "tui.core.clones", "tui.core.storage.local"} <= set(modules)
    mods = _loaded_modules("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= mods
    assert not {m for m in mods if m.split(".")[0] in ("textual", "rich")}


def test_cli_parser_imports_no_textual() -> None:
    # (commands load lazily: parsing `ls` imports its module)
    mods = _loaded_modules("import tui.cli\ntui.cli.build_parser().parse_args(['ls'])")
    assert "tui.cli.domains" in mods
    assert not {m for m in mods if m.split(".")[0] in ("textual", "rich")}
