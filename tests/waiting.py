"""Wait for a fact, with a deadline that fails loudly (never a sleep that hopes).

One helper for every test: `wait_for` inside a Textual pilot (the app keeps running while it
waits), `wait_until` in plain code. Both fail with what was awaited and how long, so a test
that times out under load says which fact never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class NotReached(AssertionError):
    """A fact did not become true by its deadline."""


def _failed(what: str, fact: Callable[[], object], timeout: float) -> NotReached:
    name = what or getattr(fact, "__name__", repr(fact))
    return NotReached(f"not within {timeout:g} s: {name}")


async def wait_for(
    pilot: Any, fact: Callable[[], object], timeout: float = 30.0, what: str = ""
) -> None:
    """Let the app run until `fact()` is true; NotReached at the deadline."""
    deadline = time.monotonic() + timeout
    while not fact():
        if time.monotonic() >= deadline:
            raise _failed(what, fact, timeout)
        await pilot.pause(0.05)


def wait_until(
    fact: Callable[[], object], timeout: float = 30.0, what: str = "", poll: float = 0.1
) -> None:
    """Poll `fact()` until true; NotReached at the deadline."""
    deadline = time.monotonic() + timeout
    while not fact():
        if time.monotonic() >= deadline:
            raise _failed(what, fact, timeout)
        time.sleep(poll)
