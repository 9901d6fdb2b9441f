"""The command palette over everything: any action on any domain, template or snapshot of any
connected host, found by typing ("rollback web-1", "deploy template-web", "revert db to
pre-migration"), not only the selected row's.

Each command says what it acts on, so choosing one first puts the cursor on that domain (or
template) and then runs the same action its key runs: the confirmation, the checks and the
messages are the ones the keys give. Snapshot names are read when the palette opens, from every
host that answers within `INDEX_DEADLINE` (a host that does not is left out, not waited on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from textual.binding import Binding
from textual.command import Hit, Hits, Provider

from tui.core import snapshots
from tui.core.fleet import on_each
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo, DomainState

if TYPE_CHECKING:
    from tui.screens.main import MainScreen

INDEX_DEADLINE = 2.0  # seconds the palette waits for a host's snapshot names

# Which domain keys make sense in which state (a command that can only be refused is not offered).
_WHEN: dict[str, Callable[[DomainInfo], bool]] = {
    "domain.start": lambda d: not d.state.active and not d.is_template,
    "domain.shutdown": lambda d: d.state.active,
    "domain.force_off": lambda d: d.state.active,
    "domain.reboot": lambda d: d.state is DomainState.RUNNING,
    "domain.pause": lambda d: d.state.active,
    "domain.console": lambda d: d.state.active,
    "domain.ssh": lambda d: d.state.active,
    "domain.details": lambda d: True,
    "domain.migrate": lambda d: not d.state.active and not d.is_template,
    "snapshot.new": lambda d: not d.is_template,
    "snapshot.rollback": lambda d: not d.is_template,
    "template.make": lambda d: not d.is_template,
    "template.delete": lambda d: True,
    "template.detach": lambda d: d.meta.role == "clone" and d.meta.mode == "thin",
    # a template's next version (tui.core.versions), or sealing its edit VM into it
    "template.version": lambda d: d.is_template or d.name.endswith("-edit"),
}


@dataclass(frozen=True)
class Entry:
    """One palette command: its text (what is matched), its help line, what it runs."""

    text: str
    help: str
    run: Callable[[], Awaitable[None]]


def short_host(uri: str) -> str:
    """A host's name for a command's text: the URI's host part, else the URI."""
    return urlparse(uri).hostname or uri


def domain_entries(screen: MainScreen, domains: list[DomainInfo], multi: bool) -> Iterator[Entry]:
    for binding in screen.BINDINGS:
        assert isinstance(binding, Binding)
        when = _WHEN.get(binding.id or "")
        if when is None:
            continue
        action = binding.action.replace("pane(", "pane_anywhere(", 1)
        for d in domains:
            if not when(d):
                continue
            verb = binding.description
            if binding.id == "domain.pause" and d.state is DomainState.PAUSED:
                verb = "Resume"
            where = f" on {short_host(d.host)}" if multi else ""
            yield Entry(
                f"{verb} {d.name}{where}",
                f"{d.state.value} on {d.host} · key {binding.key}",
                partial(screen.act_on_domain, d.host, d.name, action),
            )


def template_entries(screen: MainScreen, multi: bool) -> Iterator[Entry]:
    yield Entry(
        "Import a cloud image as a template",
        "a file or an http(s) URL, checked, made a sealed template giving cloud-init seeds · key I",
        screen.import_image,
    )
    for t in screen.templates():
        where = f" on {short_host(t.host)}" if multi else ""
        sealed = "sealed" if t.sealed else "not sealed"
        yield Entry(
            f"Deploy {t.name}{where}",
            f"thin or full clones of template {t.name} ({sealed}) on {t.host}",
            partial(screen.deploy_template, t.host, t.name, t.sealed, t.identity == "cloud-init"),
        )
        if multi:
            yield Entry(
                f"Copy template {t.name}{where} to another host",
                f"template {t.name} from {t.host}: the plan names the target host",
                partial(screen.copy_template, t.host, t.name),
            )


def snapshot_entries(
    screen: MainScreen, index: dict[str, dict[str, tuple[str, ...]]], multi: bool
) -> Iterator[Entry]:
    for host, by_domain in index.items():
        where = f" on {short_host(host)}" if multi else ""
        for domain, names in by_domain.items():
            for name in names:
                yield Entry(
                    f"Revert {domain}{where} to {name}",
                    f"snapshot {name} of {domain} on {host}: the current state is lost",
                    partial(screen.snapshot_action, host, domain, "revert", name),
                )
                yield Entry(
                    f"Delete snapshot {name} of {domain}{where}",
                    f"snapshot {name} of {domain} on {host}: its data merges into what follows",
                    partial(screen.snapshot_action, host, domain, "delete", name),
                )


class EverythingCommands(Provider):
    """Every domain's, template's and snapshot's actions on every host (see the module doc)."""

    entries: list[Entry]

    async def startup(self) -> None:
        self.entries = []
        from tui.screens.main import MainScreen

        screen = self.screen
        if not isinstance(screen, MainScreen):
            return
        hypervisors = screen.answering_hypervisors()
        index = await asyncio.to_thread(snapshot_index, hypervisors)
        domains = screen.all_domains()
        multi = len(screen.hosts()) > 1
        self.entries = [
            *domain_entries(screen, domains, multi),
            *template_entries(screen, multi),
            *snapshot_entries(screen, index, multi),
        ]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for entry in self.entries:
            score = matcher.match(entry.text)
            if score > 0:
                yield Hit(score, matcher.highlight(entry.text), entry.run, help=entry.help)


def snapshot_index(hypervisors: list[Hypervisor]) -> dict[str, dict[str, tuple[str, ...]]]:
    """Host -> domain -> snapshot names, from the hosts that answer within INDEX_DEADLINE."""
    result = on_each(hypervisors, snapshots.snapshot_names, timeout=INDEX_DEADLINE)
    return {uri: names for uri, names in result.answers.items() if names}
