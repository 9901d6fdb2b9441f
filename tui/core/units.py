"""Sizes as operators read them, one spelling everywhere: binary units, and `?` for a size
nobody could read (unknown is not zero)."""

from __future__ import annotations

import humanize

UNKNOWN = "?"


def size(n: int | None, *, unknown: str = UNKNOWN) -> str:
    return unknown if n is None else humanize.naturalsize(n, binary=True)
