"""The progress callback every long operation takes (the TUI posts a message, the CLI prints)."""

from __future__ import annotations

from collections.abc import Callable

#: progress(message, fraction): fraction in 0..1, or None when the step has no measurable size.
Progress = Callable[[str, float | None], None]


def no_progress(_message: str, _fraction: float | None) -> None:
    """The default callback: report nothing."""
