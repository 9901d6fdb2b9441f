"""Child processes (qemu-img, virt-sysprep, virsh) that end with the operation that started them.

Each child runs in its own session, so a Ctrl-C or a hang-up sent to the terminal's process
group reaches virtdeck, which unwinds and ends the child itself (instead of the child dying
half-way while virtdeck still thinks it runs); it is registered with tui.core.cancel so cancel()
kills it; and where util-linux's `setpriv` exists it gets PR_SET_PDEATHSIG, so that if virtdeck
itself is killed (SIGKILL, OOM) the child does not go on copying alone.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from tui.core import cancel, debuglog

_SETPRIV = shutil.which("setpriv")


def argv_with_deathsig(argv: Sequence[str]) -> list[str]:
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def popen(argv: Sequence[str], *, text: bool = True, **kwargs: Any) -> subprocess.Popen[str]:
    """Start a child in its own session that cancel() and virtdeck's death both end (`text`
    False: its pipes carry bytes)."""
    if shutil.which(argv[0]) is None and "/" not in argv[0]:
        raise FileNotFoundError(argv[0])
    proc = subprocess.Popen(argv_with_deathsig(argv), start_new_session=True, text=text, **kwargs)
    debuglog.started(argv, proc.pid)
    proc._virtdeck_forget = cancel.watch_child(proc)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen[str]) -> None:
    """Forget a child that has ended (or kill it first when the caller gives up on it)."""
    if proc.poll() is None:
        cancel.kill_child(proc)
        proc.wait()
    debuglog.exited(proc.pid, proc.returncode)
    forget = getattr(proc, "_virtdeck_forget", None)
    if forget is not None:
        forget()


def stream(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    *,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> int:
    """Run a command (argument list, no shell) as an ending child, handing each output line
    (stdout and stderr) to `on_line`; returns its exit status. An interrupt kills it, and so
    can whoever `on_start` hands the child to (one of several parallel children failed)."""
    proc = popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        bufsize=1,
    )
    assert proc.stdout is not None
    try:
        if on_start is not None:
            on_start(proc)
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()
    finally:
        finish(proc)


def run_bytes(argv: Sequence[str], data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Like run(), with bytes: `data` on its standard input, its output as it is."""
    proc: Any = popen(argv, text=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL if data is None else subprocess.PIPE)  # fmt: skip
    try:
        out, err = proc.communicate(data)
    finally:
        finish(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Like subprocess.run(capture_output=True, text=True), as an ending child."""
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate()
    finally:
        finish(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
