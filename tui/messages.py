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
