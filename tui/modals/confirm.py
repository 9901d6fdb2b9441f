"""A yes/no confirmation for every destructive key, and for a plan before it runs."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Static

from tui.core.ops import Plan


class ConfirmScreen(ModalScreen[bool]):
    """Dismisses with True only on an explicit yes (`y` or the button).

    `destructive` (the default) puts the focus on No and paints Yes as a danger; a plan to
    review (PlanScreen) focuses Yes instead. Long bodies scroll.
    """

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 70; max-width: 100%; height: auto; max-height: 100%; padding: 1 2;
        overflow-y: auto;
        border: thick $error; background: $surface;
    }
    ConfirmScreen #title { text-style: bold; margin-bottom: 1; }
    ConfirmScreen #plan { height: auto; max-height: 50vh; }
    ConfirmScreen #buttons { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmScreen Button { margin-left: 2; }
    """

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(
        self,
        title: str,
        body: str,
        yes_label: str = "Yes",
        *,
        no_label: str = "No",
        destructive: bool = True,
    ) -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.yes_label = yes_label
        self.no_label = no_label
        self.destructive = destructive

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.title_text, id="title", markup=False)
            with VerticalScroll(id="plan"):
                yield Static(self.body, id="body", markup=False)
            with Horizontal(id="buttons"):
                yield Button(f"{self.no_label} (n)", id="no")
                yield Button(
                    f"{self.yes_label} (y)",
                    id="yes",
                    variant="error" if self.destructive else "primary",
                )

    def on_mount(self) -> None:
        self.query_one("#no" if self.destructive else "#yes", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class PlanScreen(ModalScreen["Plan | None"]):
    """The one confirmation every plan gets: its question, its lines, the checkbox its option
    offers (a removal's "also delete its files"). Dismisses with the plan to run (the option
    applied) on `y`, or None."""

    DEFAULT_CSS = """
    PlanScreen { align: center middle; }
    PlanScreen > Vertical {
        width: 100; max-width: 100%; height: auto; max-height: 100%; padding: 1 2;
        overflow-y: auto;
        border: thick $accent; background: $surface;
    }
    PlanScreen.destructive > Vertical { border: thick $error; }
    PlanScreen #title { text-style: bold; margin-bottom: 1; }
    PlanScreen #plan { height: auto; max-height: 50vh; }
    PlanScreen #buttons { height: auto; align-horizontal: right; margin-top: 1; }
    PlanScreen Button { margin-left: 2; }
    """

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="plan.yes"),
        Binding("n,escape", "answer(False)", "No", id="plan.no"),
    ]

    def __init__(self, plan: Plan) -> None:
        super().__init__(classes="destructive" if plan.destructive else "")
        self.plan = plan

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.plan.title, id="title", markup=False)
            with VerticalScroll(id="plan"):
                yield Static("\n".join(self.plan.summary()), id="body", markup=False)
            if self.plan.option is not None:
                yield Checkbox(self.plan.option, id="option")
            with Horizontal(id="buttons"):
                yield Button("Cancel (n)", id="no")
                yield Button(
                    f"{self.plan.confirm_label} (y)",
                    id="yes",
                    variant="error" if self.plan.destructive else "primary",
                )

    def on_mount(self) -> None:
        self.query_one("#no" if self.plan.destructive else "#yes", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_answer(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        if not answer:
            self.dismiss(None)
            return
        option = self.query("#option")
        self.dismiss(self.plan.choose(option.first(Checkbox).value) if option else self.plan)
