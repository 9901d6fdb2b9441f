"""CLI commands for snapshots (see tui.core)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's subcommands to the parser."""
    _ = (sub, argparse)
