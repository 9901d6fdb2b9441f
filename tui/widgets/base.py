"""What every pane of the main screen shares.

Contract between the main screen and a pane (Templates, Snapshots, Disk usage):
- the screen calls `domain_selected(info)` when the highlighted domain changes (None: no row),
  `inventory_changed(domains)` after a refresh that changed something, or that a libvirt event
  or a request asked for (a timer poll that changed nothing is not passed on), and
  `pane_shown()` when its tab becomes the active one. A pane whose tab is hidden (`showing`
  False) does no work on its own: it notes that it is out of date and catches up when shown;
- a pane's keys are in `SCREEN_BINDINGS`, with actions written `pane('<pane id>', '<verb>')`:
  the screen merges them into its own bindings (footer, command palette) and calls the pane's
  `action_<verb>()`, so they work while the domains table has the focus;
- a pane is given the Session (tui.core.session: the hosts, settings, last inventory, hosts
  not answering) and only reads it; it asks the App for a refresh or reports an error with a
  message (tui.messages: RefreshRequested, ErrorReported); it never imports the App;
- a pane does its libvirt/qemu-img work in `@work(thread=True, exit_on_error=False, group=...)`
  workers; a failed worker reaches the app's one error funnel through `on_worker_state_changed`.
  Textual calls the handler of every class in the MRO, so a subclass's own
  `on_worker_state_changed` must not call super() (the error would be reported twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from textual import work
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widget import Widget
from textual.worker import Worker, WorkerState

from tui.core.models import DomainInfo
from tui.core.ops import Plan
from tui.core.progress import Progress
from tui.messages import ErrorReported
from tui.modals.confirm import PlanScreen

if TYPE_CHECKING:
    from tui.core.hypervisor import Hypervisor
    from tui.core.session import Session


class Pane(Widget):
    SCREEN_BINDINGS: ClassVar[list[BindingType]] = []

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session  # what the pane reads of the fleet (tui.core.session)

    def hypervisor(self, host: str) -> Hypervisor:
        return self.session.hypervisor(host)

    def domain_selected(self, info: DomainInfo | None) -> None:
        """The highlighted domain changed."""

    def inventory_changed(self, domains: list[DomainInfo]) -> None:
        """The domain list was refreshed."""

    def pane_shown(self) -> None:
        """The pane's tab became the active one."""

    @property
    def showing(self) -> bool:
        """Is the pane on the active tab?"""
        node: Widget | None = self
        while isinstance(node, Widget):
            if not node.display:
                return False
            parent = node.parent
            node = parent if isinstance(parent, Widget) else None
        return True

    # -- the one path every plan takes: confirm, run in a worker, report -------------------

    def confirm_plan(self, plan: Plan) -> None:
        """Show the plan; run what the operator confirmed (any plan, no per-type branches)."""

        def answered(chosen: Plan | None) -> None:
            if chosen is None:
                self.plan_cancelled()
            else:
                self.run_plan(chosen)

        self.app.push_screen(PlanScreen(plan), answered)

    @work(thread=True, exit_on_error=False, group="plan", description="running a plan")
    def run_plan(self, plan: Plan) -> None:
        progress = self.plan_progress()
        progress("starting", 0.0)
        text = plan.run(self.hypervisor(plan.host), progress)
        self.post_message(PlanDone(text))

    def plan_progress(self) -> Progress:
        """How a running plan reports (a pane posts its own progress messages)."""
        return lambda _text, _fraction: None

    def plan_cancelled(self) -> None:
        """The operator said no."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR and event.worker.error is not None:
            self.post_message(ErrorReported(event.worker.error))


@dataclass
class PlanDone(Message):
    """A plan ran to its end; `text` says what was done."""

    text: str


__all__ = ["Binding", "Pane", "PlanDone"]
