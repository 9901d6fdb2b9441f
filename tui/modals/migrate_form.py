"""The modal of `M`: which host to move the chosen domains to, and (optionally) the image
directory there, for a host whose images go in no storage pool yet."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static


class MigrateScreen(ModalScreen[tuple[str, str | None] | None]):
    """Dismisses with (target URI, directory or None for the target's pool), or None."""

    DEFAULT_CSS = """
    MigrateScreen { align: center middle; }
    MigrateScreen > Vertical {
        width: 84; height: auto; padding: 1 2;
        border: thick $accent; background: $surface;
    }
    MigrateScreen #title { text-style: bold; margin-bottom: 1; }
    MigrateScreen #hint { color: $text-muted; height: auto; }
    MigrateScreen #error { color: $error; height: auto; }
    MigrateScreen Horizontal { height: auto; margin-top: 1; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="migrate_form.cancel")]

    def __init__(self, names: list[str], targets: list[str]) -> None:
        super().__init__()
        self.names = names
        self.targets = targets

    def compose(self) -> ComposeResult:
        what = f"'{self.names[0]}'" if len(self.names) == 1 else f"{len(self.names)} domains"
        with Vertical():
            yield Static(f"Migrate {what}", id="title", markup=False)
            yield Label("To host")
            yield Select(
                [(uri, uri) for uri in self.targets],
                value=self.targets[0],
                allow_blank=False,
                id="target",
            )
            yield Label("Image directory there")
            yield Input(placeholder="its storage pool (default, else the first)", id="dir")
            yield Static(
                "an absolute path; needed only when the host has no directory pool. "
                "Enter shows the plan; nothing moves before you confirm it",
                id="hint",
                markup=False,
            )
            yield Static("", id="error", markup=False)
            with Horizontal():
                yield Button("Plan", variant="primary", id="plan")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#target", Select).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#plan")
    def _submitted(self) -> None:
        directory = self.query_one("#dir", Input).value.strip() or None
        if directory is not None and not directory.startswith("/"):
            self.query_one("#error", Static).update(
                f"'{directory}' is not an absolute path (leave it empty for the host's pool)"
            )
            return
        target = self.query_one("#target", Select).value
        self.dismiss((str(target), directory))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
