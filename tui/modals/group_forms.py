"""The modal that asks which domains to mark: a glob over their names (`web-*`)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static


class MatchScreen(ModalScreen[str | None]):
    """Dismisses with the glob (never empty), or None on Escape."""

    DEFAULT_CSS = """
    MatchScreen { align: center middle; }
    MatchScreen > Vertical {
        width: 64; height: auto; padding: 1 2;
        border: thick $accent; background: $surface;
    }
    MatchScreen #title { text-style: bold; margin-bottom: 1; }
    MatchScreen #hint { color: $text-muted; height: auto; }
    MatchScreen #error { color: $error; height: auto; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="match_form.cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Select matching domains", id="title")
            yield Label("Name pattern")
            yield Input(placeholder="e.g. web-*", id="pattern")
            yield Static(
                "* any text, ? one character, [ab] one of; Enter marks them",
                id="hint",
                markup=False,
            )
            yield Static("", id="error", markup=False)

    def on_mount(self) -> None:
        self.query_one("#pattern", Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        pattern = event.value.strip()
        if not pattern:
            self.query_one("#error", Static).update("type a pattern, or Escape")
            return
        self.dismiss(pattern)

    def action_cancel(self) -> None:
        self.dismiss(None)
