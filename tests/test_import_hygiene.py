"""The core and the CLI never load Textual (fast start, two faces over one core)."""

import subprocess
import sys


def _loaded_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return set(out.split())


def test_core_imports_no_textual_or_rich() -> None:
    mods = _loaded_modules(
        "import tui.core.hypervisor, tui.core.domxml, tui.core.models, tui.core.testdriver"
    )
    assert "tui.core.hypervisor" in mods
    assert not {m for m in mods if m.split(".")[0] in ("textual", "rich")}


def test_cli_parser_imports_no_textual() -> None:
    # (commands load lazily: parsing `ls` imports its module)
    mods = _loaded_modules("import tui.cli\ntui.cli.build_parser().parse_args(['ls'])")
    assert "tui.cli.domains" in mods
    assert not {m for m in mods if m.split(".")[0] in ("textual", "rich")}
