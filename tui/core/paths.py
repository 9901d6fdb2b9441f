"""Where virtdeck keeps its own files (XDG base directories; no extra dependency)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Template XML backups and other state worth keeping: $XDG_DATA_HOME/virtdeck."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "virtdeck"


def cache_dir() -> Path:
    """Rebuildable things, like the demo lab: $XDG_CACHE_HOME/virtdeck."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "virtdeck"


def state_dir() -> Path:
    """What a crash must not lose (the undo journals of running operations):
    $XDG_STATE_HOME/virtdeck."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "virtdeck"


def template_backup_dir() -> Path:
    return data_dir() / "templates"
