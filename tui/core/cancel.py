"""Stopping an operation cleanly: cancellation, signals, and the children that go with it.

`cancel()` makes every running operation stop at its next progress report (`cancellable`)
and kills the child processes it registered (`watch_child`, see tui.core.procs).
`run_cancellable(fn)` (the CLI) runs an operation in a worker thread while the main thread
turns SIGINT, SIGTERM and SIGHUP (a dropped SSH session) into cancel(): nothing is ever raised
asynchronously inside the operation or inside a libvirt object's destructor.
`signals_deferred()` keeps an undo from being cut in half by a second signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from tui.core.progress import Progress


class Interrupted(KeyboardInterrupt):
    """The operation was stopped by a signal (SIGINT, SIGTERM, SIGHUP) or cancel()."""

    def __init__(self, why: str = "interrupted", signum: int | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.signum = signum if signum is not None else _cancel_signal[0]

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a shell reports a process a signal ended (130 for Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)

    def __str__(self) -> str:
        return self.why


# -- cancellation ----------------------------------------------------------------------------

_cancelled = threading.Event()
_cancel_reason = ["interrupted"]
_cancel_signal: list[int | None] = [None]
_children: set[Any] = set()
_children_lock = threading.Lock()


def kill_child(proc: Any) -> None:
    """Kill a child that has not ended, with everything it started in its own session
    (tui.core.procs starts each child in one): a grandchild left behind would go on working
    alone and, holding the child's output pipe, keep its reader waiting (`timeout CMD` puts
    CMD in a group of its own; killing `timeout` alone left CMD running)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
            return
    with contextlib.suppress(OSError):
        proc.kill()


def cancel(why: str = "interrupted", signum: int | None = None) -> None:
    """Stop every running operation at its next progress report, and end its children."""
    _cancel_reason[0] = why
    _cancel_signal[0] = signum
    _cancelled.set()
    with _children_lock:
        children = list(_children)
    for proc in children:
        kill_child(proc)


def cancelled() -> bool:
    return _cancelled.is_set()


def reset_cancel() -> None:
    _cancelled.clear()


def check_cancelled() -> None:
    if _cancelled.is_set():
        raise Interrupted(_cancel_reason[0])


def watch_child(proc: Any) -> Callable[[], None]:
    """Register a child process to be killed by cancel(); returns the function to forget it."""
    with _children_lock:
        _children.add(proc)
    if _cancelled.is_set():
        kill_child(proc)

    def forget() -> None:
        with _children_lock:
            _children.discard(proc)

    return forget


def cancellable(progress: Progress) -> Progress:
    """A progress callback that raises Interrupted once the operation is cancelled."""

    def report(message: str, fraction: float | None) -> None:
        check_cancelled()
        progress(message, fraction)

    return report


_SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP", signal.SIGINT: "SIGINT"}


def handle_signals(*, raise_in_main: bool = True) -> None:
    """SIGTERM and SIGHUP (a dropped SSH session) stop an operation the way Ctrl-C does.

    With `raise_in_main`, the handler also raises Interrupted in the main thread (the CLI,
    where the operation runs there); the dashboard runs operations in workers and only
    cancels them.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        why = f"interrupted by {_SIGNAL_NAMES.get(signal.Signals(signum), str(signum))}"
        cancel(why, signum)
        if raise_in_main:
            raise Interrupted(why, signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run_cancellable(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a worker thread while the main thread waits for it with SIGINT, SIGTERM
    and SIGHUP turned into cancel(): no exception is ever raised asynchronously inside the
    operation (or inside a libvirt object's destructor); it stops at its next progress report
    or when its child process is killed, unwinds, and its error is raised here."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            error.append(err)

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = _SIGNAL_NAMES.get(signal.Signals(signum), str(signum))
        cancel(f"interrupted by {name}", signum)

    if threading.current_thread() is not threading.main_thread():
        return fn()  # signals are the main thread's: a caller there handles them
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in old:
        signal.signal(s, handler)
    try:
        worker = threading.Thread(target=target, name="virtdeck-operation", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if error:
        err = error[0]
        if cancelled() and not isinstance(err, Interrupted):
            # A child killed by cancel() fails with its own error: say what stopped it.
            raise Interrupted(f"{_cancel_reason[0]}: {err}") from None
        raise err
    status = result[0]
    if cancelled() and isinstance(status, int) and not isinstance(status, bool) and status:
        # It caught its member's failure and went on to report it, but a signal killed that
        # member's child: the command ends as interrupted, with the signal's exit status.
        raise Interrupted(_cancel_reason[0])
    return status  # finished: a signal that came too late changes nothing


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """While undoing, further signals are noted, not raised: an undo is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in old:
        signal.signal(s, lambda signum, _f: seen.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
