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
) -> FleetResult[T]:
    """Run `fn(hv)` for every host in parallel; whatever has not answered after `timeout` s
    (one deadline for all, from now) is a failure "no answer within N s"."""
    hvs = list(hypervisors)
    results: dict[str, T] = {}
    errors: dict[str, str] = {}
    lock = threading.Lock()
    done = {hv.uri: threading.Event() for hv in hvs}

    def run(hv: Hypervisor) -> None:
        try:
            value = fn(hv)
            with lock:
                results[hv.uri] = value
        except VirtdeckError as err:
            with lock:
                errors[hv.uri] = str(err)
        finally:
            done[hv.uri].set()

    for hv in hvs:
        threading.Thread(target=run, args=(hv,), name=f"host {hv.uri}", daemon=True).start()
    deadline = time.monotonic() + timeout
    for hv in hvs:
        done[hv.uri].wait(max(0.0, deadline - time.monotonic()))
    answers: dict[str, T] = {}
    failures: dict[str, str] = {}
    with lock:
        for hv in hvs:
            if hv.uri in results:
                answers[hv.uri] = results[hv.uri]
            elif hv.uri in errors:
                failures[hv.uri] = errors[hv.uri]
            else:
                failures[hv.uri] = str(no_answer(hv.uri, timeout))
    return FleetResult(answers, failures)


def connect_all(
    uris: Iterable[str], *, demo: bool = False, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> tuple[list[Hypervisor], dict[str, str]]:
    """Connect to every URI in parallel, waiting at most `timeout` s in all.

    Returns one Hypervisor per URI, in order (those that failed are not connected: alive is
    False, and a connect still under way is adopted by their next reconnect()), and one line
    per URI that failed.
    """
    hvs = [Hypervisor.unconnected(uri, demo=demo) for uri in dict.fromkeys(uris)]
    result = on_each(hvs, lambda hv: hv.try_connect(timeout), timeout=timeout)
    return hvs, dict(result.failures)
