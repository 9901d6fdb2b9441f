"""The Disk usage pane: thin clones against full copies per template, the selected domain's
backing chains, and host totals; live, refreshed after every inventory refresh.

The measuring runs in one thread worker at a time (group "usage"): an inventory refresh that
arrives while one runs marks the pane stale and a new measure starts as soon as it finishes, so
refreshes never overlap and the last one always wins. The worker only reads and posts a
UsageReady message; the widgets are updated here, on the UI thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker, WorkerState

from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo
from tui.core.session import Session
from tui.core.units import size, total
from tui.core.usage import TemplateUsage, UsageCollector, UsageReport
from tui.widgets.base import Pane

BAR_WIDTH = 32


def bar(value: int | None, scale: int, style: str, width: int = BAR_WIDTH) -> str:
    if value is None:  # unknown: no bar at all, never an empty (zero) one
        return f"[$text-disabled]{'?' * width}[/]"
    filled = 0 if scale <= 0 else round(width * min(value, scale) / scale)
    if value > 0 and filled == 0:
        filled = 1  # a clone that wrote something is never an empty bar
    return f"[{style}]{'█' * filled}[/][$text-disabled]{'░' * (width - filled)}[/]"


def template_markup(t: TemplateUsage) -> list[str]:
    """Side-by-side bars: what the thin clones use, what full copies would use, the saving."""
    scale = max(t.full_equivalent_bytes or 0, t.thin_bytes or 0, t.full_bytes or 0, 1)
    undefined = " [$text-muted](undefined; known from its clones)[/]" if not t.defined else ""
    pct = (
        f"  {t.saved_bytes / t.full_equivalent_bytes:.0%}"
        if t.full_equivalent_bytes and t.saved_bytes is not None
        else ""
    )
    thin_n, full_n = len(t.thin_domains), len(t.full_domains)
    lines = [
        f"[b]{escape(t.name)}[/b]{undefined}  [$text-muted]base {escape(t.base or '?')} "
        f"{size(t.base_bytes)}, shared[/]",
        f"  {'thin clones (' + str(thin_n) + ')':<18} {bar(t.thin_bytes, scale, '$success')} "
        f"{size(t.thin_bytes):>10}",
        f"  {'as full copies':<18} {bar(t.full_equivalent_bytes, scale, '$warning')} "
        f"{size(t.full_equivalent_bytes):>10}",
        f"  {'saved':<18} {bar(t.saved_bytes, scale, '$accent')} {size(t.saved_bytes):>10}{pct}",
    ]
    if full_n:
        lines.append(
            f"  {'full clones (' + str(full_n) + ')':<18} {bar(t.full_bytes, scale, '$error')} "
            f"{size(t.full_bytes):>10}"
        )
    return lines


def chain_markup(report: UsageReport, name: str) -> list[str]:
    dom = report.domain(name)
    if dom is None:
        return [f"[$text-muted]{escape(name)}: not measured yet[/]"]
    if not dom.disks:
        return [f"[b]{escape(name)}[/b] [$text-muted]has no disk images[/]"]
    lines = [
        f"[b]{escape(name)}[/b]  owns {size(dom.owned_bytes)}, shares {size(dom.shared_bytes)}"
    ]
    for disk in dom.disks:
        lines.append(f"  [b]{escape(disk.target)}[/b]")
        for depth, path in enumerate(disk.chain):
            img = report.image(path)
            users = report.users(path)
            prefix = "    " + ("   " * (depth - 1) + "└─ " if depth else "")
            if img is None:
                lines.append(f"{prefix}{escape(path)}")
                continue
            who = "owned" if len(users) <= 1 else f"shared by {len(users)}"
            source = "" if img.source == "file" else f" [$text-muted]via {img.source}[/]"
            lines.append(
                f"{prefix}{escape(path)}  {img.format or '?'}  "
                f"{size(img.actual_bytes)} of {size(img.virtual_bytes)}  ({who}){source}"
            )
    return lines


@dataclass
class UsageReady(Message):
    """A measure finished: one report per host, one line per host that could not be read."""

    reports: dict[str, UsageReport]
    failures: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, UsageReady)


class UsagePane(Pane):
    DEFAULT_CSS = """
    UsagePane { height: 1fr; }
    UsagePane VerticalScroll { height: 1fr; padding: 0 1; }
    UsagePane .usage-section { height: auto; margin-bottom: 1; }
    UsagePane #usage-totals { color: $text-muted; }
    """

    SCREEN_BINDINGS: ClassVar[list[BindingType]] = [
        Binding("u", "pane('usage', 'refresh')", "Refresh usage", id="usage.refresh"),
    ]

    def __init__(
        self, session: Session, *, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(session, id=id, classes=classes)
        self.reports: dict[str, UsageReport] = {}
        self.failures: dict[str, str] = {}
        self.selected: DomainInfo | None = None
        self.measures = 0  # finished measures (tests wait on it)
        self.last_elapsed = 0.0
        self._domains: list[DomainInfo] = []
        self._collectors: dict[str, UsageCollector] = {}
        self._measuring = False
        self._stale = False
        self._behind = False  # an inventory arrived while the tab was hidden

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("measuring disk usage…", id="usage-templates", classes="usage-section")
            yield Static("", id="usage-chain", classes="usage-section")
            yield Static("", id="usage-totals", classes="usage-section")

    def on_mount(self) -> None:
        # The first inventory may have arrived before this pane was mounted.
        if self.session.domains and not self._domains:
            self.inventory_changed(list(self.session.domains))

    # -- the Pane contract ------------------------------------------------------------------

    def inventory_changed(self, domains: list[DomainInfo]) -> None:
        self._domains = domains
        if self.showing or (not self.measures and not self._measuring):
            self.measure()  # the first inventory is measured wherever the pane is
        else:
            self._behind = True  # measured when its tab is shown (or `u`)

    def pane_shown(self) -> None:
        if self._behind:
            self.measure()

    def domain_selected(self, info: DomainInfo | None) -> None:
        self.selected = info
        self._render_chain()

    def action_refresh(self) -> None:
        self.measure()

    # -- measuring --------------------------------------------------------------------------

    def measure(self) -> None:
        """Start a measure, or mark one to follow the one running (never two at once)."""
        if self._measuring:
            self._stale = True
            return
        lost = self.session.lost
        jobs = [
            (self._collector(hv), [d for d in self._domains if d.host == hv.uri])
            for hv in self._hypervisors()
            if hv.uri not in lost
        ]
        self._measuring = True
        self._stale = False
        self._behind = False
        self._measure(jobs)

    def _hypervisors(self) -> Iterable[Hypervisor]:
        return list(self.session.hypervisors)

    def _collector(self, hv: Hypervisor) -> UsageCollector:
        collector = self._collectors.get(hv.uri)
        if collector is None or collector.hv is not hv:
            collector = self._collectors[hv.uri] = UsageCollector(hv)
        return collector

    @work(thread=True, exit_on_error=False, group="usage", description="measuring disk usage")
    def _measure(self, jobs: list[tuple[UsageCollector, list[DomainInfo] | None]]) -> None:
        started = time.perf_counter()
        reports: dict[str, UsageReport] = {}
        failures: dict[str, str] = {}
        for collector, domains in jobs:
            try:
                reports[collector.hv.uri] = collector.report(domains)
            except VirtdeckError as err:
                # The inventory already tells the operator about a lost host; no second toast.
                failures[collector.hv.uri] = str(err)
        self.post_message(UsageReady(reports, failures, time.perf_counter() - started))

    def on_usage_ready(self, message: UsageReady) -> None:
        self._measuring = False
        self.reports = message.reports
        self.failures = message.failures
        self.last_elapsed = message.elapsed
        self.measures += 1
        self._render_all()
        if self._stale:
            self.measure()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Pane's own handler (the error funnel) runs too: Textual calls each class's handler.
        if event.worker.group == "usage" and event.state in (
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            self._measuring = False

    # -- drawing ----------------------------------------------------------------------------

    def _render_all(self) -> None:
        multi = len(self.reports) + len(self.failures) > 1
        lines: list[str] = []
        for host, report in self.reports.items():
            if multi:
                lines.append(f"[b $accent]{escape(host)}[/]")
            for t in report.templates:
                lines += template_markup(t)
            if not report.templates:
                lines.append("[$text-muted]no templates on this host[/]")
        self._show("#usage-templates", "\n".join(lines))
        totals = []
        for host, report in self.reports.items():
            saved = total(t.saved_bytes for t in report.templates)
            totals.append(
                f"[b]{escape(host)}[/b]: {len(report.images)} images, "
                f"{size(report.total_actual_bytes)} on disk (shared bases counted once); "
                f"thin clones save {size(saved)}"
            )
            totals += [f"[$warning]{escape(p)}[/]" for p in report.problems[:5]]
        totals += [f"[$error]{escape(h)}: {escape(why)}[/]" for h, why in self.failures.items()]
        totals.append(f"measured in {self.last_elapsed * 1000:.0f} ms")
        self._show("#usage-totals", "\n".join(totals))
        self._render_chain()

    def _render_chain(self) -> None:
        info = self.selected
        if info is None:
            text = "[$text-muted]select a domain to see its backing chains[/]"
        elif info.host not in self.reports:
            text = f"[$text-muted]{escape(info.name)}: not measured yet[/]"
        else:
            text = "\n".join(chain_markup(self.reports[info.host], info.name))
        self._show("#usage-chain", text)

    def _show(self, selector: str, markup: str) -> None:
        # Messages can still arrive while the app shuts down and the children are gone.
        static = self.query_one_optional(selector, Static)
        if static is not None:
            static.update(markup)
