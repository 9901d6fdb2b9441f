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
