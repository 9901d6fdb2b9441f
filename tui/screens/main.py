"""The main screen: hosts header, the domains table, and the lower panes in tabs.

Keys live here (not on the App) so a modal screen above it never triggers them. Pane keys are
merged in from each pane's SCREEN_BINDINGS (see tui.widgets.base).

Groups: space marks rows (shift+up/down extends, `t` the clones of the template under the
cursor, `m` names matching a glob, `U` clears). While rows are marked, start, shutdown, force
off, reboot, pause, snapshot (`n`), rollback (`R`) and remove (`x`) act on the marked domains:
one group plan (tui.core.groups), one PlanScreen listing every one of them.

Fleet layout: with up to FLEET_LINES hosts the header has one line per host; with more it is
one summary line (hosts answering / not answering / domains, when the figures were read) and
`h` (binding id "hosts.list") unfolds the list of hosts. With several hosts the table has a
Host column: `o` cycles through it too (rows grouped by host), and the filter matches hosts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Header, HelpPanel, Input, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from tui.core import groups
from tui.core.catalog import Template
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo, DomainState, HostInfo
from tui.core.ops import Plan
from tui.messages import (
    ErrorReported,
    HostsViewChanged,
    LifecycleRequested,
    RefreshRequested,
)
from tui.modals.confirm import ConfirmScreen, PlanScreen
from tui.modals.group_forms import MatchScreen
from tui.modals.migrate_form import MigrateScreen
from tui.modals.snapshot_forms import NewSnapshotScreen, SnapshotRequest
from tui.screens.details import DetailsScreen
from tui.screens.terminal import AttachReady, hand_over, prepare
from tui.widgets.base import Pane
from tui.widgets.domains import DomainsTable
from tui.widgets.footer import KeysFooter
from tui.widgets.snapshots_pane import SnapshotsPane
from tui.widgets.templates_pane import TemplatesPane
from tui.widgets.usage_pane import UsagePane

if TYPE_CHECKING:
    from tui.core.session import Session

PANES: tuple[tuple[str, str, type[Pane]], ...] = (
    ("snapshots", "Snapshots", SnapshotsPane),
    ("templates", "Templates", TemplatesPane),
    ("usage", "Disk usage", UsagePane),
)

DOMAIN_BINDINGS: list[BindingType] = [
    Binding("s", "lifecycle('start')", "Start", id="domain.start"),
    Binding("d", "shutdown", "Shutdown", id="domain.shutdown"),
    Binding("f", "force_off", "Force off", id="domain.force_off"),
    Binding("r", "lifecycle('reboot')", "Reboot", id="domain.reboot"),
    Binding("p", "pause", "Pause", id="domain.pause"),
    Binding("i", "details", "Details", id="domain.details"),
    Binding("C", "attach('console')", "Console", show=False, id="domain.console"),
    Binding("S", "attach('ssh')", "SSH", show=False, id="domain.ssh"),
    Binding("M", "migrate", "Migrate", show=False, id="domain.migrate"),
    Binding("space", "toggle_mark", "Mark", id="group.mark"),
    Binding("shift+down", "extend_marks(1)", "Mark down", show=False, id="group.extend_down"),
    Binding("shift+up", "extend_marks(-1)", "Mark up", show=False, id="group.extend_up"),
    Binding("t", "mark_clones", "Mark clones", show=False, id="group.clones"),
    Binding("m", "mark_matching", "Mark matching", id="group.match"),
    Binding("U", "clear_marks", "Unmark all", show=False, id="group.clear"),
    Binding("slash", "filter", "Filter", id="domains.filter"),
    Binding("o", "sort", "Sort", id="domains.sort"),
    Binding("h", "toggle_hosts", "Hosts", id="hosts.list"),
    Binding("1", "tab('snapshots')", "Snapshots", show=False, id="tab.snapshots"),
    Binding("2", "tab('templates')", "Templates", show=False, id="tab.templates"),
    Binding("3", "tab('usage')", "Usage", show=False, id="tab.usage"),
    Binding("question_mark", "toggle_keys", "Keys", id="app.keys"),
    Binding("q", "app.quit", "Quit", id="app.quit"),
]

SORT_CYCLE = ("name", "state", "cpu", "memory", "disk", "vcpus", "host")
FLEET_LINES = 3  # more hosts than this: the header is one summary line (`h` lists them)

# Pane keys that act on the marked domains while there are any: (pane, verb) -> group verb.
GROUP_PANE_VERBS = {
    ("snapshots", "new"): "snapshot",
    ("snapshots", "rollback"): "rollback",
    ("templates", "delete"): "rm",
}


@dataclass
class GroupPlanned(Message):
    """A plan over the marked domains (a group verb, a migration) is ready to confirm."""

    plan: Plan  # tui.core.groups.GroupPlan or tui.core.migrate.MigrateGroup


@dataclass
class GroupDone(Message):
    text: str


@dataclass
class GroupProgress(Message):
    """How a running group plan goes (shown in the header's second line)."""

    text: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, GroupProgress)


