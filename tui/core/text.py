"""Control characters in names, descriptions and paths (C0, DEL and C1): a newline or an
escape sequence in something virtdeck prints or passes on would forge lines or commands."""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control(text: str | None) -> bool:
    return bool(text) and CONTROL.search(text or "") is not None


def printable(text: str) -> str:
    """`text` with control characters shown escaped (what another tool stored, displayed)."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def shortened(text: str, width: int = 32) -> str:
    """`text` cut in the middle to `width` characters (a long URI in a table column: its
    scheme and its end, e.g. the socket, stay readable)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"
