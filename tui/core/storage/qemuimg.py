"""qemu-img as a subprocess with an argument list (never a shell).

Two runners, both injectable: `runner` runs a command to its end (its output captured),
`streamer` runs one handing each output line over as it comes (a copy's progress). The
defaults run the real binary here; RemoteFiles gives both over SSH; a test gives a runner that
fails at a chosen step, and without a streamer of its own the copy goes through that runner
(its output handed over at the end): one code path whichever runs it. Errors become
OperationError with qemu-img's own last line.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from tui.core import procs
from tui.core.errors import OperationError
from tui.core.progress import Progress, no_progress

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
#: Runs a command handing each output line (stdout and stderr) to the callback; its status.
Streamer = Callable[[Sequence[str], Callable[[str], None]], int]


def run_subprocess(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The real binary, as a child that ends with the operation (tui.core.procs)."""
    return procs.run(argv)


def last_line(text: str) -> str:
    """The last non-blank line of a tool's output: what it said when it failed."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


class QemuImg:
    def __init__(
        self,
        runner: Runner | None = None,
        binary: str = "qemu-img",
        *,
        streamer: Streamer | None = None,
    ) -> None:
        self.runner = runner or run_subprocess
        self.binary = binary
        if streamer is None:
            streamer = procs.stream if runner is None else _streaming(self.runner)
        self.streamer = streamer

    def run(self, *args: str) -> str:
        argv = [self.binary, *args]
        try:
            proc = self.runner(argv)
        except FileNotFoundError:
            raise OperationError(
                f"{self.binary} is not installed (apt-get install qemu-utils)"
            ) from None
        if proc.returncode != 0:
            raise OperationError(f"qemu-img {args[0]} failed: {last_line(proc.stderr)}")
        return proc.stdout

    def info(self, path: str, *, backing_chain: bool = False) -> Any:
        """`qemu-img info -U --output=json` (a list with --backing-chain). -U: works on images
        a running QEMU holds locked."""
        args = ["info", "-U", "--output=json"]
        if backing_chain:
            args.append("--backing-chain")
        return json.loads(self.run(*args, path))

    def check(self, path: str, fmt: str) -> None:
        """`qemu-img check`: an OperationError naming what is wrong when the image has
        corruptions (leaked clusters, exit 3, waste space but lose nothing: they pass)."""
        proc = self.runner([self.binary, "check", "--output=json", "-f", fmt, path])
        if proc.returncode in (0, 3):
            return
        raise OperationError(f"qemu-img check {path}: {last_line(proc.stderr or proc.stdout)}")

    def measure(self, path: str, fmt: str) -> int:
        """Bytes a sparse copy needs (`qemu-img measure`: allocated clusters, not virtual size)."""
        out = json.loads(self.run("measure", "--output=json", "-f", fmt, "-O", fmt, path))
        return int(out["required"])

    def create(self, path: str, fmt: str, size: int | str) -> None:
        self.run("create", "-q", "-f", fmt, path, str(size))

    def create_overlay(self, path: str, backing: str, backing_fmt: str) -> None:
        """A qcow2 overlay whose backing file (absolute path and format recorded) is `backing`."""
        self.run("create", "-q", "-f", "qcow2", "-F", backing_fmt, "-b", backing, path)

    def convert(
        self,
        src: str,
        dst: str,
        *,
        src_fmt: str,
        dst_fmt: str = "qcow2",
        progress: Progress = no_progress,
        label: str = "copying",
    ) -> None:
        """A full, independent copy (sparse stays sparse), reporting qemu-img's -p percentage."""
        argv = [self.binary, "convert", "-p", "-f", src_fmt, "-O", dst_fmt, src, dst]
        said: list[str] = []

        def on_line(line: str) -> None:  # -p writes "(12.34/100%)" lines ended by \r
            found = re.findall(r"\((\d+(?:\.\d+)?)/100%\)", line)
            if found:
                progress(label, float(found[-1]) / 100)  # (an interrupt here kills the copy)
            elif line.strip():
                said.append(line)

        try:
            status = self.streamer(argv, on_line)
        except FileNotFoundError:
            raise OperationError(
                f"{self.binary} is not installed (apt-get install qemu-utils)"
            ) from None
        if status != 0:
            said_text = "\n".join(said)
            raise OperationError(f"qemu-img convert failed: {last_line(said_text)}")
        progress(label, 1.0)

    def export_snapshot(self, path: str, snapshot: str, dst: str) -> None:
        """The state of internal snapshot `snapshot` of the qcow2 `path`, read-only, into the
        new standalone qcow2 `dst` (`path` is only read)."""
        self.run("convert", "-f", "qcow2", "-l", f"snapshot.name={snapshot}", "-O", "qcow2",
                 path, dst)  # fmt: skip

    def commit(self, path: str, fmt: str = "qcow2") -> None:
        """Write the overlay `path` into its backing file (the overlay is left emptied)."""
        self.run("commit", "-q", "-f", fmt, path)

    def rebase_unsafe(self, path: str, backing: str, backing_fmt: str) -> None:
        """Point `path` at another backing file without copying data (`rebase -u`): only right
        when the new backing shows the same content as the old one, e.g. after a commit."""
        self.run("rebase", "-u", "-f", "qcow2", "-F", backing_fmt, "-b", backing, path)


_HEX_ROW = re.compile(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})")


def read_head(path: str, fmt: str, length: int = 4096, runner: Runner | None = None) -> bytes:
    """The first `length` bytes the guest sees of an image (through its backing chain), read
    with `qemu-io -r` (read-only: it never takes a write lock or changes the image)."""
    argv = ["qemu-io", "-r", "-f", fmt, "-c", f"read -v 0 {length}", path]
    try:
        proc = (runner or run_subprocess)(argv)
    except FileNotFoundError:
        raise OperationError("qemu-io is not installed (apt-get install qemu-utils)") from None
    if proc.returncode != 0:
        raise OperationError(f"qemu-io could not read {path}: {last_line(proc.stderr)}")
    data = bytearray()
    for line in proc.stdout.splitlines():
        if m := _HEX_ROW.match(line):
            data += bytes.fromhex(m.group(1))
    return bytes(data)


def _streaming(runner: Runner) -> Streamer:
    """A streamer over a runner that captures: the lines are handed over at the end."""

    def stream(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
        proc = runner(argv)
        for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines():
            on_line(line)
        return proc.returncode

    return stream
