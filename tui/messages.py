"""Messages that carry worker results and libvirt events to the UI thread."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from tui.core.models import DomainEvent, DomainInfo, HostInfo


@dataclass
class HostLoaded(Message):
    """One host's refresh finished: its domains, or why there are none (`error`); `info` when
    its versions were read too (first connect, reconnect)."""

    host: str
    domains: list[DomainInfo] | None
    error: str | None
    info: HostInfo | None = None


class LibvirtEvent(Message):
    """A libvirt event (posted from libvirt's event thread)."""

    def __init__(self, event: DomainEvent) -> None:
        super().__init__()
        self.event = event


@dataclass
class ShutdownTimedOut(Message):
    host: str
    name: str
    timeout: float


@dataclass
class RefreshRequested(Message):
    """A screen or pane changed something: refresh every host's inventory (or `host`'s).
    Safe to post from a worker thread."""

    host: str | None = None


@dataclass
class LifecycleRequested(Message):
    """Start, shut down, reboot, pause, resume or destroy a domain (the App runs it)."""

    host: str
    name: str
    action: str


@dataclass
class ErrorReported(Message):
    """A worker of a screen or pane failed: the App's one error funnel shows it."""

    error: BaseException


class HostsViewChanged(Message):
    """The header's host list was folded or unfolded: draw it again."""
