"""Several hypervisors at once, where one that hangs blocks only itself.

A call to a stopped daemon blocks forever inside libvirt, so every per-host call here runs in
its own daemon thread and is waited on with a deadline; a host that misses it is reported as
unreachable (its thread is abandoned, never joined) while the others' answers are used.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tui.core.errors import VirtdeckError
from tui.core.hypervisor import DEFAULT_CONNECT_TIMEOUT, Hypervisor, no_answer

T = TypeVar("T")


@dataclass(frozen=True)
class FleetResult(Generic[T]):
    """Per host: its answer, or one line saying why there is none (in the order asked)."""

    answers: dict[str, T] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def on_each(
    hypervisors: Iterable[Hypervisor],
    fn: Callable[[Hypervisor], T],
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    settle: float | None = None,
) -> FleetResult[T]:
    """Run `fn(hv)` for every host in parallel; whatever has not answered after `timeout` s
    (one deadline for all, from now) is a failure "no answer within N s".

    With `settle`, stop waiting `settle` s after the first host answered (the dashboard starts
    with the hosts that are there; the others keep connecting in the background).
    """
    hvs = list(hypervisors)
    results: dict[str, T] = {}
    errors: dict[str, str] = {}
    changed = threading.Condition()

    def run(hv: Hypervisor) -> None:
        try:
            value = fn(hv)
            with changed:
                results[hv.uri] = value
        except VirtdeckError as err:
            with changed:
                errors[hv.uri] = str(err)
        finally:
            with changed:
                changed.notify_all()

    for hv in hvs:
        threading.Thread(target=run, args=(hv,), name=f"host {hv.uri}", daemon=True).start()
    start = time.monotonic()
    deadline = start + timeout
    settled = False
    with changed:
        while len(results) + len(errors) < len(hvs):
            now = time.monotonic()
            if settle is not None and results and not settled:
                settled = True
                deadline = min(deadline, now + settle)
            if now >= deadline:
                break
            changed.wait(deadline - now)
        answers = {hv.uri: results[hv.uri] for hv in hvs if hv.uri in results}
        cut_short = time.monotonic() < start + timeout
        failures = {
            hv.uri: errors.get(hv.uri)
            or (f"{hv.uri}: no answer yet" if cut_short else str(no_answer(hv.uri, timeout)))
            for hv in hvs
            if hv.uri not in results
        }
    return FleetResult(answers, failures)


def connect_all(
    uris: Iterable[str],
    *,
    demo: bool = False,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    settle: float | None = None,
) -> tuple[list[Hypervisor], dict[str, str]]:
    """Connect to every URI in parallel, waiting at most `timeout` s in all (with `settle`:
    at most that long after the first host answered).

    Returns one Hypervisor per URI, in order (those that failed are not connected: alive is
    False, and a connect still under way is adopted by their next reconnect()), and one line
    per URI that failed.
    """
    hvs = [Hypervisor.unconnected(uri, demo=demo) for uri in dict.fromkeys(uris)]
    result = on_each(hvs, lambda hv: hv.try_connect(timeout), timeout=timeout, settle=settle)
    return hvs, dict(result.failures)
