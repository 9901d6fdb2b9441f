"""Sizes as operators read them, one spelling everywhere: binary units, and `?` for a size
nobody could read (unknown is not zero)."""

from __future__ import annotations

from collections.abc import Iterable

import humanize

UNKNOWN = "?"


def size(n: int | None, *, unknown: str = UNKNOWN) -> str:
    return unknown if n is None else humanize.naturalsize(n, binary=True)


def total(sizes: Iterable[int | None]) -> int | None:
    """The sum, or None when any part is unknown (unknown is not zero)."""
    out = 0
    for n in sizes:
        if n is None:
            return None
        out += n
    return out
