"""The domains table: one row per domain of every host, updated in place, sortable, filterable.

Rows can be marked (a group: tui.core.groups): the first column shows the mark; marks are kept
by row key (host|uuid) across refreshes, sorting and filtering, and dropped with their domain.
Every change of the marks posts `DomainsTable.MarksChanged` (the screen shows "N selected").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import humanize
from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from tui.core.groups import clones_of, matching
from tui.core.models import DomainInfo, DomainState

MARK = "●"

_STATE_STYLE = {
    DomainState.RUNNING: "bold green",
    DomainState.PAUSED: "yellow",
    DomainState.SHUTDOWN: "yellow",
    DomainState.CRASHED: "bold red",
    DomainState.PMSUSPENDED: "yellow",
}

SORT_KEYS: dict[str, Callable[[DomainInfo], Any]] = {
    "name": lambda d: d.name.lower(),
    "state": lambda d: d.state.value,
    "vcpus": lambda d: d.vcpus,
    "memory": lambda d: d.memory_bytes,
    "cpu": lambda d: d.cpu_percent or 0.0,
    "disk": lambda d: d.disk_allocation_bytes or 0,
    "host": lambda d: d.host,
}


def row_key(d: DomainInfo) -> str:
    return f"{d.host}|{d.uuid}"


def _size(n: int | None) -> str:
    return "-" if n is None else humanize.naturalsize(n, binary=True, format="%.1f")


class DomainsTable(DataTable[Any]):
    """Rows keyed by host|uuid; cells rewritten only when their text changes."""

    @dataclass
    class MarksChanged(Message):
        """The marked rows changed; `count` of them are marked now."""

        count: int

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.domains: dict[str, DomainInfo] = {}
        self.filter_text = ""
        self.sort_column = "name"
        self.sort_reverse = False
        self.show_host = False
        self.stale: dict[str, str] = {}  # host -> "no answer for N s": its rows are greyed
        self._order: list[str] = []
        self.marked: set[str] = set()  # row keys
        self._add_columns()

    def _add_columns(self) -> None:
        self.clear(columns=True)
        self.add_column(" ", key="mark")
        if self.show_host:
            self.add_column("Host", key="host")
        for label, key in (
            ("Name", "name"),
            ("State", "state"),
            ("vCPUs", "vcpus"),
            ("Memory", "memory"),
            ("CPU %", "cpu"),
            ("Disk", "disk"),
        ):
            self.add_column(label, key=key)
        self._order = []

    def set_multi_host(self, multi: bool) -> None:
        if multi != self.show_host:
            self.show_host = multi
            self._add_columns()
            self._render_rows()

    def _cells(self, d: DomainInfo) -> list[Any]:
        note = self.stale.get(d.host)
        if note is not None:  # last known values, greyed, with how long the host is silent
            cells = [Text(str(c), style="dim") for c in self._live_cells(d)]
            cells[2 + self.show_host] = Text(f"{d.state.value}? {note}", style="dim italic")
            return cells
        return self._live_cells(d)

    def _live_cells(self, d: DomainInfo) -> list[Any]:
        name = Text(d.name)
        if d.is_template:
            name.append(" [template]", style="italic cyan")
        elif d.meta.role == "clone":
            name.append(f" ({d.meta.mode or 'clone'})", style="dim")
        cells: list[Any] = [
            name,
            Text(d.state.value, style=_STATE_STYLE.get(d.state, "dim")),
            Text(str(d.vcpus), justify="right"),
            Text(_size(d.memory_bytes), justify="right"),
            Text("-" if d.cpu_percent is None else f"{d.cpu_percent:5.1f}", justify="right"),
            Text(_size(d.disk_allocation_bytes), justify="right"),
        ]
        if self.show_host:
            cells.insert(0, Text(d.host, style="dim"))
        mark = Text(MARK, style="bold cyan") if row_key(d) in self.marked else Text(" ")
        return [mark, *cells]

    def visible_domains(self) -> list[DomainInfo]:
        needle = self.filter_text.lower()
        rows = [
            d
            for d in self.domains.values()
            if not needle
            or needle in d.name.lower()
            or needle in d.state.value
            or needle in d.host.lower()
        ]
        rows.sort(key=SORT_KEYS[self.sort_column], reverse=self.sort_reverse)
        return rows

    def update_domains(
        self, domains: list[DomainInfo], stale: dict[str, str] | None = None
    ) -> None:
        self.domains = {row_key(d): d for d in domains}
        self.stale = dict(stale or {})
        gone = self.marked - self.domains.keys()
        self.marked -= gone
        self._render_rows()
        if gone:
            self.post_message(self.MarksChanged(len(self.marked)))

    def set_stale(self, stale: dict[str, str]) -> None:
        if stale != self.stale:
            self.stale = dict(stale)
            self._render_rows()

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self._render_rows()

    def sort_by(self, column: str) -> None:
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, False
        self._render_rows()

    def _render_rows(self) -> None:
        rows = self.visible_domains()
        keys = [row_key(d) for d in rows]
        if keys == self._order:
            for d in rows:
                key = row_key(d)
                for col, cell in zip(self.columns, self._cells(d), strict=True):
                    if str(self.get_cell(key, col)) != str(cell):
                        self.update_cell(key, col, cell, update_width=True)
            return
        selected = self.selected_key()
        self.clear()
        for d in rows:
            self.add_row(*self._cells(d), key=row_key(d))
        self._order = keys
        if selected in keys:
            self.move_cursor(row=keys.index(selected), animate=False)

    def selected_key(self) -> str | None:
        if not self._order or self.cursor_row < 0 or self.cursor_row >= len(self._order):
            return None
        return self._order[self.cursor_row]

    def selected(self) -> DomainInfo | None:
        key = self.selected_key()
        return self.domains.get(key) if key else None

    def select_name(self, name: str) -> bool:
        for i, key in enumerate(self._order):
            if self.domains[key].name == name:
                self.move_cursor(row=i, animate=False)
                return True
        return False

    def select_row(self, host: str, name: str) -> bool:
        """Put the cursor on a domain of a host; False when no visible row is that domain."""
        for i, key in enumerate(self._order):
            d = self.domains[key]
            if (d.host, d.name) == (host, name):
                self.move_cursor(row=i, animate=False)
                return True
        return False

    # -- marks (a group) --------------------------------------------------------------------

    def marked_domains(self) -> list[DomainInfo]:
        """The marked domains, in the table's order (marked rows a filter hides included)."""
        shown = {k: i for i, k in enumerate(self._order)}
        keys = sorted(self.marked, key=lambda k: (shown.get(k, len(shown)), k))
        return [self.domains[k] for k in keys if k in self.domains]

    def set_marks(self, keys: Iterable[str]) -> None:
        marked = {k for k in keys if k in self.domains}
        if marked != self.marked:
            self.marked = marked
            self._render_rows()
        self.post_message(self.MarksChanged(len(self.marked)))

    def toggle_mark(self) -> None:
        """Mark the cursor's row, or unmark it, and move to the next row."""
        key = self.selected_key()
        if key is None:
            return
        self.set_marks(self.marked ^ {key})
        if self.cursor_row < len(self._order) - 1:
            self.move_cursor(row=self.cursor_row + 1, animate=False)

    def extend_marks(self, step: int) -> None:
        """Mark the cursor's row and the next one up (-1) or down (+1), moving there."""
        key = self.selected_key()
        if key is None:
            return
        row = max(0, min(len(self._order) - 1, self.cursor_row + step))
        self.set_marks(self.marked | {key, self._order[row]})
        self.move_cursor(row=row, animate=False)

    def clear_marks(self) -> None:
        self.set_marks(())

    def mark_clones(self, template: str) -> int:
        """Mark the clones of `template` (adding to the marks); returns how many."""
        found = [row_key(d) for d in clones_of(self.domains.values(), template)]
        self.set_marks(self.marked | set(found))
        return len(found)

    def mark_matching(self, pattern: str) -> int:
        """Mark every domain whose name matches the glob (adding to the marks)."""
        found = [row_key(d) for d in matching(self.domains.values(), pattern)]
        self.set_marks(self.marked | set(found))
        return len(found)
