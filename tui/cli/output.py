"""Output helpers of the command-line face, in a module of their own so that subcommands the
package imports (recover's wait-and-undo) need not import the package back."""

from __future__ import annotations

import sys
from typing import Any


def print_json(data: Any) -> None:
    import json  # not at the top: `virtdeck ls` never needs it (tests/test_cli_start.py)

    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
