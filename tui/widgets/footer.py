"""Textual's footer, rebuilt only when the keys it shows change.

Textual's `Footer` recomposes (about 30 new `FooterKey` widgets, their styles and layout) every
time the active bindings change, and they change whenever focus moves: `/` into the filter box
and `Esc` back to the table each cost 150–250 ms of CPU at 3000 rows (benchmarks/bench_filter.py).
This footer compares what it would show (key, label, enabled) and recomposes only on a change,
and not at all while it is hidden (the filter box takes its line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.widgets import Footer

if TYPE_CHECKING:
    from textual.screen import Screen

Shown = tuple[tuple[str, str, str, bool, str], ...]


def shown_keys(screen: Screen, palette_binding: str) -> Shown:
    """What a footer on `screen` shows: each visible binding's key, action, label, whether it
    is enabled and its tooltip, in order, plus the command palette's binding."""
    return tuple(
        (binding.key, binding.action, binding.description, enabled, tooltip)
        for key, (_node, binding, enabled, tooltip) in screen.active_bindings.items()
        if binding.show or key == palette_binding
    )


class KeysFooter(Footer):
    """A `Footer` that skips the rebuild when the keys it shows did not change."""

    _shown: Shown | None = None

    def bindings_changed(self, screen: Screen) -> None:
        if not self.display and self._bindings_ready:
            return  # hidden (the filter box has the line): brought up to date by `show`
        if not screen.app.app_focus or not self.is_attached or screen is not self.screen:
            super().bindings_changed(screen)  # not shown now: Textual's own bookkeeping only
            return
        shown = shown_keys(screen, self.app.COMMAND_PALETTE_BINDING)
        if shown == self._shown and self._bindings_ready:
            return
        self._shown = shown
        super().bindings_changed(screen)

    def show(self, shown: bool) -> None:
        """Show or hide the footer; shown again, it catches up with the keys only if they
        differ from those it last showed (the filter box hides it: `/` and `Esc`)."""
        self.display = shown
        if shown and self.is_attached:  # in the footer's own context (data_bind needs it)
            self.call_later(self.bindings_changed, self.screen)
