"""What every form's end looks like: a line for its error, then Cancel and the action."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Static


def error_and_buttons(label: str = "Plan", button_id: str = "ok") -> ComposeResult:
    """`yield from` it at the end of a form's compose (`#error`, `#buttons`, `#cancel`)."""
    yield Static("", id="error", markup=False)
    with Horizontal(id="buttons"):
        yield Button("Cancel", id="cancel")
        yield Button(label, id=button_id, variant="primary")
