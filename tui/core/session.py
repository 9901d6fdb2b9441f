"""What the dashboard's screens and panes know of the fleet, without Textual.

The App owns one Session and keeps it current: the hosts it was given, the settings, the
last inventory (for a pane mounted after it came), which hosts are not answering now and
whether any host has answered yet. Screens and panes get it passed in and only read it; they
ask the App for changes with messages (tui.messages: RefreshRequested, LifecycleRequested,
ErrorReported), so nothing under tui/screens, tui/widgets or tui/modals imports the App.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo
from tui.core.settings import Settings


def _nobody() -> set[str]:
    return set()


def _never() -> bool:
    return False


@dataclass(eq=False)
class Session:
    hypervisors: list[Hypervisor]
    settings: Settings = field(default_factory=Settings)
    domains: list[DomainInfo] = field(default_factory=list)
    not_answering: Callable[[], set[str]] = _nobody  # the App's view of its hosts, read now
    has_answered: Callable[[], bool] = _never  # some host has answered at least once

    @property
    def lost(self) -> set[str]:
        """Hosts not answering now: lost, unreachable, or silent past their deadline."""
        return self.not_answering()

    @property
    def answering(self) -> list[Hypervisor]:
        lost = self.lost
        return [hv for hv in self.hypervisors if hv.uri not in lost]

    @property
    def uris(self) -> list[str]:
        return [hv.uri for hv in self.hypervisors]

    def hypervisor(self, host: str) -> Hypervisor:
        for hv in self.hypervisors:
            if hv.uri == host:
                return hv
        raise VirtdeckError(f"not connected to {host}")
