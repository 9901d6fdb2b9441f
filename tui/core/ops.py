"""One way to run an operation: a persistent undo journal, unwinding on failure or signal.

Every state change virtdeck makes (templates, clones, rm, snapshot create/revert/delete) runs
inside `running(hv, title)`:

    with ops.running(hv, "deploy 3 thin clones of 'template-web'") as undo:
        undo.push("undefine 'web-1'", "undefine", uuid=item.uuid)   # before the step acts
        hv.define(item.xml)
        ...

`push` writes the undo action to the operation's journal and fsyncs it *before* the step acts,
so whatever happens next — an error, Ctrl-C, SIGTERM, SIGHUP (a dropped SSH session), a killed
process, a host crash — what was started can be taken back: at once by the unwinding `with`
(newest first), or later by `virtdeck recover` (CLI) or the dashboard's notification, which
find journals whose process is gone. Undo actions are data (a kind and its arguments), not
closures, so a later process can replay them; each is idempotent (undefining a domain that is
not there, or deleting a file that is gone, is not an error), since a journal may record a step
that never got to act. A finished or rolled-back operation leaves no journal behind. Every
operation, and every recovery, is also recorded in the audit trail (tui.core.audit).

Signals: `handle_signals()` makes SIGTERM and SIGHUP behave like Ctrl-C (an `Interrupted`
raised in the main thread) and `cancel()` makes every running operation stop at its next
progress report; child processes are started in their own session and killed with the
operation (see tui.core.storage.qemuimg).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import json
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tui.core import audit
from tui.core.cancel import (  # noqa: F401  (re-exported: ops is the face)
    Interrupted,
    cancel,
    cancellable,
    cancelled,
    check_cancelled,
    handle_signals,
    reset_cancel,
    run_cancellable,
    signals_deferred,
    watch_child,
)
from tui.core.errors import NotFoundError, OperationError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.paths import state_dir
from tui.core.progress import Progress


class Plan(Protocol):
    """What every operation's plan offers its two faces: the TUI shows one confirmation screen
    and runs one worker path for any plan, the CLI one plan printer (no per-type branches)."""

    @property
    def host(self) -> str: ...  # the URI of the hypervisor it runs on

    @property
    def title(self) -> str: ...  # the confirmation's question

    @property
    def confirm_label(self) -> str: ...

    @property
    def destructive(self) -> bool: ...  # the confirmation focuses "No" and paints "Yes" red

    @property
    def option(self) -> str | None: ...  # a checkbox the confirmation offers, if any

    def choose(self, on: bool) -> Plan: ...  # the plan with the option ticked or not

    def summary(self) -> list[str]: ...

    def run(self, hv: Hypervisor, progress: Progress) -> str: ...  # one line: what was done


class PlanDefaults:
    """Mixin: no option, not destructive unless a plan says so."""

    @property
    def destructive(self) -> bool:
        return False

    @property
    def option(self) -> str | None:
        return None

    def choose(self, on: bool) -> Any:
        return self


class DestructivePlanDefaults(PlanDefaults):
    """Mixin for plans that lose something (a removal, a revert, a delete): the confirmation
    focuses "No" and paints "Yes" red."""

    @property
    def destructive(self) -> bool:
        return True


def plan_json(plan: Any) -> dict[str, Any]:
    """Any plan as JSON: its own to_json() where it has one, else its fields; plus the lines a
    confirmation shows."""
    if hasattr(plan, "to_json"):
        data = dict(plan.to_json())
    else:
        data = {k: _plain(v) for k, v in dataclasses.asdict(plan).items()}
    data.setdefault("summary", plan.summary())
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# -- the journal -----------------------------------------------------------------------------


def journal_dir() -> Path:
    return state_dir() / "journal"


def _host_key(uri: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in uri)[:80]


@dataclass(frozen=True)
class UndoAction:
    label: str
    kind: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Pending:
    """An operation whose process is gone before it finished or rolled back."""

    path: Path
    id: str
    host: str
    title: str
    started: str
    pid: int
    undo: tuple[UndoAction, ...]
    domains: tuple[str, ...] = ()

    def describe(self) -> str:
        steps = "; ".join(a.label for a in reversed(self.undo)) or "nothing to undo"
        return f"{self.title} on {self.host} (started {self.started}, pid {self.pid}): {steps}"


class Journal:
    """The persistent undo stack of one running operation (small JSON, fsync'd per push)."""

    def __init__(
        self,
        host: str,
        title: str,
        directory: Path | None = None,
        domains: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.title = title
        self.domains = list(domains)
        self.id = uuidlib.uuid4().hex[:12]
        self.actions: list[UndoAction] = []
        directory = directory or journal_dir()
        self.path = directory / f"{_host_key(host)}.{self.id}.json"
        self.started = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        directory.mkdir(parents=True, exist_ok=True)
        self._write()

    def _write(self) -> None:
        data = {
            "id": self.id,
            "host": self.host,
            "title": self.title,
            "domains": self.domains,
            "started": self.started,
            "pid": os.getpid(),
            "boot": _boot_id(),
            "undo": [{"label": a.label, "kind": a.kind, "args": a.args} for a in self.actions],
        }
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def push(self, label: str, kind: str, **args: Any) -> None:
        """Record how to undo the step about to act (call it before the step)."""
        if kind not in UNDO:
            raise ValueError(f"unknown undo action {kind}")
        self.actions.append(UndoAction(label, kind, args))
        self._write()

    def pop(self) -> None:
        """Forget the newest undo action (its step turned out not to act)."""
        self.actions.pop()
        self._write()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int, boot: str) -> bool:
    if boot and boot != _boot_id():
        return False  # the machine rebooted since: that process is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending(directory: Path | None = None) -> list[Pending]:
    """Operations whose process is gone before they finished (oldest first)."""
    directory = directory or journal_dir()
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            pid = int(data["pid"])
            if _alive(pid, str(data.get("boot", ""))):
                continue
            actions = tuple(
                UndoAction(str(a["label"]), str(a["kind"]), dict(a["args"])) for a in data["undo"]
            )
            out.append(
                Pending(
                    path,
                    str(data["id"]),
                    str(data["host"]),
                    str(data["title"]),
                    str(data["started"]),
                    pid,
                    actions,
                    tuple(str(d) for d in data.get("domains", ())),
                )  # fmt: skip
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    out.sort(key=lambda p: p.started)
    return out


# -- running an operation --------------------------------------------------------------------


@dataclass
class Undo:
    """What `running()` yields: push undo actions; `commit()` ends the undoable part."""

    hv: Hypervisor
    journal: Journal
    committed: bool = False
    notes: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # labels of the steps that acted (audit)

    def push(self, label: str, kind: str, **args: Any) -> None:
        self.journal.push(label, kind, **args)
        self.steps.append(label)

    def pop(self) -> None:
        self.journal.pop()
        if self.steps:
            self.steps.pop()

    @contextlib.contextmanager
    def step(self, label: str, kind: str, **args: Any) -> Iterator[None]:
        """Journal the undo, then act; a step refused because its target already exists (it
        is someone else's) is forgotten, so unwinding never touches that target."""
        from tui.core.storage.local import AlreadyExists

        self.push(label, kind, **args)
        try:
            yield
        except AlreadyExists:
            self.pop()
            raise

    def commit(self) -> None:
        """From here on the operation is done: a later failure is reported, not unwound."""
        self.committed = True
        self.journal.actions.clear()
        self.journal.close()


def unwind(hv: Hypervisor, actions: list[UndoAction]) -> list[str]:
    """Run undo actions newest first; returns the labels of those that failed."""
    failed = []
    with signals_deferred():
        for action in reversed(actions):
            try:
                UNDO[action.kind](hv, **action.args)
            except (VirtdeckError, OSError) as err:
                failed.append(f"{action.label} ({err})")
    return failed


@contextlib.contextmanager
def running(
    hv: Hypervisor,
    title: str,
    *,
    domains: Iterable[str] = (),
    journal_directory: Path | None = None,
) -> Iterator[Undo]:
    """Run an operation's steps; on any failure or interrupt, undo what was done.

    The error that stopped it is raised again with one line naming what was undone (or what
    could not be undone, so the operator knows what to look at). The operation is recorded in
    the audit trail (tui.core.audit) with the `domains` it acts on, its steps and its result.
    """
    check_cancelled()
    with audit.recorded(hv.uri, title, domains) as entry:
        journal = Journal(hv.uri, title, journal_directory, entry.domains)
        undo = Undo(hv, journal, steps=entry.steps)
        with _running(hv, title, undo):
            yield undo


@contextlib.contextmanager
def _running(hv: Hypervisor, title: str, undo: Undo) -> Iterator[None]:
    journal = undo.journal
    with _active_lock:
        _active[0] += 1
    try:
        yield
    except BaseException as err:
        if undo.committed:
            raise
        actions = list(journal.actions)
        failed = unwind(hv, actions)
        if failed:
            # Keep the journal: `virtdeck recover` can try again.
            raise OperationError(
                f"{title}: {_why(err)}; could not undo: {', '.join(failed)} "
                "('virtdeck recover' tries again)"
            ) from None
        journal.close()
        undone = f"undid {len(actions)} step(s)" if actions else "nothing had changed"
        if isinstance(err, Interrupted):
            raise Interrupted(f"{title}: {err}; {undone}") from None
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(f"{title}: interrupted; {undone}") from None
        if isinstance(err, VirtdeckError):
            raise type(err)(f"{err} ({undone})") from None
        raise
    else:
        journal.close()
    finally:
        with _active_lock:
            _active[0] -= 1


_active = [0]
_active_lock = threading.Lock()


def active() -> int:
    """How many operations are running in this process (the dashboard waits for them)."""
    return _active[0]


def _why(err: BaseException) -> str:
    return str(err) or type(err).__name__


def recover(hv: Hypervisor, item: Pending) -> list[str]:
    """Roll back an interrupted operation of `hv`; returns what could not be undone."""
    start = time.monotonic()
    failed = unwind(hv, list(item.undo))
    if not failed:
        with contextlib.suppress(FileNotFoundError):
            item.path.unlink()
    audit.write(
        audit.make_record(
            hv.uri,
            f"recovering: {item.title}",
            item.domains,
            [a.label for a in reversed(item.undo)],
            "failed" if failed else "undone",
            f"could not undo: {', '.join(failed)}" if failed else "",
            time.monotonic() - start,
        )
    )
    return failed


# -- undo actions: data, idempotent ----------------------------------------------------------


def _undefine(hv: Hypervisor, uuid: str, name: str, keep_nvram: bool = False) -> None:
    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return
    if hv.call(dom.name) != name:
        return  # that UUID is another domain's (its define is why ours failed): not ours
    if hv.call(dom.isActive):
        hv.call(dom.destroy)
    hv.undefine(dom, keep_nvram=keep_nvram)
    hv.invalidate()


def _delete_file(hv: Hypervisor, path: str) -> None:
    from tui.core.storage import files_for

    files_for(hv, "undo", define_pools=False).delete(path)


def _define(hv: Hypervisor, xml: str) -> None:
    hv.define(xml, what="restoring a definition")
    hv.invalidate()


def _restore_mode(hv: Hypervisor, path: str, mode: int) -> None:
    from tui.core.storage import files_for

    files = files_for(hv, "undo", define_pools=False)
    if files.lexists(path):
        files.restore_mode(path, mode)


def _remove_private(hv: Hypervisor, path: str) -> None:
    from tui.core.storage.local import remove_private

    remove_private(path)


def _rename(hv: Hypervisor, uuid: str, name: str) -> None:
    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return
    old = hv.call(dom.name)
    if old != name:
        hv.rename(dom, old, name)
    hv.invalidate()


def _redefine_snapshot(hv: Hypervisor, domain: str, xml: str, current: bool) -> None:
    from tui.core.snapshots import common

    common.redefine(hv, domain, xml, current=current)


def _start(hv: Hypervisor, name: str) -> None:
    dom = hv.lookup(name)
    if not hv.call(dom.isActive):
        hv.call(dom.create, what=f"starting '{name}'")


def _restore_memory(hv: Hypervisor, domain: str, path: str, xml: str, running: bool) -> None:
    import libvirt

    dom = hv.lookup(domain)
    if hv.call(dom.isActive):
        return
    flags = libvirt.VIR_DOMAIN_SAVE_RUNNING if running else libvirt.VIR_DOMAIN_SAVE_PAUSED
    hv.call(hv.conn.restoreFlags, path, xml, flags, what=f"restoring '{domain}'")


def _delete_snapshot(hv: Hypervisor, domain: str, name: str) -> None:
    from tui.core.groups import delete_snapshot

    delete_snapshot(hv, domain, name)


UNDO: dict[str, Callable[..., None]] = {
    "undefine": _undefine,
    "delete_file": _delete_file,
    "define": _define,
    "restore_mode": _restore_mode,
    "remove_private": _remove_private,
    "rename": _rename,
    "redefine_snapshot": _redefine_snapshot,
    "start": _start,
    "restore_memory": _restore_memory,
    "delete_snapshot": _delete_snapshot,  # a group snapshot's member (tui.core.groups)
}
