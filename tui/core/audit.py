"""The audit trail: one JSON line per state change virtdeck made, whoever asked (CLI or TUI).

`ops.running()` (every multi-step operation) and the lifecycle verbs record through
`recorded(...)`, so an operation never has to remember it. A record says when (ISO-8601 UTC),
on which host, to which domains, what (the operation's title and the steps that acted), how it
ended (ok, failed, interrupted, or undone by `virtdeck recover`, with the error line), how long
it took and who asked (user, the SSH client's address, pid).

The log is `$XDG_STATE_HOME/virtdeck/audit.log` (or `$VIRTDECK_AUDIT_LOG`), mode 0600, written
only in a directory of ours and never through a symbolic link (tui.core.private). Each
record is one `write()` to a file opened with O_APPEND, so records from several processes never
interleave; writers hold a shared flock on `audit.log.lock` while they append and the one that
finds the log too big takes it exclusively to rotate (`audit.log` → `.1` → … → `.KEEP`). A
failing audit write never fails the operation: it prints one warning line on stderr instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui.core import private
from tui.core.paths import state_dir

ENV = "VIRTDECK_AUDIT_LOG"
MAX_BYTES = 1 << 20  # rotate when the log grows past this
KEEP = 4  # rotated files kept: audit.log.1 (newest) … audit.log.4
MAX_STEPS = 100  # a record names at most this many steps (and says how many more)
MAX_LINE = 1 << 20  # a longer line is not a record (read in pieces, counted as skipped)
MAX_TAIL = 8 << 20  # the details view reads at most this much of the end of each file

RESULTS = ("ok", "failed", "interrupted", "undone")


def log_path() -> Path:
    return Path(os.environ.get(ENV) or state_dir() / "audit.log")


@dataclass(frozen=True)
class Record:
    time: str
    host: str
    domains: tuple[str, ...]
    operation: str
    steps: tuple[str, ...]
    result: str
    error: str
    duration: float
    user: str
    client: str | None
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "host": self.host,
            "domains": list(self.domains),
            "operation": self.operation,
            "steps": list(self.steps),
            "result": self.result,
            "error": self.error,
            "duration": self.duration,
            "user": self.user,
            "client": self.client,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, data: Any) -> Record:
        if not isinstance(data, dict) or data.get("result") not in RESULTS:
            raise ValueError("not an audit record")
        client = data.get("client")
        return cls(
            time=str(data["time"]),
            host=str(data["host"]),
            domains=tuple(str(d) for d in data["domains"]),
            operation=str(data["operation"]),
            steps=tuple(str(s) for s in data.get("steps", ())),
            result=str(data["result"]),
            error=str(data.get("error", "")),
            duration=float(data["duration"]),
            user=str(data["user"]),
            client=None if client is None else str(client),
            pid=int(data["pid"]),
        )


def _user() -> tuple[str, str | None]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    # SSH_CONNECTION is "client-address client-port server-address server-port".
    client = os.environ.get("SSH_CONNECTION", "").split()
    return user, (client[0] if client else None)


def make_record(
    host: str,
    operation: str,
    domains: Iterable[str],
    steps: Iterable[str],
    result: str,
    error: str = "",
    duration: float = 0.0,
    *,
    when: dt.datetime | None = None,
) -> Record:
    if result not in RESULTS:
        raise ValueError(f"unknown audit result {result}")
    steps = list(steps)
    if len(steps) > MAX_STEPS:
        steps = steps[:MAX_STEPS] + [f"… {len(steps) - MAX_STEPS} more"]
    user, client = _user()
    when = when or dt.datetime.now(dt.UTC)
    return Record(
        time=when.isoformat(timespec="milliseconds"),
        host=host,
        domains=tuple(dict.fromkeys(domains)),
        operation=operation,
        steps=tuple(steps),
        result=result,
        error=error,
        duration=round(duration, 3),
        user=user,
        client=client,
        pid=os.getpid(),
    )


def append(record: Record, path: Path | None = None) -> None:
    """Append one record as one line (raises OSError; `write` is the forgiving face)."""
    path = path or log_path()
    line = (json.dumps(record.to_json(), ensure_ascii=False) + "\n").encode()
    # Never through a link, only in a directory of ours (tui.core.private): a log that
    # points elsewhere is refused, and the operation goes on with a warning (see `write`).
    lock = private.open_private(Path(f"{path}.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if _size(path) + len(line) > MAX_BYTES:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (converting drops the shared lock first)
            if _size(path) + len(line) > MAX_BYTES:  # another writer may have rotated it
                _rotate(path)
        fd = private.open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):
            raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
    finally:
        os.close(lock)  # releases the flock


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _rotate(path: Path) -> None:
    for n in range(KEEP - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}.{n}", f"{path}.{n + 1}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, f"{path}.1")


_warned = [False]


def write(record: Record, path: Path | None = None) -> bool:
    """Append a record; a failure is one warning line on stderr (once per process), never an
    error of the operation. Returns whether it was written."""
    try:
        append(record, path)
        return True
    except (OSError, ValueError, TypeError, private.UnsafeFileError) as err:
        if not _warned[0]:
            _warned[0] = True
            where = path or log_path()
            with contextlib.suppress(OSError, ValueError):
                print(f"virtdeck: warning: audit log {where} not written: {err}", file=sys.stderr)
        return False


# -- recording an operation ------------------------------------------------------------------

_local = threading.local()


@dataclass
class Entry:
    """What `recorded()` yields: the steps that acted so far (the caller appends to it)."""

    steps: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)


@contextlib.contextmanager
def recorded(host: str, operation: str, domains: Iterable[str] = ()) -> Iterator[Entry]:
    """Record the operation in the `with` when it ends: ok, or how it failed (the error's line).

    Nested operations in the same thread (a clone's start, a template's shutdown) belong to the
    outer one: only the outermost is recorded.
    """
    entry = Entry(domains=list(domains))
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    start = time.monotonic()
    result, error = "ok", ""
    try:
        yield entry
    except BaseException as err:
        result, error = classify(err)
        raise
    finally:
        _local.depth = depth
        if depth == 0:
            write(
                make_record(
                    host,
                    operation,
                    entry.domains,
                    entry.steps,
                    result,
                    error,
                    time.monotonic() - start,
                )
            )


def classify(err: BaseException) -> tuple[str, str]:
    """The result and the error line of an operation that raised `err`."""
    from tui.core.cancel import Interrupted, cancelled

    line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, (Interrupted, KeyboardInterrupt)):
        return "interrupted", line
    if cancelled():  # a signal ended its child first: the child's failure is the interrupt's
        return "interrupted", f"interrupted: {line}"
    return "failed", line


# -- reading ---------------------------------------------------------------------------------


def files(path: Path | None = None) -> list[Path]:
    """The log and its rotated files that exist, oldest first."""
    path = path or log_path()
    rotated = [Path(f"{path}.{n}") for n in range(KEEP, 0, -1)]
    return [p for p in [*rotated, path] if p.is_file()]


def parse(line: str) -> Record | None:
    """One log line as a record; None when it is not one (corrupt or foreign)."""
    try:
        return Record.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError):
        return None


def read(path: Path | None = None) -> tuple[list[Record], int]:
    """Every record, oldest first, and how many lines were not records (skipped)."""
    records: list[Record] = []
    bad = 0
    for p in files(path):
        with open(p, encoding="utf-8", errors="replace") as fh:
            # Bounded: a huge (or sparse) file with no newline is not read into memory whole.
            overlong = False
            for line in iter(lambda: fh.readline(MAX_LINE), ""):
                if overlong or len(line) >= MAX_LINE:
                    bad += 0 if overlong else 1
                    overlong = not line.endswith("\n")
                    continue
                if not line.strip():
                    continue
                record = parse(line)
                if record is None:
                    bad += 1
                else:
                    records.append(record)
    return records, bad


def select(
    records: Iterable[Record],
    *,
    domain: str | None = None,
    host: str | None = None,
    limit: int | None = None,
    saved: dict[str, str] | None = None,
) -> list[Record]:
    """Records of `domain` (and `host`: see host_matches), newest last, the last `limit`."""
    out = [
        r
        for r in records
        if (domain is None or domain in r.domains)
        and (host is None or host_matches(r.host, host, saved or {}))
    ]
    return out[-limit:] if limit else out


def host_matches(uri: str, wanted: str, saved: dict[str, str]) -> bool:
    """Whether a record's host `uri` is the host the operator named: the URI itself, a saved
    host's name (config.toml, `saved`: name -> URI), or a host name (the URI's host part;
    this machine's name, or localhost, for a URI without one)."""
    import socket
    from urllib.parse import urlsplit

    if uri == wanted or saved.get(wanted) == uri:
        return True
    try:
        where = (urlsplit(uri).hostname or "").lower()
    except ValueError:
        return False
    names = {wanted.lower()}
    if wanted in saved:
        with contextlib.suppress(ValueError):
            names.add((urlsplit(saved[wanted]).hostname or "").lower())
        names.discard("")
    if not where:
        return bool(names & {socket.gethostname().lower(), "localhost"})
    return where in names


def recent(domain: str, host: str | None = None, limit: int = 5) -> list[Record]:
    """The domain's last operations, oldest first (the details view): read from the newest
    file backwards, so it stops early; an unreadable log or line is left out."""
    found: list[Record] = []
    needle = json.dumps(domain, ensure_ascii=False)  # as a record holds it
    for p in reversed(files()):
        try:
            with open(p, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - MAX_TAIL))
                lines = fh.read(MAX_TAIL).decode("utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if needle not in line:  # cheap: a record naming it holds it as this JSON string
                continue
            record = parse(line)
            if record is None:
                continue
            if domain in record.domains and (host is None or record.host == host):
                found.append(record)
                if len(found) == limit:
                    return found[::-1]
    return found[::-1]
