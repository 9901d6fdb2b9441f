"""The modal that asks what snapshot to take (name, internal or external, description)."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, RadioButton, RadioSet, Static

from tui.core.errors import InvalidInputError
from tui.core.snapshots import validate_snapshot_name
from tui.modals.form import error_and_buttons


@dataclass(frozen=True)
class SnapshotRequest:
    name: str
    external: bool
    disk_only: bool
    description: str


class NewSnapshotScreen(ModalScreen[SnapshotRequest | None]):
    """Dismisses with a request, or None on cancel; the name is checked before it closes."""

    DEFAULT_CSS = """
    NewSnapshotScreen { align: center middle; }
    NewSnapshotScreen > Vertical {
        width: 72; height: auto; padding: 1 2;
        border: thick $accent; background: $surface;
    }
    NewSnapshotScreen #title { text-style: bold; margin-bottom: 1; }
    NewSnapshotScreen RadioSet { width: 100%; }
    NewSnapshotScreen #error { color: $error; height: auto; }
    NewSnapshotScreen #hint { color: $text-muted; height: auto; }
    NewSnapshotScreen #buttons { height: auto; align-horizontal: right; margin-top: 1; }
    NewSnapshotScreen Button { margin-left: 2; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="snapshot_form.cancel")]

    def __init__(self, what: str, *, running: bool, default_external: bool = False) -> None:
        """`what`: the title's object ("'web-1'", or "3 domains: web-1, web-2, web-3")."""
        super().__init__()
        self.domain = what
        self.running = running
        self.default_external = default_external

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"New snapshot of {self.domain}", id="title", markup=False)
            yield Label("Name")
            yield Input(placeholder="e.g. before-upgrade", id="name")
            with RadioSet(id="kind"):
                yield RadioButton(
                    "Internal (inside the qcow2 disks)",
                    value=not self.default_external,
                    id="internal",
                )
                yield RadioButton(
                    "External (an overlay file per disk; raw disks too)",
                    value=self.default_external,
                    id="external",
                )
            yield Checkbox("Disk only (external, no memory state)", id="disk-only")
            yield Label("Description")
            yield Input(placeholder="what is about to change", id="description")
            yield Static(self._hint(), id="hint")
            yield from error_and_buttons("Create", "create")

    def _hint(self) -> str:
        if not self.running:
            return "The domain is shut off: only its disks are saved."
        return "The guest pauses while its memory is saved."

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    @property
    def external(self) -> bool:
        return self.query_one("#external", RadioButton).value

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self._create()

    @on(Button.Pressed, "#create")
    def _create_pressed(self) -> None:
        self._create()

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    def _create(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        disk_only = self.query_one("#disk-only", Checkbox).value
        error = self.query_one("#error", Static)
        try:
            validate_snapshot_name(name)
        except InvalidInputError as err:
            error.update(str(err))
            return
        if disk_only and not self.external:
            error.update("disk only goes with External")
            return
        self.dismiss(
            SnapshotRequest(
                name=name,
                external=self.external,
                disk_only=disk_only,
                description=self.query_one("#description", Input).value.strip(),
            )
        )
