"""The domains table: one row per domain of every host, updated in place, sortable, filterable.

Nothing is rewritten that did not change: a host's refresh is compared row by row with what the
table holds; a changed domain rewrites only the cells whose text or style changed
(`cell_updates` counts them), unchanged ones cost a comparison of frozen values. Rows are
rebuilt only when the rows shown or their order change (a domain came or went, the filter, the
sort, a sort key moved); a rebuild reuses each row's cells and their measured widths, so
filtering or sorting 3000 rows does not render or measure 3000 rows again. A filter that
narrows the last one (`h17` → `h17-vm5`) filters the rows shown, already sorted.

Names sort naturally (vm5, vm6, …, vm50), then by host; with several hosts the Host column
sorts (groups) by host, and the filter matches host names too.

Rows can be marked (a group: tui.core.groups): the first column shows the mark; marks are kept
by row key (host|uuid) across refreshes, sorting and filtering, and dropped with their domain.
Every change of the marks posts `DomainsTable.MarksChanged` (the screen shows "N selected").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import humanize
from rich.cells import cell_len
from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import Row, RowKey

from tui.core.groups import clones_of, matching
from tui.core.models import DomainInfo, DomainState, natural_key
from tui.core.text import shortened

MARK = "●"

_STATE_STYLE = {
    DomainState.RUNNING: "bold green",
    DomainState.PAUSED: "yellow",
    DomainState.SHUTDOWN: "yellow",
    DomainState.CRASHED: "bold red",
    DomainState.PMSUSPENDED: "yellow",
}


def _by_name(d: DomainInfo) -> tuple[Any, ...]:
    return (natural_key(d.name), natural_key(d.host))


# Each column's own sort value; ties (and the Name column) go by the natural name, then host.
SORT_KEYS: dict[str, Callable[[DomainInfo], Any]] = {
    "name": lambda d: 0,
    "state": lambda d: d.state.value,
    "vcpus": lambda d: d.vcpus,
    "memory": lambda d: d.memory_bytes,
    "cpu": lambda d: d.cpu_percent or 0.0,
    "disk": lambda d: d.disk_allocation_bytes or 0,
    "host": lambda d: natural_key(d.host),
}


def row_key(d: DomainInfo) -> str:
    return f"{d.host}|{d.uuid}"


def _size(n: int | None) -> str:
    return "-" if n is None else humanize.naturalsize(n, binary=True, format="%.1f")


class DomainsTable(DataTable[Any]):
    """Rows keyed by host|uuid; cells rewritten only when their text or style changes."""

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
        self._row_of: dict[str, int] = {}  # row key -> index in _order
        self._keys_of: dict[str, set[str]] = {}  # host -> its row keys
        self._cell_cache: dict[str, list[Any]] = {}  # row key -> its cells as shown
        self._width_cache: dict[str, list[int]] = {}  # row key -> its cells' widths
        self._sort_cache: dict[tuple[str, str], Any] = {}  # (column, row key) -> sort key
        self.marked: set[str] = set()  # row keys
        self.cell_updates = 0  # cells rewritten in place (a test checks an idle poll adds none)
        self.rebuilds = 0  # whole-table rebuilds (rows shown or their order changed)
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
        self._row_of = {}
        self._cell_cache.clear()
        self._width_cache.clear()

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
            cells.insert(0, Text(shortened(d.host), style="dim"))
        mark = Text(MARK, style="bold cyan") if row_key(d) in self.marked else Text(" ")
        return [mark, *cells]

    def _cached_cells(self, key: str) -> list[Any]:
        cells = self._cell_cache.get(key)
        if cells is None:
            cells = self._cell_cache[key] = self._cells(self.domains[key])
            self._width_cache[key] = [cell_len(c.plain) for c in cells]
        return cells

    def _sort_key(self, key: str) -> Any:
        cached = self._sort_cache.get((self.sort_column, key))
        if cached is None:
            name = self._sort_cache.get(("", key))
            if name is None:  # the natural name, shared by every column's key
                name = self._sort_cache[("", key)] = _by_name(self.domains[key])
            cached = (SORT_KEYS[self.sort_column](self.domains[key]), name)
            self._sort_cache[(self.sort_column, key)] = cached
        return cached

    def _matches(self, d: DomainInfo, needle: str) -> bool:
        return (
            not needle
            or needle in d.name.lower()
            or needle in d.state.value
            or needle in d.host.lower()
        )

    def visible_domains(self) -> list[DomainInfo]:
        return [self.domains[k] for k in self._visible_keys()]

    def _visible_keys(self) -> list[str]:
        needle = self.filter_text.lower()
        keys = [k for k, d in self.domains.items() if self._matches(d, needle)]
        keys.sort(key=self._sort_key, reverse=self.sort_reverse)
        return keys

    def update_domains(
        self,
        domains: list[DomainInfo],
        stale: dict[str, str] | None = None,
        *,
        hosts: Iterable[str] | None = None,
    ) -> None:
        """The domains of `hosts` (None: of every host) are now `domains`: rows of unchanged
        domains are left alone, changed ones get the cells that changed."""
        fresh = {row_key(d): d for d in domains}
        if hosts is None:
            old_keys = set(self.domains)
            self._keys_of = {}
        else:
            old_keys = set().union(*(self._keys_of.get(h, set()) for h in hosts))
            for h in hosts:
                self._keys_of.pop(h, None)
        for key, d in fresh.items():
            self._keys_of.setdefault(d.host, set()).add(key)
        needle = self.filter_text.lower()
        reorder = False
        dirty: set[str] = set()
        for key in old_keys - fresh.keys():
            reorder = reorder or key in self._row_of
            self._forget(key)
            del self.domains[key]
        for key, d in fresh.items():
            old = self.domains.get(key)
            if old == d:
                continue
            self.domains[key] = d
            self._forget(key, cells=old is None)  # a changed row's cells: _rewrite compares
            if old is None:
                reorder = reorder or self._matches(d, needle)
                continue
            dirty.add(key)
            if self._matches(old, needle) != self._matches(d, needle):
                reorder = True
            elif key in self._row_of:
                old_sort = (SORT_KEYS[self.sort_column](old), _by_name(old))
                reorder = reorder or old_sort != self._sort_key(key)
        gone = self.marked - self.domains.keys()
        self.marked -= gone
        self._set_stale(stale or {}, dirty)
        if reorder:
            self._render_rows()
        self._rewrite(dirty)
        if gone:
            self.post_message(self.MarksChanged(len(self.marked)))

    def _forget(self, key: str, *, cells: bool = True) -> None:
        """Drop what was derived from a row's domain (its sort keys; its cells and widths)."""
        if cells:
            self._cell_cache.pop(key, None)
            self._width_cache.pop(key, None)
        for column in ("", *SORT_KEYS):
            self._sort_cache.pop((column, key), None)

    def _set_stale(self, stale: dict[str, str], dirty: set[str]) -> None:
        """Hosts whose note changed get their rows redrawn (added to `dirty`)."""
        if stale == self.stale:
            return
        for host in set(stale) | set(self.stale):
            if stale.get(host) != self.stale.get(host):
                dirty |= self._keys_of.get(host, set())
        self.stale = dict(stale)

    def set_stale(self, stale: dict[str, str]) -> None:
        dirty: set[str] = set()
        self._set_stale(stale, dirty)
        self._rewrite(dirty)

    def _rewrite(self, keys: Iterable[str]) -> None:
        """Rows `keys` drawn again: only the cells whose text or style changed are written."""
        columns = list(self.columns)
        for key in keys:
            old = self._cell_cache.pop(key, None)
            self._width_cache.pop(key, None)
            if key not in self.domains or key not in self._row_of:
                continue  # not shown: its cells are made when it is
            cells = self._cached_cells(key)
            for i, (col, cell) in enumerate(zip(columns, cells, strict=True)):
                if old is None or not _same(old[i], cell):
                    self.update_cell(key, col, cell, update_width=True)
                    self.cell_updates += 1

    def set_filter(self, text: str) -> None:
        old = self.filter_text.lower()
        self.filter_text = text
        needle = text.lower()
        if old and old in needle:  # narrower: the rows shown, already in order
            keys = [k for k in self._order if self._matches(self.domains[k], needle)]
            self._show_rows(keys)
        else:
            self._render_rows()

    def sort_by(self, column: str) -> None:
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, False
        self._render_rows()

    def _render_rows(self) -> None:
        self._show_rows(self._visible_keys())

    def _show_rows(self, keys: list[str]) -> None:
        if keys == self._order:
            return
        selected = self.selected_key()
        self.clear()
        self.rebuilds += 1
        self._add_rows(keys)
        self._order = keys
        self._row_of = {k: i for i, k in enumerate(keys)}
        if selected in self._row_of:
            self.move_cursor(row=self._row_of[selected], animate=False)

    def _add_rows(self, keys: list[str]) -> None:
        """DataTable.add_row for many one-line rows at once. add_row re-derives the column
        order, sets the cursor reactive and bumps the render caches per row (~35 µs a row
        here: 0.1 s for 3000); this does the same bookkeeping (textual 8's DataTable) once."""
        if not keys:
            return
        columns = [c.key for c in self.ordered_columns]
        for key in keys:
            rk = RowKey(key)
            self._row_locations[rk] = len(self.rows)
            self._data[rk] = dict(zip(columns, self._cached_cells(key), strict=True))
            self.rows[rk] = Row(rk, 1, None, False)
            self._new_rows.add(rk)
        self._require_update_dimensions = True
        self._update_count += 1
        self.cursor_coordinate = self.cursor_coordinate
        if self.row_count == len(keys) and self.columns and self.show_cursor:
            self._highlight_cursor()  # as add_row does for the first row
        self.check_idle()

    @property
    def _y_offsets(self) -> list[tuple[RowKey, int]]:
        # DataTable builds one small list per row for this (every row here is one line).
        offsets: list[tuple[RowKey, int]] | None = self._offset_cache.get(self._update_count)
        if offsets is None:
            offsets = [(row.key, 0) for row in self.ordered_rows]
            self._offset_cache[self._update_count] = offsets
        return offsets

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        # DataTable measures every cell of every new row (rich's measure of each Text) on
        # the next idle: 3000 rows x 8 cells after each rebuild. Our rows' widths are known
        # (kept with their cells), so only other rows are left to the base class.
        others = []
        columns = self.ordered_columns
        for row in new_rows:
            widths = self._width_cache.get(str(row.value))
            if widths is None or len(widths) != len(columns):
                others.append(row)
                continue
            for column, width in zip(columns, widths, strict=True):
                if width > column.content_width:
                    column.content_width = width
        super()._update_dimensions(others)

    def shows_running(self, host: str, *, measured: bool = True) -> bool:
        """Is a running domain of `host` among the rows shown (with `measured`: one whose
        CPU % is known, i.e. moves)?"""
        row_of, domains = self._row_of, self.domains
        return any(
            k in row_of
            and domains[k].state is DomainState.RUNNING
            and (not measured or domains[k].cpu_percent is not None)
            for k in self._keys_of.get(host, ())
        )

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
            changed = marked ^ self.marked
            self.marked = marked
            self._rewrite(changed)
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


def _same(a: Any, b: Any) -> bool:
    """Two cells draw the same (Text's own == ignores the base style: a greyed row)."""
    if isinstance(a, Text) and isinstance(b, Text):
        return (a.plain, str(a.style), a.justify, a.spans) == (
            b.plain,
            str(b.style),
            b.justify,
            b.spans,
        )
    return bool(a == b)
