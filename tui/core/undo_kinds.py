"""Every undo kind a journal can hold, registered (`ops.undo_kind`).

The journal (tui.core.ops) is generic: each operation module registers the undo kinds it
pushes. A process that reads journals it did not write (`virtdeck recover`, the dashboard's
recovery notice) imports this module first, so every kind has its handler; a test checks
that every kind pushed anywhere in `tui` is registered once this is imported.
"""

from tui.core import groups, livemigrate, ops
from tui.core.snapshots import common, delete

__all__ = ["groups", "livemigrate", "ops", "common", "delete"]
