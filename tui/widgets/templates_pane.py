"""The Templates pane: every template with its base images, sizes, seal and clones, and the
keys that make a template (T), deploy clones (c), delete a domain (x), copy the
highlighted template to the next connected host (y) and detach the selected thin clone from
its base (F: it becomes full).

The list comes from tui.core.templates.list_templates in a thread worker; it is reloaded when
the inventory's shape changes (names, roles, disks) and, while its tab is shown, at most every
RELOAD_SECONDS otherwise,
since it reads every image's header with qemu-img. Every action plans in a worker, shows the
plan in a modal, then executes in a worker whose progress arrives as messages (the bar below
the table); refusals (e.g. a base that thin clones depend on) reach the app's error funnel.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, TypeVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, ProgressBar, Static
from textual.worker import Worker, WorkerState

from tui.core import clones, templates
from tui.core.errors import VirtdeckError
from tui.core.fleet import on_each
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo
from tui.core.ops import Plan
from tui.core.progress import Progress
from tui.core.session import Session
from tui.core.templates import Template
from tui.core.units import size
from tui.messages import RefreshRequested
from tui.modals.template_forms import (
    DeployRequest,
    DeployScreen,
    ImportRequest,
    ImportScreen,
    MakeTemplateScreen,
    TemplateRequest,
)
from tui.widgets.base import Pane, PlanDone

RELOAD_SECONDS = 15.0
R = TypeVar("R")  # what a form answers
COLUMNS = ("Template", "Defined", "Base image(s)", "Virtual", "Real", "Sealed", "Thin", "Full")


@dataclass
class TemplatesLoaded(Message):
    templates: list[Template]


@dataclass
class TemplateProgress(Message):
    text: str
    fraction: float | None

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TemplateProgress)


@dataclass
class OperationsLoaded(Message):
    """virt-sysprep's operations, ready for the make-template form."""

    host: str
    vm: str
    running: bool
    operations: dict[str, bool]
    note: str


@dataclass
class Planned(Message):
    plan: Plan


def row_cells(t: Template) -> tuple[str, ...]:
    if t.sealed:
        when = (t.created or "?")[:16].replace("T", " ")
        ops = ",".join(t.sealed_operations)
        sealed = f"{when} ({len(t.sealed_operations)} ops)" if len(ops) > 30 else f"{when} {ops}"
    else:
        sealed = "no"
    return (
        t.name if t.family is None else f"{t.name} (v{t.version} of {t.family})",
        "yes" if t.defined else "backup only",
        " ".join(os.path.basename(b.path) for b in t.base_images),
        size(t.virtual_bytes),
        size(t.actual_bytes),
        sealed,
        str(len(t.thin_clones)),
        str(len(t.full_clones)),
    )


def details_text(t: Template) -> str:
    lines = [
        f"{t.name}  (from {t.source or '?'}; "
        + ("defined" if t.defined else f"undefined, XML in {t.xml_backup}")
        + ")",
        f"sealed    {', '.join(t.sealed_operations) or '-'}" if t.sealed else "sealed    no",
    ]
    if t.imported:
        lines.append(f"imported  {t.imported} (a cloud image)")
    if t.identity == "cloud-init":
        lines.append("identity  cloud-init seed per clone (hostname, keys, address)")
    if t.family is not None:  # tui.core.versions
        lines.append(f"version   {t.version} of {t.family} (sealed {t.created or '?'})")
    if t.sealed and t.identity != "cloud-init":  # what each clone makes of its own, shares
        lines.extend(f"new       {line}" for line in t.first_boot.lines())
    lines.extend(f"SHARED    {line}" for line in t.shares)
    for b in t.base_images:
        ro = {True: "read-only", False: "WRITABLE", None: "mode unknown"}[b.read_only]
        lines.append(
            f"base {b.target:<4} {b.path}  ({size(b.virtual_bytes)} virtual, "
            f"{size(b.actual_bytes)} real, {ro})"
        )
        if b.problem:
            lines.append(f"          unknown: {b.problem}")
    lines.append(f"thin      {', '.join(t.thin_clones) or '-'}  (depend on the base)")
    lines.append(f"full      {', '.join(t.full_clones) or '-'}")
    return "\n".join(lines)