def binding_ids() -> set[str]:
    """Every binding id a config file's [keys] table may rebind."""
    ids = {b.id for b in MainScreen.BINDINGS if isinstance(b, Binding) and b.id}
    return ids


def _pane_bindings() -> list[BindingType]:
    """Each pane key twice: shown in the footer only while its tab is active, and a hidden twin
    (tried next for the same key) so the key works from any tab."""
    out: list[BindingType] = []
    for _id, _title, pane in PANES:
        for b in pane.SCREEN_BINDINGS:
            assert isinstance(b, Binding) and b.action.startswith("pane(")
            out.append(b)
            out.append(Binding(b.key, "pane_anywhere" + b.action[4:], b.description, show=False))
    return out


def _of_domain(b: BindingType) -> bool:
    return isinstance(b, Binding) and bool(b.id) and str(b.id).startswith("domain.")


class MainScreen(Screen[None]):
    # The footer lists keys in this order and cuts what does not fit (at 140 columns the
    # active tab's keys used to be cut): the domain's keys, the tab's, then the rest.
    BINDINGS: ClassVar[list[BindingType]] = (
        [b for b in DOMAIN_BINDINGS if _of_domain(b)]
        + _pane_bindings()
        + [b for b in DOMAIN_BINDINGS if not _of_domain(b)]
    )

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    show_host_list = False  # `h`: the header lists every host (more than FLEET_LINES)
    _hosts_text = ""
    _host_rows: list[tuple[str, HostInfo | None, bool]] = []
    _host_status: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting…", id="hosts")
        with Vertical(id="top"):
            yield DomainsTable(id="domains")
        with TabbedContent(id="panes"):
            for pane_id, title, pane_cls in PANES:
                with TabPane(title, id=f"tab-{pane_id}"):
                    yield pane_cls(self.session, id=pane_id)
        # The filter takes the footer's line while it is open (as `/` in less or vim): the
        # table keeps its place, so opening and clearing it repaints one line, not the screen.
        yield Input(placeholder="filter: name, state or host (Esc clears)", id="filter")
        yield KeysFooter()

    def on_mount(self) -> None:
        self.query_one(DomainsTable).focus()

    # -- data from the app ------------------------------------------------------------------

    def set_hosts(
        self,
        hosts: list[tuple[str, HostInfo | None, bool]],
        status: dict[str, str],
        counts: dict[str, int] | None = None,
        read_at: float = 0.0,
    ) -> None:
        """The header: one line per host (uri, versions when known, demo), or past FLEET_LINES
        hosts one summary line (and the host lines under it while `h` shows them); `status`
        holds a badge for each host not answering, `counts` the domains per host, `read_at`
        when the figures were last read. Redrawn only when its text changed."""
        folds = (len(self._host_rows) > FLEET_LINES, len(hosts) > FLEET_LINES)
        self._host_rows, self._host_status = hosts, status
        if folds[0] != folds[1]:
            self.refresh_bindings()  # `h` is in the footer only while it folds something
        read = f"read {time.strftime('%H:%M:%S', time.localtime(read_at))}" if read_at else ""
        lines = self._host_lines(hosts, status)
        if len(hosts) > FLEET_LINES:
            total = sum((counts or {}).values())
            up = sum(1 for uri, h, _demo in hosts if h is not None and uri not in status)
            silent = sum(1 for uri, _h, _demo in hosts if uri in status)
            badge = f"[b reverse $error] {silent} NOT ANSWERING [/] " if silent else ""
            key = self.app.get_key_display(self._binding("hosts.list"))
            fold = "hide" if self.show_host_list else "list"
            summary = (
                f"{badge}[b]{len(hosts)} hosts[/b]: {up} answering, {silent} no answer, "
                f"{total} domains  {read}  [dim]({key}: {fold} hosts)[/dim]"
            )
            lines = [summary, *lines] if self.show_host_list else [summary]
        elif read and lines:
            lines[-1] += f"  [dim]{read}[/dim]"
        text = "\n".join(lines)
        if text != self._hosts_text:
            self._hosts_text = text
            self.query_one("#hosts", Static).update(text)
        self.query_one(DomainsTable).set_multi_host(len(hosts) > 1)

    def _binding(self, binding_id: str) -> Binding:
        for b in self._bindings.key_to_bindings.values():
            for binding in b:
                if binding.id == binding_id:
                    return binding
        return next(b for b in DOMAIN_BINDINGS if isinstance(b, Binding) and b.id == binding_id)

    def action_toggle_keys(self) -> None:
        """`?`: every key of the dashboard (the hidden ones too) in Textual's keys panel, or
        close it (the palette's "Keys" opens the same panel)."""
        if self.query(HelpPanel):
            self.app.action_hide_help_panel()
        else:
            self.app.action_show_help_panel()

    def action_toggle_hosts(self) -> None:
        if len(self._host_rows) <= FLEET_LINES:
            self.notify("every host is in the header already", timeout=2)
            return
        self.show_host_list = not self.show_host_list
        self.post_message(HostsViewChanged())

    def shows_running(self, host: str, *, measured: bool = True) -> bool:
        """Does the table show a running domain of `host` (with `measured`: whose CPU % is
        known, so moves)?"""
        return self.query_one(DomainsTable).shows_running(host, measured=measured)

    @staticmethod
    def _host_lines(
        hosts: list[tuple[str, HostInfo | None, bool]], status: dict[str, str]
    ) -> list[str]:
        lines = []
        for uri, h, demo in hosts:
            badge = ""
            if uri in status:
                badge = f"[b reverse $error] {escape(status[uri]).upper()} [/] "
            tag = "[b reverse] DEMO [/] " if demo else ""
            if h is None:
                lines.append(f"{tag}{badge}[b]{escape(uri)}[/b]  connecting…")
                continue
            hv = f"QEMU {h.hypervisor_version}" if h.driver == "QEMU" else f"{h.driver} driver"
            lines.append(
                f"{tag}{badge}[b]{escape(h.uri)}[/b]  host {h.hostname}  "
                f"libvirt {h.libvirt_version}  {hv}"
            )
        return lines

    def show_domains(
        self,
        domains: list[DomainInfo],
        status: dict[str, str] | None = None,
        *,
        host: str | None = None,
        tell_panes: bool = True,
    ) -> None:
        """`domains` are now every host's (or, with `host`, that host's); the panes hear of
        the whole inventory when `tell_panes`."""
        table = self.query_one(DomainsTable)
        if self.app.screen is self and self.focused is None:
            table.focus()  # a pane rebuilt the widget that had the focus: keys must still work
        before = table.selected()
        table.update_domains(domains, status or {}, hosts=None if host is None else [host])
        after = table.selected()
        if tell_panes:
            everything = self.session.domains
            for pane in self.query(Pane):
                pane.inventory_changed(everything)
        if before != after:
            self._selected_changed(after)

    def show_host_status(self, status: dict[str, str]) -> None:
        """Hosts not answering: their rows greyed with how long (the panes are not told)."""
        self.query_one(DomainsTable).set_stale(status)

    def _selected_changed(self, info: DomainInfo | None) -> None:
        for pane in self.query(Pane):
            pane.domain_selected(info)

    @on(DataTable.RowHighlighted, "#domains")
    def _row_highlighted(self) -> None:
        self._selected_changed(self.query_one(DomainsTable).selected())

    @on(DataTable.HeaderSelected, "#domains")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.query_one(DomainsTable).sort_by(str(event.column_key.value))

    @property
    def selected(self) -> DomainInfo | None:
        return self.query_one(DomainsTable).selected()

    # -- actions ----------------------------------------------------------------------------

    def _need_selection(self) -> DomainInfo | None:
        info = self.selected
        if info is None:
            self.notify("select a domain first", severity="warning")
        return info

    def action_lifecycle(self, action: str) -> None:
        if self.marked:
            self.group(action)
            return
        info = self._need_selection()
        if info is not None:
            self.post_message(LifecycleRequested(info.host, info.name, action))

    def action_shutdown(self) -> None:
        self.action_lifecycle("shutdown")

    def action_pause(self) -> None:
        if self.marked:
            paused = all(d.state is DomainState.PAUSED for d in self.marked)
            self.group("resume" if paused else "suspend")
            return
        info = self._need_selection()
        if info is not None:
            action = "resume" if info.state is DomainState.PAUSED else "suspend"
            self.post_message(LifecycleRequested(info.host, info.name, action))

    def action_force_off(self) -> None:
        if self.marked:
            self.group("destroy")
            return
        info = self._need_selection()
        if info is None:
            return
        self._confirm_force_off(
            info.host,
            info.name,
            f"Force off '{info.name}'?",
            "This pulls the plug: the guest gets no chance to flush its disks or stop services.",
        )

    def offer_force_off(self, host: str, name: str, timeout: float) -> None:
        self._confirm_force_off(
            host,
            name,
            f"'{name}' is still running",
            f"The guest did not power off within {timeout:g} s of the shutdown request. "
            "Force it off? It gets no chance to flush its disks.",
        )

    def _confirm_force_off(self, host: str, name: str, title: str, body: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(LifecycleRequested(host, name, "destroy"))

        self.app.push_screen(ConfirmScreen(title, body, yes_label="Force off"), answered)

    def action_migrate(self) -> None:
        """Migrate the marked domains (else the highlighted one) to the next other host; the
        plan names it (tui.core.migrate)."""
        chosen = self.marked or ([self.selected] if self.selected is not None else [])
        if not chosen:
            self.notify("select a domain first", severity="warning")
            return
        uris = self.session.uris
        host = chosen[0].host
        start = uris.index(host) + 1 if host in uris else 0
        others = [u for u in uris[start:] + uris if u != host]
        if not others:
            self.notify("only one host is connected: nowhere to migrate to", severity="warning")
            return

        def chosen_target(answer: tuple[str, str | None] | None) -> None:
            if answer is None:
                return
            target, directory = answer
            members = [(d.host, d.name) for d in chosen if d.host != target]
            if not members:
                self.notify(f"already on {target}", severity="warning")
                return
            self._plan_migrate(members, target, directory)

        self.app.push_screen(MigrateScreen([d.name for d in chosen], others), chosen_target)

    @work(thread=True, exit_on_error=False, group="group-plan", description="migrate plan")
    def _plan_migrate(
        self, members: list[tuple[str, str]], target: str, directory: str | None = None
    ) -> None:
        from tui.core import migrate

        plan = migrate.plan_group(
            self.session.hypervisor,
            self.session.hypervisor(target),
            members,
            directory=directory,
        )
        self.post_message(GroupPlanned(plan))

    def action_details(self) -> None:
        info = self._need_selection()
        if info is not None:
            self.app.push_screen(DetailsScreen(self.session.hypervisor(info.host), info.name))

    def action_attach(self, what: str) -> None:
        """`C` console, `S` ssh: the worker checks and builds the command, then the terminal
        is handed over on this (the main) thread."""
        info = self._need_selection()
        if info is not None:
            self._prepare_attach(self.session.hypervisor(info.host), info.name, what)

    @work(thread=True, group="attach", exclusive=True, exit_on_error=False)
    def _prepare_attach(self, hv: Hypervisor, name: str, what: str) -> None:
        self.post_message(prepare(hv, name, what))

    @on(AttachReady)
    def _attach_ready(self, message: AttachReady) -> None:
        hand_over(self.app, message)
        self.post_message(RefreshRequested())

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR and event.worker.error is not None:
            self.post_message(ErrorReported(event.worker.error))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        with self.app.batch_update():
            self._show_filter(True)
            box.focus()

    def _show_filter(self, shown: bool) -> None:
        """The filter box and the footer share the bottom line."""
        self.query_one("#filter", Input).display = shown
        self.query_one(KeysFooter).show(not shown)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.query_one(DomainsTable).set_filter(event.value)

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        # The filter stays applied; the footer gets its line back (`/` shows the filter
        # again, `Esc` clears it).
        with self.app.batch_update():
            self.query_one(DomainsTable).focus()
            self._show_filter(False)
        if event.value:
            self.notify(f"filtered by '{event.value}' (Esc clears)", timeout=3)

    def key_escape(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display or box.value:
            with self.app.batch_update():  # one layout and repaint, not one per change
                self.query_one(DomainsTable).focus()  # first: the footer comes back to the
                box.value = ""  # keys it showed before `/`, and need not be rebuilt
                self._show_filter(False)
        elif self.marked:
            self.action_clear_marks()

    def action_sort(self) -> None:
        table = self.query_one(DomainsTable)
        cycle = SORT_CYCLE if table.show_host else SORT_CYCLE[:-1]
        i = cycle.index(table.sort_column) if table.sort_column in cycle else -1
        table.sort_by(cycle[(i + 1) % len(cycle)])
        self.notify(f"sorted by {table.sort_column}", timeout=2)

    def action_tab(self, pane_id: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{pane_id}"

    def action_pane(self, pane_id: str, verb: str) -> None:
        group_verb = GROUP_PANE_VERBS.get((pane_id, verb))
        if group_verb is not None and self.marked:
            self.group(group_verb)
            return
        pane = self.query_one(f"#{pane_id}", Pane)
        self.action_tab(pane_id)
        getattr(pane, f"action_{verb}")()

    def action_pane_anywhere(self, pane_id: str, verb: str) -> None:
        self.action_pane(pane_id, verb)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "pane" and parameters:
            return self.query_one(TabbedContent).active == f"tab-{parameters[0]}"
        if action == "toggle_hosts":  # up to FLEET_LINES hosts every host has its header line
            return len(self._host_rows) > FLEET_LINES
        return True

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        self.refresh_bindings()
        for pane in self.query(Pane):
            if pane.showing:
                pane.pane_shown()

    # -- command palette: any domain, template or snapshot (tui.screens.palette) -------------

    def all_domains(self) -> list[DomainInfo]:
        return list(self.session.domains)

    def hosts(self) -> list[str]:
        return self.session.uris

    def answering_hypervisors(self) -> list[Hypervisor]:
        return self.session.answering

    def templates(self) -> list[Template]:
        return list(self.query_one(TemplatesPane).templates)

    def show_domain(self, host: str, name: str) -> DomainInfo | None:
        """Put the cursor on a domain (clearing a filter that hides it) and tell the panes;
        None when it is gone."""
        table = self.query_one(DomainsTable)
        if not table.select_row(host, name):
            self.query_one("#filter", Input).value = ""
            self._show_filter(False)
            table.set_filter("")
            if not table.select_row(host, name):
                self.notify(f"'{name}' is no longer on {host}", severity="warning")
                return None
        info = table.selected()
        self._selected_changed(info)
        table.focus()
        return info

    async def act_on_domain(self, host: str, name: str, action: str) -> None:
        if self.show_domain(host, name) is not None:
            await self.one_domain(action)

    async def deploy_template(
        self, host: str, name: str, sealed: bool, seeds: bool = False
    ) -> None:
        self.action_tab("templates")
        self.query_one(TemplatesPane).deploy(host, name, sealed, seeds)

    async def import_image(self) -> None:
        self.action_tab("templates")
        self.query_one(TemplatesPane).action_import()

    async def copy_template(self, host: str, name: str) -> None:
        self.action_tab("templates")
        self.query_one(TemplatesPane).copy(host, name)

    async def snapshot_action(self, host: str, domain: str, verb: str, name: str) -> None:
        if self.show_domain(host, domain) is not None:
            self.action_tab("snapshots")
            self.query_one(SnapshotsPane).plan_for(host, domain, verb, name)

    # -- command palette: the actions of the selected row -----------------------------------

    def row_commands(self) -> Iterable[SystemCommand]:
        yield from self.group_commands()
        info = self.selected
        if info is None:
            return
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            if binding.id and binding.id.split(".")[0] in ("domain", "template", "snapshot"):
                # the visible pane bindings only run while their tab is active; not so here
                action = binding.action.replace("pane(", "pane_anywhere(", 1)

                async def run(action: str = action) -> None:
                    await self.one_domain(action)

                yield SystemCommand(
                    f"{binding.description}: {info.name}",
                    f"{binding.description} the selected domain (key {binding.key})",
                    run,
                )

    # -- groups: marked rows, one plan ------------------------------------------------------

    GROUP_COMMANDS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("start", "Start"),
        ("shutdown", "Shut down"),
        ("destroy", "Force off"),
        ("reboot", "Reboot"),
        ("snapshot", "Snapshot"),
        ("rollback", "Roll back"),
        ("rm", "Remove"),
    )

    def group_commands(self) -> Iterable[SystemCommand]:
        """The palette's group actions: marking always, the verbs while domains are marked
        (each runs `group(verb)`: one plan, one confirmation)."""
        for action, title, helptext in (
            ("mark_matching", "Mark matching domains…", "mark the domains a name pattern matches"),
            ("mark_clones", "Mark clones of this template", "the clones of the template under "
             "the cursor (of a clone: its template's)"),
            ("clear_marks", "Unmark all", "clear the marks"),
        ):  # fmt: skip

            async def run_mark(action: str = action) -> None:
                await self.run_action(action)

            yield SystemCommand(title, helptext, run_mark)
        marked = self.marked
        if not marked:
            return
        names = ", ".join(d.name for d in marked)
        for verb, title in self.GROUP_COMMANDS:

            def run(verb: str = verb) -> None:
                self.group(verb)

            yield SystemCommand(f"{title} {len(marked)} marked domains", names, run)

    @property
    def marked(self) -> list[DomainInfo]:
        """The marked domains (the group the keys act on), in the table's order; none while a
        palette command that names one domain runs (`one_domain`)."""
        if self._one_domain:
            return []
        return self.query_one(DomainsTable).marked_domains()

    _one_domain = False

    async def one_domain(self, action: str) -> None:
        """Run a key's action on the cursor's domain alone, whatever is marked (a palette
        command names its domain: "Rollback db" never rolls back the marked group)."""
        self._one_domain = True
        try:
            await self.run_action(action)
        finally:
            self._one_domain = False

    def action_toggle_mark(self) -> None:
        self.query_one(DomainsTable).toggle_mark()

    def action_extend_marks(self, step: int) -> None:
        self.query_one(DomainsTable).extend_marks(step)

    def action_clear_marks(self) -> None:
        self.query_one(DomainsTable).clear_marks()

    def action_mark_clones(self) -> None:
        """Mark the clones of the template under the cursor (of a clone's template)."""
        info = self._need_selection()
        if info is None:
            return
        template = info.name if info.is_template else info.meta.source
        if not template or not (info.is_template or info.meta.role == "clone"):
            self.notify(f"'{info.name}' is neither a template nor a clone", severity="warning")
            return
        n = self.query_one(DomainsTable).mark_clones(template)
        self.notify(f"{n} clone(s) of '{template}' marked", timeout=3)

    def action_mark_matching(self) -> None:
        def answered(pattern: str | None) -> None:
            if pattern:
                n = self.query_one(DomainsTable).mark_matching(pattern)
                text = f"{n} domain(s) match '{pattern}'"
                self.notify(text, severity="information" if n else "warning", timeout=3)

        self.app.push_screen(MatchScreen(), answered)

    @on(DomainsTable.MarksChanged)
    def _marks_changed(self, message: DomainsTable.MarksChanged) -> None:
        self.sub_title = f"{message.count} selected" if message.count else ""

    def group(self, verb: str) -> None:
        """Plan `verb` for the marked domains (a worker), then one confirmation for all."""
        marked = self.marked
        members = [groups.Member(d.host, d.name) for d in marked]
        if verb != "snapshot":
            self._plan_group(verb, members, {})
            return

        def answered(request: SnapshotRequest | None) -> None:
            if request is not None:
                opts = {
                    "snapshot": request.name,
                    "external": request.external,
                    "disk_only": request.disk_only,
                    "description": request.description,
                }
                self._plan_group("snapshot", members, opts)

        names = ", ".join(d.name for d in marked)
        running = any(d.state.active for d in marked)
        what = f"{len(marked)} domains: {names}"
        self.app.push_screen(NewSnapshotScreen(what, running=running), answered)

    @work(thread=True, exit_on_error=False, group="group-plan", description="group plan")
    def _plan_group(self, verb: str, members: list[groups.Member], opts: dict[str, Any]) -> None:
        if verb == "rm":  # planned with storage so the modal lists the files; its box decides
            opts = {"storage": True, "backup_dir": self.session.settings.backup_dir}
        if verb == "shutdown":
            opts = {"timeout": self.session.settings.shutdown_timeout}
        plan = groups.plan_group(self.session.hypervisor, verb, members, **opts)
        if verb == "rm":
            plan = replace(plan, members=tuple(replace(m, ask=True) for m in plan.members))
        self.post_message(GroupPlanned(plan))

    # -- the one path every group plan takes: confirm, run in a worker, report -------------

    @on(GroupPlanned)
    def _group_planned(self, message: GroupPlanned) -> None:
        def answered(chosen: Any) -> None:
            if chosen is not None:
                self.notify(f"{chosen.title.rstrip('?')}…", timeout=3)
                self._run_group(chosen)

        self.app.push_screen(PlanScreen(message.plan), answered)

    @work(thread=True, exit_on_error=False, group="plan", description="running a group plan")
    def _run_group(self, plan: Plan) -> None:
        def progress(text: str, fraction: float | None) -> None:
            share = f" ({fraction:.0%})" if fraction is not None else ""
            self.post_message(GroupProgress(text + share))

        try:
            text = plan.run(self.session.hypervisor(plan.host), progress)
        finally:
            self.post_message(GroupProgress(""))
            self.post_message(RefreshRequested())
        self.post_message(GroupDone(text))

    @on(GroupProgress)
    def _group_progress(self, message: GroupProgress) -> None:
        self.sub_title = message.text

    @on(GroupDone)
    def _group_done(self, message: GroupDone) -> None:
        self.notify(message.text, title="group")
        for pane in self.query(Pane):
            pane.domain_selected(self.selected)
