"""Messages that carry worker results and libvirt events to the UI thread."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from tui.core.models import DomainEvent, DomainInfo, HostInfo


@dataclass
class InventoryLoaded(Message):
    """A refresh finished: every reachable host's domains, and one line per unreachable host."""

    domains: list[DomainInfo]
    failures: dict[str, str]


@dataclass
class HostsLoaded(Message):
    hosts: list[HostInfo]


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