class TemplatesPane(Pane):
    DEFAULT_CSS = """
    TemplatesPane { height: 1fr; }
    TemplatesPane #tpl-table { height: auto; max-height: 60%; }
    TemplatesPane #tpl-details { height: 1fr; padding: 0 1; border-top: solid $panel; }
    TemplatesPane #tpl-status { height: 1; color: $text-muted; padding: 0 1; }
    TemplatesPane #tpl-progress { height: 1; display: none; padding: 0 1; }
    TemplatesPane.busy #tpl-progress { display: block; }
    """

    SCREEN_BINDINGS: ClassVar[list[BindingType]] = [
        Binding("T", "pane('templates', 'make')", "Make template", id="template.make"),
        Binding("c", "pane('templates', 'deploy')", "Deploy", id="template.deploy"),
        Binding("x", "pane('templates', 'delete')", "Delete VM", id="template.delete"),
        Binding("y", "pane('templates', 'copy')", "Copy to host", id="template.copy"),
        Binding("F", "pane('templates', 'detach')", "Detach (full)", id="template.detach"),
        Binding("e", "pane('templates', 'version')", "New version", id="template.version"),
        Binding("I", "pane('templates', 'import')", "Import image", id="template.import"),
    ]

    def __init__(
        self, session: Session, *, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(session, id=id, classes=classes)
        self.selected: DomainInfo | None = None
        self.templates: list[Template] = []
        self.loads = 0  # finished loads (tests wait on it)
        self.busy = False
        self._loading = False
        self._stale = False
        self._signature: object = None
        self._loaded_at = 0.0
        self.multi_host = False  # a Host column when several hypervisors are connected
        self.backup_dir: Path | None = None

    def compose(self) -> ComposeResult:
        table: DataTable[str] = DataTable(id="tpl-table", cursor_type="row")
        yield table
        yield Static("", id="tpl-details", markup=False)
        yield ProgressBar(total=1.0, id="tpl-progress", show_eta=False)
        yield Static("", id="tpl-status", markup=False)

    def on_mount(self) -> None:
        table = self.query_one("#tpl-table", DataTable)
        self.multi_host = len(self.session.hypervisors) > 1
        self.backup_dir = self.session.settings.backup_dir  # None: the default (tui.core.paths)
        for col in (("Host",) if self.multi_host else ()) + COLUMNS:
            table.add_column(col, key=col)
        # The first inventory may arrive before this pane is mounted: do not wait for the next.
        self.load()

    # -- the Pane contract ------------------------------------------------------------------

    def domain_selected(self, info: DomainInfo | None) -> None:
        self.selected = info
        if info is not None and info.is_template:
            self._highlight(info.host, info.name)

    def inventory_changed(self, domains: list[DomainInfo]) -> None:
        if self.selected is not None:
            key = (self.selected.host, self.selected.name)
            self.selected = next((d for d in domains if (d.host, d.name) == key), self.selected)
        signature = tuple((d.host, d.name, d.meta, tuple(x.path for x in d.disks)) for d in domains)
        old = time.monotonic() - self._loaded_at > RELOAD_SECONDS
        if signature != self._signature or (old and self.showing):
            self._signature = signature
            self.load()

    def pane_shown(self) -> None:
        if time.monotonic() - self._loaded_at > RELOAD_SECONDS:
            self.load()

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        if self._loading:
            self._stale = True
            return
        self._loading = True
        self._stale = False
        # (a host not answering would hold the load up to its deadline)
        self._load(self.session.answering)

    # Hypervisors are resolved on the UI thread and handed to the workers: a thread never
    # reaches into the app.
    @work(thread=True, exit_on_error=False, group="templates-load", description="templates")
    def _load(self, hypervisors: list[Hypervisor]) -> None:
        # Hosts in parallel with a deadline: one that hangs now is left out of this load (the
        # inventory refresh reports it), not waited on.
        result = on_each(
            hypervisors,
            lambda hv: templates.list_templates(hv, self.backup_dir),  # backups keyed by host
            timeout=max((hv.timeout for hv in hypervisors), default=10.0),
        )
        found = [t for hv in hypervisors for t in result.answers.get(hv.uri, [])]
        self.post_message(TemplatesLoaded(found))

    def on_templates_loaded(self, message: TemplatesLoaded) -> None:
        self._loading = False
        self._loaded_at = time.monotonic()
        self.loads += 1
        if message.templates != self.templates:
            self.templates = message.templates
            self._draw()
        if self._stale:
            self.load()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Pane's own handler (the error funnel) runs too: Textual calls each class's handler.
        if event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            if event.worker.group == "templates-load":
                self._loading = False
            elif event.worker.group == "templates-op":
                self._idle()

    # -- drawing ----------------------------------------------------------------------------

    def _draw(self) -> None:
        table = self.query_one_optional("#tpl-table", DataTable)
        if table is None:
            return
        keep = self.highlighted()
        table.clear()
        for t in self.templates:
            cells = ((t.host,) if self.multi_host else ()) + row_cells(t)
            table.add_row(*cells, key=f"{t.host}\0{t.name}")
        if keep is not None:
            self._highlight(keep.host, keep.name)
        self._show_details()

    def _highlight(self, host: str, name: str) -> None:
        table = self.query_one_optional("#tpl-table", DataTable)
        if table is None:
            return
        for i, t in enumerate(self.templates):
            if (t.host, t.name) == (host, name):
                table.move_cursor(row=i)
                return

    def highlighted(self) -> Template | None:
        table = self.query_one_optional("#tpl-table", DataTable)
        if table is None or not self.templates or table.cursor_row is None:
            return None
        row = table.cursor_row
        return self.templates[row] if 0 <= row < len(self.templates) else None

    @on(DataTable.RowHighlighted, "#tpl-table")
    def _row_highlighted(self) -> None:
        self._show_details()

    def _show_details(self) -> None:
        t = self.highlighted()
        text = details_text(t) if t else "no templates yet: T makes one from the selected domain"
        self.query_one("#tpl-details", Static).update(text)

    def _status(self, text: str) -> None:
        static = self.query_one_optional("#tpl-status", Static)
        if static is not None:
            static.update(text)

    # -- actions ----------------------------------------------------------------------------

    def _begin(self) -> bool:
        if self.busy:
            self.notify("a template operation is still running", severity="warning")
            return False
        self.busy = True
        return True

    def _ask(self, form: ModalScreen[R | None], then: Callable[[R], object]) -> None:
        """Show a form (this pane is busy already); its answer goes to `then`, which plans in
        a worker; cancelled, the pane is idle again."""

        def answered(request: R | None) -> None:
            if request is None:
                self._idle()
            else:
                then(request)

        self.app.push_screen(form, answered)

    def _idle(self) -> None:
        self.busy = False
        self.remove_class("busy")
        self._status("")

    def action_make(self) -> None:
        info = self.selected
        if info is None:
            self.notify("select a domain first", severity="warning")
            return
        if info.is_template:
            self.notify(f"'{info.name}' is already a template", severity="warning")
            return
        if self._begin():
            self._sysprep_operations(info.host, info.name, info.state.active)

    def action_deploy(self) -> None:
        info = self.selected
        target: tuple[str, str, bool, bool] | None = None
        if info is not None and info.is_template:
            seeds = info.meta.identity == "cloud-init"
            target = (info.host, info.name, info.meta.sealed, seeds)
        elif (t := self.highlighted()) is not None:
            target = (t.host, t.name, t.sealed, t.identity == "cloud-init")
        if target is None:
            self.notify("select a template (domain row or this pane's row)", severity="warning")
            return
        self.deploy(*target)

    def deploy(self, host: str, name: str, sealed: bool, seeds: bool = False) -> None:
        """The deploy form for template `name` of `host`, then its plan (`seeds`: the
        template gives its clones cloud-init seeds by default)."""
        if self._begin():
            self._ask(
                DeployScreen(name, sealed=sealed, seeds=seeds),
                lambda request: self._plan_clone(self.hypervisor(host), name, request),
            )

    def action_copy(self) -> None:
        """Copy the highlighted template to the next other host (the plan names it)."""
        t = self.highlighted()
        if t is None:
            self.notify("select a template in this pane", severity="warning")
            return
        self.copy(t.host, t.name)

    def copy(self, host: str, name: str) -> None:
        """Plan copying template `name` of `host` to the next other host."""
        uris = self.session.uris
        others = [u for u in uris[uris.index(host) + 1 :] + uris if u != host]
        if not others:
            self.notify("only one host is connected: nowhere to copy to", severity="warning")
            return
        if self._begin():
            self._plan_copy(self.hypervisor(host), self.hypervisor(others[0]), name)

    def action_import(self) -> None:
        """The import form (a cloud image made a template), on the selected row's host."""
        uris = self.session.uris
        if not uris:
            self.notify("no host is connected", severity="warning")
            return
        t = self.highlighted()
        host = self.selected.host if self.selected else (t.host if t else uris[0])
        self.import_image(uris, host if host in uris else uris[0])

    def import_image(self, hosts: list[str], host: str) -> None:
        """The import form for one of `hosts` (`host` chosen), then its plan."""
        if self._begin():
            self._ask(ImportScreen(hosts, host), self._plan_import)

    def action_version(self) -> None:
        """On a template: plan its edit VM (tui.core.versions); on that edit VM (a clone
        named *-edit): plan sealing it into the next version."""
        info = self.selected
        if info is not None and not info.is_template and info.name.endswith("-edit"):
            if self._begin():
                self._plan_version(self.hypervisor(info.host), info.name, seal=True)
            return
        t = self.highlighted()
        if t is None:
            self.notify("select a template in this pane, or its edit VM", severity="warning")
            return
        if self._begin():
            self._plan_version(self.hypervisor(t.host), t.name, seal=False)

    @work(thread=True, exit_on_error=False, group="templates-op", description="version plan")
    def _plan_version(self, hv: Hypervisor, name: str, *, seal: bool) -> None:
        from tui.core import versions

        if seal:
            self.post_message(Planned(versions.plan_seal(hv, name, backup_dir=self.backup_dir)))
        else:
            self.post_message(Planned(versions.plan_update(hv, name, backup_dir=self.backup_dir)))

    def action_delete(self) -> None:
        info = self.selected
        if info is None:
            self.notify("select a domain first", severity="warning")
            return
        if self._begin():
            self._plan_remove(self.hypervisor(info.host), info.name)

    def action_detach(self) -> None:
        info = self.selected
        if info is None:
            self.notify("select a clone first", severity="warning")
            return
        if self._begin():
            self._plan_detach(self.hypervisor(info.host), info.name)

    # -- workers ----------------------------------------------------------------------------

    def _progress(self) -> Progress:
        def report(text: str, fraction: float | None) -> None:
            self.post_message(TemplateProgress(text, fraction))

        return report

    @work(thread=True, exit_on_error=False, group="templates-op", description="sysprep ops")
    def _sysprep_operations(self, host: str, vm: str, running: bool) -> None:
        note = ""
        try:
            # virt-sysprep where the images are: here, or on the hypervisor over ssh
            ops = templates.sysprep_for(self.hypervisor(host)).operations()
        except VirtdeckError as err:
            ops, note = {}, f"cannot seal: {err}"
        self.post_message(OperationsLoaded(host, vm, running, ops, note))

    def on_operations_loaded(self, message: OperationsLoaded) -> None:
        self._ask(
            MakeTemplateScreen(
                message.vm, running=message.running, operations=message.operations,
                note=message.note,
            ),
            lambda request: self._plan_template(
                self.hypervisor(message.host), message.vm, request
            ),
        )  # fmt: skip

    @work(thread=True, exit_on_error=False, group="templates-op", description="template plan")
    def _plan_template(self, hv: Hypervisor, vm: str, request: TemplateRequest) -> None:
        plan = templates.plan_template(
            hv,
            vm,
            name=request.name,
            seal=request.seal,
            operations=request.operations,
            undefine=request.undefine,
            force=request.force,
            backup_dir=self.backup_dir,
        )
        self.post_message(Planned(plan))

    @work(thread=True, exit_on_error=False, group="templates-op", description="clone plan")
    def _plan_clone(self, hv: Hypervisor, template: str, request: DeployRequest) -> None:
        plan = clones.plan_clone(
            hv,
            template,
            request.name,
            full=request.full,
            count=request.count,
            start=request.start,
            allow_unsealed=request.allow_unsealed,
            backup_dir=self.backup_dir,
            identity=request.identity,
        )
        self.post_message(Planned(plan))

    @work(thread=True, exit_on_error=False, group="templates-op", description="copy plan")
    def _plan_copy(self, source: Hypervisor, target: Hypervisor, template: str) -> None:
        from tui.core import transfer

        plan = transfer.plan_template_copy(source, target, template, backup_dir=self.backup_dir)
        self.post_message(Planned(plan))

    @work(thread=True, exit_on_error=False, group="templates-op", description="import plan")
    def _plan_import(self, request: ImportRequest) -> None:
        from tui.core import cloudimage

        plan = cloudimage.plan_import(
            self.hypervisor(request.host), request.source, request.name,
            directory=request.directory, checksum=request.checksum, backup_dir=self.backup_dir,
        )  # fmt: skip
        self.post_message(Planned(plan))

    @work(thread=True, exit_on_error=False, group="templates-op", description="remove plan")
    def _plan_remove(self, hv: Hypervisor, name: str) -> None:
        # Planned with storage so the modal can list the files; the box decides.
        plan = clones.plan_remove(
            hv, name, storage=True, backup_dir=self.backup_dir, others=self.session.hypervisors
        )
        self.post_message(Planned(replace(plan, ask=True)))

    @work(thread=True, exit_on_error=False, group="templates-op", description="detach plan")
    def _plan_detach(self, hv: Hypervisor, name: str) -> None:
        from tui.core import detach

        self.post_message(Planned(detach.plan_detach(hv, name)))

    def on_planned(self, message: Planned) -> None:
        self.confirm_plan(message.plan)

    def plan_progress(self) -> Progress:
        return self._progress()

    def plan_cancelled(self) -> None:
        self._idle()

    def on_template_progress(self, message: TemplateProgress) -> None:
        self.add_class("busy")
        bar = self.query_one("#tpl-progress", ProgressBar)
        if message.fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=1.0, progress=message.fraction)
        self._status(message.text)

    def on_plan_done(self, message: PlanDone) -> None:
        self._idle()
        self.notify(message.text, title="templates")
        self.load()
        self.post_message(RefreshRequested())
