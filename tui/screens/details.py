"""The details view of one domain: interfaces and their addresses (with where each was
learnt), graphics with the `ssh -L` line that reaches them, consoles, disks by kind.

It is given the domain's Hypervisor (a Textual-free session) and reads in a worker; `r`
reads again (the guest agent may answer a few seconds after boot). `C` and `S` hand the
terminal to `virsh console` / `ssh` (see tui.screens.terminal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, Static
from textual.worker import Worker, WorkerState

from tui.core.details import DomainDetails, read_details
from tui.core.hypervisor import Hypervisor
from tui.screens.terminal import AttachReady, hand_over, prepare
from tui.widgets.footer import KeysFooter


@dataclass
class DetailsLoaded(Message):
    details: DomainDetails


class DetailsScreen(Screen[None]):
    DEFAULT_CSS = """
    DetailsScreen #details-body { padding: 0 1; }
    DetailsScreen #details { height: auto; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,i", "close", "Back", id="details.close"),
        Binding("r", "reload", "Refresh", id="details.reload"),
        Binding("C", "attach('console')", "Console", id="details.console"),
        Binding("S", "attach('ssh')", "SSH", id="details.ssh"),
    ]

    def __init__(self, hv: Hypervisor, name: str, *, ssh_user: str = "root") -> None:
        super().__init__()
        self.hv = hv
        self.domain_name = name
        self.ssh_user = ssh_user
        self.details: DomainDetails | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="details-body"):
            yield Static(f"reading {self.domain_name}…", id="details")
        yield KeysFooter()

    def on_mount(self) -> None:
        self.sub_title = f"{self.domain_name} on {self.hv.uri}"
        self.load()

    @work(thread=True, group="details", exclusive=True, exit_on_error=False)
    def load(self) -> None:
        self.post_message(DetailsLoaded(read_details(self.hv, self.domain_name)))

    def on_details_loaded(self, message: DetailsLoaded) -> None:
        self.details = message.details
        self.query_one("#details", Static).update(render(message.details))

    def action_close(self) -> None:
        self.dismiss(None)

    def action_reload(self) -> None:
        self.load()

    def action_attach(self, what: str) -> None:
        self.attach(what)

    @work(thread=True, group="attach", exclusive=True, exit_on_error=False)
    def attach(self, what: str) -> None:
        self.post_message(prepare(self.hv, self.domain_name, what, self.ssh_user))

    @on(AttachReady)
    def _attach_ready(self, message: AttachReady) -> None:
        hand_over(self.app, message)
        self.load()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        error = event.worker.error
        if event.state is WorkerState.ERROR and error is not None:
            if event.worker.group == "details":
                self.query_one("#details", Static).update(Text(str(error), style="bold red"))
            self.notify(str(error), title="virtdeck", severity="error", timeout=8)


def render(d: DomainDetails) -> RenderableType:
    """The details as Rich renderables (also used by the screenshot script)."""
    parts: list[RenderableType] = [
        Text.assemble((d.name, "bold"), "  ", (d.state.value, "bold"), f"  on {d.host}"),
        Text(""),
    ]
    parts += _network(d)
    parts += _graphics_and_console(d)
    parts += _disks_and_operations(d)
    return Group(*parts)


def _network(d: DomainDetails) -> list[RenderableType]:
    nics = Table(title="Interfaces", title_justify="left", expand=True, box=None)
    for col in ("MAC", "Type", "Network / bridge", "Model", "Host dev", "Guest", "Addresses"):
        nics.add_column(col, no_wrap=col != "Addresses")
    for i in d.interfaces:
        addrs = Text()
        for a in i.addresses:
            if addrs:
                addrs.append("\n")
            addrs.append(str(a), style="bold" if a.usable else "dim")
            addrs.append(f"  {a.source}", style="cyan")
        nics.add_row(
            i.mac or "-",
            i.type,
            i.source or "-",
            i.model or "-",
            i.target or "-",
            i.guest_name or "-",
            addrs if addrs else Text("-", style="dim"),
        )
    sources = Text("Address sources: ", style="bold")
    for s in d.sources:
        sources.append(f"\n  {s.source}: ")
        sources.append("ok" if s.ok else s.reason, style="green" if s.ok else "dim")
    first = d.first_address
    ssh = (
        Text.assemble("ssh (S): ", (first.address, "bold"), f" (from {first.source})")
        if first
        else Text(f"ssh (S): {d.ssh_refusal()}", style="dim")
    )
    nic_part = nics if d.interfaces else Text("Interfaces: none", style="bold")
    return [nic_part, sources, ssh, Text("")]


def _graphics_and_console(d: DomainDetails) -> list[RenderableType]:
    gfx = Table(title="Graphics", title_justify="left", expand=True, box=None)
    for col in ("Type", "Listen", "Port", "Reach it from your machine"):
        gfx.add_column(col)
    for g in d.graphics:
        port = str(g.port or "-") + (f" (tls {g.tls_port})" if g.tls_port else "")
        gfx.add_row(
            g.type,
            g.socket or g.listen or "*",
            port + (" auto" if g.autoport else ""),
            Text(g.tunnel, style="bold") if g.tunnel else Text(g.reason, style="dim"),
        )
    con = Text("Console", style="bold")
    for c in d.consoles:
        con.append(f"\n  {c.kind}  {c.type}  {c.target or ''}  {c.path or ''}", style="")
    why = d.console_refusal()
    con.append("\n  ")
    if why:
        con.append(why, style="dim")
    else:
        con.append("C attaches here (Ctrl-] returns)", style="green")
    gfx_part = gfx if d.graphics else Text("Graphics: none", style="bold")
    return [gfx_part, Text(""), con, Text("")]


def _disks_and_operations(d: DomainDetails) -> list[RenderableType]:
    disks = Table(title="Disks", title_justify="left", expand=True, box=None)
    for col in ("Target", "Device", "Kind", "Format", "Source"):
        disks.add_column(col)
    for disk in d.disks:
        disks.add_row(
            disk.target,
            disk.device + (" ro" if disk.readonly else ""),
            disk.kind.value,
            disk.format or "-",
            disk.source or "-",
        )
    ops = Table(title="Recent operations", title_justify="left", expand=True, box=None)
    for col in ("Time", "User", "Operation", "Result", "Took"):
        ops.add_column(col, no_wrap=col not in ("Operation", "Result"))
    for r in d.operations:
        result = Text(r.result, style="green" if r.result == "ok" else "bold red")
        if r.error:
            result.append(f"  {r.error}", style="dim")
        ops.add_row(
            r.time.replace("T", " ")[:19], r.user, r.operation, result, f"{r.duration:.1f}s"
        )
    return [
        disks if d.disks else Text("Disks: none", style="bold"),
        Text(""),
        ops if d.operations else Text("Recent operations: none", style="bold"),
    ]
