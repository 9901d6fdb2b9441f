"""The Snapshots pane: the selected domain's snapshot tree, its details, and the keys that
create, revert, roll back and delete.

The tree comes from tui.core.snapshots (one listAllSnapshots for the one selected domain) in a
thread worker, after a selection change and after every inventory refresh, so snapshots made
with virsh show up within one poll. Loads never overlap (a request while one runs marks the
pane stale), and the Tree widget is rebuilt only when the snapshots really changed.

Destructive keys plan in a worker first, then show a confirmation naming what will be lost;
the work runs in a worker that reports progress through messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode
from textual.worker import Worker, WorkerState

from tui.core import snapshots
from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo
from tui.core.ops import Plan
from tui.core.progress import Progress
from tui.core.session import Session
from tui.core.snapshots import SnapshotNode, SnapshotTree
from tui.core.units import size
from tui.messages import RefreshRequested
from tui.modals.snapshot_forms import NewSnapshotScreen, SnapshotRequest
from tui.widgets.base import Pane, PlanDone


@dataclass
class SnapshotsLoaded(Message):
    host: str
    domain: str
    tree: SnapshotTree | None
    error: str | None = None


@dataclass
class SnapshotProgress(Message):
    text: str
    fraction: float | None

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotProgress)


@dataclass
class SnapshotPlanned(Message):
    """A revert or delete plan, ready for the confirmation modal."""

    plan: Plan


@dataclass
class SnapshotDone(Message):
    text: str


def details_text(node: SnapshotNode) -> str:
    created = node.created.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        node.name + ("  (current: you are here)" if node.current else ""),
        f"created   {created}",
        f"state     {node.state}",
        f"kind      {node.kind}",
        f"parent    {node.parent or '-'}",
    ]
    if node.description:
        lines.append(f"note      {node.description}")
    for f in node.files:
        why = f": {f.problem}" if f.problem else ""
        lines.append(f"{f.role:<9} {f.path} ({size(f.size_bytes)}{why})")
    return "\n".join(lines)


def shape(tree: SnapshotTree) -> tuple[tuple[object, ...], ...]:
    """What the Tree widget draws; a change here (not in file sizes) means a rebuild."""
    return tuple((n.name, n.parent, n.current, n.kind, n.state, n.description) for n in tree.nodes)


def node_label(node: SnapshotNode) -> Text:
    return Text.assemble(
        (node.name, "bold" if node.current else ""),
        (f"\u00a0· {node.kind}", "dim"),
        ("  ◀ current" if node.current else "", "bold green"),
    )


#: What the pane says when no connected host has a domain (a newcomer's first screen): a
#: short tree label (a Tree line does not wrap: at 140 columns the tree is ~70 wide) and, in
#: the details area beside it, which wraps, what to do.
NO_DOMAINS = "no domains on the connected hosts"
NO_DOMAINS_HINT = (
    "Define a domain (virt-install, virt-manager), then T makes it a template and c deploys "
    "clones of it. 'virtdeck --demo' opens a lab to try it."
)


class SnapshotsPane(Pane):
    DEFAULT_CSS = """
    SnapshotsPane { height: 1fr; }
    SnapshotsPane Horizontal { height: 1fr; }
    SnapshotsPane #snap-tree { width: 1fr; min-width: 40; }
    SnapshotsPane #snap-details { width: 1fr; padding: 0 1; }
    SnapshotsPane #snap-status { height: 1; color: $text-muted; padding: 0 1; }
    """

    SCREEN_BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "pane('snapshots', 'new')", "Snapshot", id="snapshot.new"),
        Binding("v", "pane('snapshots', 'revert')", "Revert", id="snapshot.revert"),
        Binding("R", "pane('snapshots', 'rollback')", "Rollback", id="snapshot.rollback"),
        Binding("D", "pane('snapshots', 'delete')", "Del snapshot", id="snapshot.delete"),
    ]

    def __init__(
        self, session: Session, *, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(session, id=id, classes=classes)
        self.selected: DomainInfo | None = None
        self.snap_tree: SnapshotTree | None = None
        self.loads = 0  # finished loads (tests wait on it)
        self.rebuilds = 0  # times the Tree widget was rebuilt
        self.busy = False
        self._loading = False
        self._stale = False
        self._behind = False  # inventory or selection changed while the tab was hidden
        self._error: str | None = None
        self._no_domains = False

    def compose(self) -> ComposeResult:
        with Horizontal():
            tree: Tree[str] = Tree("no domain selected", id="snap-tree")
            tree.show_root = True
            yield tree
            yield Static("", id="snap-details", markup=False)
        yield Static("", id="snap-status", markup=False)

    def on_mount(self) -> None:
        # The first inventory may have arrived before this pane was mounted (an empty one
        # is said only once a host answered: before, it is just not read yet).
        if not self.session.domains and self.session.has_answered():
            self.inventory_changed([])

    # -- the Pane contract ------------------------------------------------------------------

    def domain_selected(self, info: DomainInfo | None) -> None:
        changed = (info and (info.host, info.name)) != (
            self.selected and (self.selected.host, self.selected.name)
        )
        self.selected = info
        if changed:
            self.snap_tree = None
            self._error = None
            self._status("")
            self._draw_tree()
        self._load_if_shown()

    def inventory_changed(self, domains: list[DomainInfo]) -> None:
        empty = not domains
        if empty != self._no_domains:
            self._no_domains = empty
            if self.selected is None:
                self._draw_tree()
        if self.selected is None:
            return
        key = (self.selected.host, self.selected.name)
        fresh = next((d for d in domains if (d.host, d.name) == key), None)
        if fresh is not None:
            self.selected = fresh
        self._load_if_shown()

    def pane_shown(self) -> None:
        if self._behind:
            self.load()

    def _load_if_shown(self) -> None:
        """Load now if the tab is shown, else when it is (a hidden tab does no work)."""
        if self.showing:
            self.load()
        else:
            self._behind = True

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        if self.selected is None:
            return
        if self._loading:
            self._stale = True
            return
        self._loading = True
        self._stale = False
        self._behind = False
        host = self.selected.host
        self._load(self.hypervisor(host), host, self.selected.name)

    @work(thread=True, exit_on_error=False, group="snapshots-load", description="snapshots")
    def _load(self, hv: Hypervisor, host: str, domain: str) -> None:
        try:
            tree = snapshots.snapshot_tree(hv, domain)
        except VirtdeckError as err:  # e.g. undefined meanwhile: shown in the pane, no toast
            self.post_message(SnapshotsLoaded(host, domain, None, str(err)))
            return
        self.post_message(SnapshotsLoaded(host, domain, tree))

    def on_snapshots_loaded(self, message: SnapshotsLoaded) -> None:
        self._loading = False
        self.loads += 1
        sel = self.selected
        if sel is not None and (sel.host, sel.name) == (message.host, message.domain):
            if message.error != self._error:
                self._error = message.error
                self._status(message.error or "")
            old, self.snap_tree = self.snap_tree, message.tree
            if old is None or message.tree is None or shape(old) != shape(message.tree):
                self._draw_tree()
            elif old != message.tree:  # only file sizes moved (a running guest writes)
                self._show_details(self.highlighted_name())
        if self._stale:
            self.load()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Pane's own handler (the error funnel) runs too: Textual calls each class's handler.
        if event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            if event.worker.group == "snapshots-load":
                self._loading = False
            elif event.worker.group == "snapshots-op":
                self.busy = False
                self._status("")
                self.load()

    # -- drawing ----------------------------------------------------------------------------

    def _draw_tree(self) -> None:
        widget = self.query_one_optional("#snap-tree", Tree)
        if widget is None:
            return
        self.rebuilds += 1
        keep = self.highlighted_name()
        widget.clear()
        if self.selected is None:
            widget.root.set_label(NO_DOMAINS if self._no_domains else "no domain selected")
            self._show_details(None)
            return
        tree = self.snap_tree
        if tree is None:
            widget.root.set_label(f"{self.selected.name}: {self._error or 'loading…'}")
            self._details("")
            return
        count = len(tree.nodes)
        hint = "a template never has any" if self.selected.is_template else "n takes one"
        widget.root.set_label(
            f"{self.selected.name}: {count} snapshot{'s' if count != 1 else ''}"
            if count
            else f"{self.selected.name}: no snapshots ({hint})"
        )
        widget.root.data = None
        by_name: dict[str, TreeNode[str]] = {}
        for node in tree.nodes:
            parent = by_name.get(node.parent or "", widget.root)
            if node.children:
                by_name[node.name] = parent.add(node_label(node), data=node.name, expand=True)
            else:
                by_name[node.name] = parent.add_leaf(node_label(node), data=node.name)
        widget.root.expand()
        target = keep if keep in by_name else (tree.current.name if tree.current else None)
        if target is not None:
            # The new lines get their positions at the next refresh; move the cursor then.
            self.call_after_refresh(widget.move_cursor, by_name[target])
        self._show_details(target)

    @on(Tree.NodeHighlighted, "#snap-tree")
    def _highlighted(self, event: Tree.NodeHighlighted[str]) -> None:
        self._show_details(event.node.data)

    def _show_details(self, name: str | None) -> None:
        if self.selected is None and self._no_domains:
            # The root line's highlight lands here too: keep saying what to do.
            self._details(NO_DOMAINS_HINT)
            return
        node = self.snap_tree.find(name) if self.snap_tree and name else None
        self._details(details_text(node) if node else "")

    def _details(self, text: str) -> None:
        static = self.query_one_optional("#snap-details", Static)
        if static is not None:
            static.update(text)

    def _status(self, text: str) -> None:
        static = self.query_one_optional("#snap-status", Static)
        if static is not None:
            static.update(text)

    def highlighted_name(self) -> str | None:
        widget = self.query_one_optional("#snap-tree", Tree)
        if widget is None or widget.cursor_node is None:
            return None
        data = widget.cursor_node.data
        return data if isinstance(data, str) else None

    # -- actions ----------------------------------------------------------------------------

    def _ready(self) -> DomainInfo | None:
        if self.selected is None:
            self.notify("select a domain first", severity="warning")
            return None
        if self.busy:
            self.notify("a snapshot operation is still running", severity="warning")
            return None
        return self.selected

    def action_new(self) -> None:
        info = self._ready()
        if info is None:
            return
        if info.is_template:  # refused by the planner anyway: say so before the form is filled
            self.app.notify(
                f"'{info.name}' is a template: its images are read-only bases its clones read, "
                "so no snapshot is taken of it (to change it, make a new template from a full "
                "clone)",
                severity="warning",
            )
            return
        tree = self.snap_tree
        external = bool(tree and tree.nodes and tree.kinds() == {"external"})

        def answered(request: SnapshotRequest | None) -> None:
            if request is not None:
                self.busy = True
                self._create(self.hypervisor(info.host), info.name, request)

        self.app.push_screen(
            NewSnapshotScreen(
                f"'{info.name}'", running=info.state.active, default_external=external
            ),
            answered,
        )

    def action_revert(self) -> None:
        self._plan_highlighted("revert")

    def action_rollback(self) -> None:
        info = self._ready()
        if info is not None:
            self.busy = True
            self._plan(self.hypervisor(info.host), info.name, "rollback", None)

    def action_delete(self) -> None:
        self._plan_highlighted("delete")

    def _plan_highlighted(self, verb: str) -> None:
        info = self._ready()
        if info is None:
            return
        name = self.highlighted_name()
        if name is None:
            self.notify("highlight a snapshot in the tree first", severity="warning")
            return
        self.busy = True
        self._plan(self.hypervisor(info.host), info.name, verb, name)

    def plan_for(self, host: str, domain: str, verb: str, name: str) -> None:
        """Plan `verb` ('revert' or 'delete') of snapshot `name` of any domain (the palette)."""
        if self.busy:
            self.notify("a snapshot operation is still running", severity="warning")
            return
        self.busy = True
        self._plan(self.hypervisor(host), domain, verb, name)

    # -- workers ----------------------------------------------------------------------------

    def _progress(self) -> Progress:
        def report(text: str, fraction: float | None) -> None:
            pct = "" if fraction is None else f" {fraction * 100:.0f}%"
            self.post_message(SnapshotProgress(text + pct, fraction))

        return report

    @work(thread=True, exit_on_error=False, group="snapshots-op", description="snapshot")
    def _create(self, hv: Hypervisor, domain: str, request: SnapshotRequest) -> None:
        plan = snapshots.plan_create(
            hv,
            domain,
            request.name,
            external=request.external,
            disk_only=request.disk_only,
            description=request.description,
        )
        for note in plan.notes:
            self.post_message(SnapshotProgress(note, None))
        node = snapshots.create(hv, plan, self._progress())
        self.post_message(SnapshotDone(f"{domain}: {node.kind} snapshot '{node.name}' taken"))

    @work(thread=True, exit_on_error=False, group="snapshots-op", description="snapshot plan")
    def _plan(self, hv: Hypervisor, domain: str, verb: str, name: str | None) -> None:
        plan: Plan
        if verb == "rollback":
            plan = snapshots.plan_rollback(hv, domain)
        elif verb == "revert":
            assert name is not None
            plan = snapshots.plan_revert(hv, domain, name)
        else:
            assert name is not None
            plan = snapshots.plan_delete(hv, domain, name)
        self.post_message(SnapshotPlanned(plan))

    def on_snapshot_planned(self, message: SnapshotPlanned) -> None:
        self.confirm_plan(message.plan)

    def plan_progress(self) -> Progress:
        return self._progress()

    def plan_cancelled(self) -> None:
        self.busy = False
        self._status("")

    def on_plan_done(self, message: PlanDone) -> None:
        self.post_message(SnapshotDone(message.text))

    def on_snapshot_progress(self, message: SnapshotProgress) -> None:
        self._status(message.text)

    def on_snapshot_done(self, message: SnapshotDone) -> None:
        self.busy = False
        self._status("")
        self.notify(message.text, title="snapshots")
        self.load()
        self.post_message(RefreshRequested())
