"""One way to run an operation: a persistent undo journal, unwinding on failure or signal.

Every state change virtdeck makes (templates, clones, rm, snapshot create/revert/delete) runs
inside `running(hv, title)`:

    with ops.running(hv, "deploy 3 thin clones of 'template-web'", dirs=[images]) as undo:
        undo.push("undefine 'web-1'", "undefine", uuid=item.uuid)   # before the step acts
        hv.define(item.xml)
        with undo.step(f"remove {path}", "delete_file", path=path):  # identity recorded after
            files.create_overlay(path, base, "qcow2")
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

An undo acts only on what its operation made and still owns. A journal has a schema version
(`SCHEMA`) and the directories the operation planned (`dirs`): a path outside them cannot be
pushed, and a journal naming one is refused as tampered. Each step records, right after it
acted, the identity of what it made (`Undo.step`, `Undo.identify`, `Undo.domain_left`): a
file's device, inode and change time, a snapshot's creation time, a digest of the definition
the operation left. Before acting, each undo checks it (`_CHECKS`) and skips, with the reason,
what changed hands since (a file replaced or used by another domain, a snapshot taken again,
a definition the operator changed). `recover` drops each step from the journal once it is done
or skipped, so a failed one is retried alone; broken journals are listed with the reason
(`scan`).

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
import stat
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tui.core import audit, debuglog, private
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
from tui.core.errors import ConnectError, NotFoundError, OperationError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.paths import state_dir
from tui.core.progress import Progress

F = TypeVar("F", bound=Callable[..., None])


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


# -- undo kinds: registered by the operations that push them ---------------------------------

#: What each undo kind does (kind -> function of the hypervisor and the step's arguments).
#: The journal's own kinds (domains, files) are below; an operation module registers its
#: own with `@undo_kind` (snapshots: tui.core.snapshots.common, tui.core.groups).
#: `tui.core.undo_kinds` imports every such module: a process reading journals imports it
#: first, or a journal naming a kind it does not know is listed as broken.
UNDO: dict[str, Callable[..., None]] = {}
#: Each kind's ownership check (`_owned`): why its undo must not act now, or ''.
Check = Callable[[Hypervisor, "UndoAction", bool, frozenset[str]], str]
_CHECKS: dict[str, Check] = {}


def undo_kind(kind: str, *, check: Check | None = None) -> Callable[[F], F]:
    """Register the decorated function as the undo of `kind` (and `check` as its ownership
    check). A kind registered twice by two functions is a programming error."""

    def register(fn: F) -> F:
        if UNDO.get(kind, fn) is not fn:
            raise ValueError(f"undo kind '{kind}' is registered twice")
        UNDO[kind] = fn
        if check is not None:
            _CHECKS[kind] = check
        return fn

    return register


# -- the journal -----------------------------------------------------------------------------

#: The journal format: a journal of another version is listed as broken, never acted on.
SCHEMA = 2
#: Undo kinds whose `path` argument must lie in a directory the operation planned.
PATH_KINDS = ("delete_file", "restore_mode", "remove_private", "restore_memory")
MAX_JOURNAL_BYTES = 4 << 20


def journal_dir() -> Path:
    return state_dir() / "journal"


def _host_key(uri: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in uri)[:80]


@dataclass(frozen=True)
class UndoAction:
    label: str
    kind: str
    args: dict[str, Any]
    # What the step made or left, recorded right after it acted (a file's device, inode and
    # change time; a snapshot's creation time; a digest of a domain's XML); None while the
    # step is acting (or if the process died before it could record it).
    identity: dict[str, Any] | None = None
    at: float = 0.0  # when the step was journalled (time.time())

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "args": self.args,
                "identity": self.identity, "at": self.at}  # fmt: skip


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
    dirs: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        steps = "; ".join(a.label for a in reversed(self.undo)) or "nothing to undo"
        return f"{self.title} on {self.host} (started {self.started}, pid {self.pid}): {steps}"


@dataclass(frozen=True)
class Broken:
    """A journal `recover` cannot act on (unreadable, truncated, unknown, tampered): listed
    with the reason and left as it is."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Scan:
    pending: list[Pending]
    broken: list[Broken]
    alive: list[Pending]  # journals of operations still running (their process is alive)


def _inside(path: str, dirs: Iterable[str]) -> bool:
    return any(path.startswith(d.rstrip("/") + "/") for d in dirs)


def _clean_dirs(dirs: Iterable[str]) -> list[str]:
    out = []
    for d in dirs:
        d = os.path.normpath(str(d))
        if not os.path.isabs(d) or d == "/":
            raise ValueError(f"not a planned directory: {d}")
        out.append(d)
    return sorted(set(out))


class Journal:
    """The persistent undo stack of one running operation (small JSON, fsync'd per push)."""

    def __init__(
        self,
        host: str,
        title: str,
        directory: Path | None = None,
        domains: Iterable[str] = (),
        dirs: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.title = title
        self.domains = list(domains)
        self.dirs = _clean_dirs(dirs)
        self.id = uuidlib.uuid4().hex[:12]
        self.actions: list[UndoAction] = []
        directory = directory or journal_dir()
        self.path = directory / f"{_host_key(host)}.{self.id}.json"
        self.started = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        try:
            private.check_dir(directory)
        except OperationError as err:
            raise OperationError(
                f"cannot keep the undo journal: {err}; nothing was changed"
            ) from None
        self._write(first=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "id": self.id,
            "host": self.host,
            "title": self.title,
            "domains": self.domains,
            "dirs": self.dirs,
            "started": self.started,
            "pid": os.getpid(),
            "boot": _boot_id(),
            "undo": [a.to_json() for a in self.actions],
        }

    def _write(self, first: bool = False) -> None:
        try:
            write_journal(self.path, self.to_json())
        except OSError as err:
            if first:
                raise OperationError(
                    f"cannot write the undo journal in {self.path.parent}: "
                    f"{err.strerror or err}; nothing was changed"
                ) from None
            raise OperationError(
                f"cannot write the undo journal {self.path}: {err.strerror or err}"
            ) from None

    def push(self, label: str, kind: str, **args: Any) -> None:
        """Record how to undo the step about to act (call it before the step)."""
        if kind not in UNDO:
            raise ValueError(f"unknown undo action {kind}")
        path = args.get("path")
        if kind in PATH_KINDS and not _inside(os.path.normpath(str(path)), self.dirs):
            raise ValueError(f"{path} is outside the directories '{self.title}' planned")
        self.actions.append(UndoAction(label, kind, args, None, round(time.time(), 3)))
        try:
            self._write()
        except BaseException:
            self.actions.pop()  # not journalled: the step must not act (nor be undone)
            raise

    def identify(self, identity: dict[str, Any] | None, index: int = -1) -> None:
        """Record what the step at `index` (the newest by default) made, now that it acted."""
        if not self.actions:
            return
        action = self.actions[index]
        self.actions[index] = dataclasses.replace(action, identity=identity)
        self._write()

    def pop(self) -> None:
        """Forget the newest undo action (its step turned out not to act)."""
        self.actions.pop()
        self._write()

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_journal(path: Path, data: dict[str, Any]) -> None:
    """Write a journal whole or not at all (a temporary file, fsync'd, renamed over it; never
    through a symbolic link; no partial or empty file left behind)."""
    tmp = path.with_suffix(".tmp")
    payload = json.dumps(data).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)  # fmt: skip
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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


def _read_journal(path: Path) -> dict[str, Any]:
    """The journal's JSON (bounded, not through a link); ValueError says what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise ValueError(f"unreadable: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        raw = os.read(fd, MAX_JOURNAL_BYTES + 1)
    except OSError as err:
        raise ValueError(f"unreadable: {err.strerror}") from None
    finally:
        os.close(fd)
    if not raw.strip():
        raise ValueError("empty")
    if len(raw) > MAX_JOURNAL_BYTES:
        raise ValueError(f"larger than {MAX_JOURNAL_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"truncated or not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError("not a journal (not a JSON object)")
    return data


def _parse(path: Path, data: dict[str, Any]) -> Pending:
    """A validated journal; ValueError names the first thing wrong."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"unknown journal version {data.get('schema')!r} (this virtdeck "
                         f"reads version {SCHEMA})")  # fmt: skip
    try:
        pid = data["pid"]
        if type(pid) is not int or not 0 < pid < 1 << 31:  # os.kill(0 or -n) asks a group
            raise ValueError(f"malformed: pid {pid!r} is not a process id")
        dirs = tuple(_clean_dirs(str(d) for d in data["dirs"]))
        actions = []
        for a in data["undo"]:
            kind, args = str(a["kind"]), a["args"]
            if kind not in UNDO:
                raise ValueError(f"unknown undo step '{kind}'")
            if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
                raise ValueError(f"step '{a['label']}' has malformed arguments")
            identity = a.get("identity")
            if identity is not None and not isinstance(identity, dict):
                raise ValueError(f"step '{a['label']}' has a malformed identity")
            if kind in PATH_KINDS:
                p = args.get("path")
                if not isinstance(p, str) or os.path.normpath(p) != p or not _inside(p, dirs):
                    raise ValueError(
                        f"tampered: step '{a['label']}' names {p!r}, outside the directories "
                        f"the operation planned ({', '.join(dirs) or 'none'}); refused"
                    )
            actions.append(UndoAction(str(a["label"]), kind, args, identity, float(a["at"])))
        return Pending(
            path,
            str(data["id"]),
            str(data["host"]),
            str(data["title"]),
            str(data["started"]),
            pid,
            tuple(actions),
            tuple(str(d) for d in data.get("domains", ())),
            dirs,
            data,
        )  # fmt: skip
    except KeyError as err:
        raise ValueError(f"incomplete: no {err}") from None
    except (TypeError, OverflowError) as err:
        raise ValueError(f"malformed ({err})") from None


def scan(directory: Path | None = None) -> Scan:
    """Every journal: operations to recover (oldest first), broken journals with the reason,
    and journals of operations still running."""
    directory = directory or journal_dir()
    found, broken, alive = [], [], []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        paths = []
    for path in paths:
        try:
            item = _parse(path, _read_journal(path))
        except ValueError as err:
            broken.append(Broken(path, str(err)))
            continue
        if _alive(item.pid, str(item.raw.get("boot", ""))):
            alive.append(item)
        else:
            found.append(item)
    found.sort(key=lambda p: p.started)
    return Scan(found, broken, alive)


def pending(directory: Path | None = None) -> list[Pending]:
    """Operations whose process is gone before they finished (oldest first)."""
    return scan(directory).pending


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
        debuglog.LOG.debug("step: %s (its undo: %s)", label, kind)

    def pop(self) -> None:
        self.journal.pop()
        if self.steps:
            self.steps.pop()

    @contextlib.contextmanager
    def step(self, label: str, kind: str, **args: Any) -> Iterator[None]:
        """Journal the undo, then act, then record the identity of what the step made (a
        file's device, inode and change time), so that a later `recover` acts on that very
        thing and on nothing that took its name since. A step refused because its target
        already exists (it is someone else's) is forgotten, so unwinding never touches it."""
        from tui.core.storage.local import AlreadyExists

        self.push(label, kind, **args)
        try:
            yield
        except AlreadyExists:
            self.pop()
            raise
        self.journal.identify(identify(self.hv, self.journal.actions[-1]))

    def identify(self, identity: dict[str, Any] | None = None) -> None:
        """Record what the newest step made, now that it acted (computed for files)."""
        if identity is None and self.journal.actions:
            identity = identify(self.hv, self.journal.actions[-1])
        self.journal.identify(identity)

    def domain_left(self, uuid: str) -> None:
        """Record the domain as the operation has left it so far (a digest of its XML): an
        undo restoring its old definition later acts only if it is still so."""
        digest = domain_digest(self.hv, uuid)
        for i in range(len(self.journal.actions) - 1, -1, -1):
            if self.journal.actions[i].kind == "define":
                self.journal.identify({"uuid": uuid, "digest": digest}, i)
                return

    def commit(self) -> None:
        """From here on the operation is done: a later failure is reported, not unwound."""
        self.committed = True
        self.journal.actions.clear()
        self.journal.close()


def identify(hv: Hypervisor, action: UndoAction) -> dict[str, Any] | None:
    """The identity of what a step made, read now (None when there is nothing to read)."""
    if action.kind in ("delete_file", "restore_mode"):
        from tui.core.storage import files_for

        return files_for(hv, "journal", define_pools=False).identity(action.args["path"])
    if action.kind == "remove_private":
        return private.identity(action.args["path"])
    return None


def domain_digest(hv: Hypervisor, uuid: str) -> str | None:
    """A digest of a domain's inactive, secure XML; None when no domain has that UUID."""
    import libvirt

    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return None
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    return xml_digest(hv.call(dom.XMLDesc, flags))


def xml_digest(xml: str) -> str:
    """sha256 of a definition without its name: the operation's own rename is undone (by its
    own step) before its definition is restored."""
    import hashlib

    from tui.core import domxml

    root = domxml.parse(xml)
    for name in root.findall("name"):
        root.remove(name)
    return hashlib.sha256(domxml.to_string(root).encode()).hexdigest()


def unwind(
    hv: Hypervisor,
    actions: list[UndoAction],
    *,
    live: bool = True,
    skipped: list[str] | None = None,
    done: Callable[[UndoAction], None] | None = None,
    undone: list[str] | None = None,
) -> list[str]:
    """Run undo actions newest first; returns the labels of those that failed.

    Before acting, each step checks that what it would undo is still what its operation made
    (`_owned`); otherwise it is skipped, with the reason appended to `skipped`. `live` is the
    unwinding of the operation's own process (a step that was acting when it failed made what
    is there); `recover` is not live. `done` is told of every step that succeeded or was
    skipped (recover drops it from the journal, so a retry runs only what failed). `undone`
    gets the labels of the steps that acted."""
    failed = []
    owned = frozenset(str(a.args.get("uuid")) for a in actions if a.kind == "undefine")
    with signals_deferred():
        for action in reversed(actions):
            try:
                why = _owned(hv, action, live=live, owned=owned)
                if why == NEVER_ACTED and live:
                    pass  # the step that failed: there is nothing of it to undo
                elif why:
                    if skipped is not None:
                        skipped.append(f"{action.label}: skipped, {why}")
                else:
                    debuglog.LOG.debug("undo: %s (%s)", action.label, action.kind)
                    UNDO[action.kind](hv, **action.args)
                    if undone is not None:
                        undone.append(action.label)
            except (VirtdeckError, OSError) as err:
                failed.append(f"{action.label} ({err})")
                continue
            if done is not None:
                done(action)
    return failed


NEVER_ACTED = "its step never acted"


def _owned(hv: Hypervisor, action: UndoAction, *, live: bool, owned: frozenset[str]) -> str:
    """Why this undo must not act (what it would touch changed hands), or ''."""
    check = _CHECKS.get(action.kind)
    return check(hv, action, live, owned) if check else ""


def _check_file(hv: Hypervisor, action: UndoAction, live: bool, owned: frozenset[str]) -> str:
    from tui.core.storage import files_for

    path = action.args["path"]
    files = files_for(hv, "undo", define_pools=False)
    if not files.lexists(path):
        return ""  # gone: deleting it is a no-op
    now = files.identity(path)
    was = action.identity
    if was is not None and now is not None and _replaced(was, now):
        return f"{path} was replaced since (another file has that name now)"
    if was is None and not live:
        # The process died while the step was acting: it made the file if the file is not
        # older than the step and no other domain uses it.
        ctime = (now or {}).get("ctime")
        if isinstance(ctime, int) and ctime / 1e9 < action.at - 2:
            return f"{path} is older than the step that would have made it"
    if was is None or now != was:
        users = users_of(hv, path, owned)
        if users:
            return f"{path} is in use by {', '.join(users)} (not this operation's)"
        if now is None and was is not None and not live:
            return f"the identity of {path} cannot be read, so it is not provably this one"
    return ""


def _replaced(was: dict[str, Any], now: dict[str, Any]) -> bool:
    keys = [k for k in ("dev", "ino") if k in was and k in now]
    return bool(keys) and any(was[k] != now[k] for k in keys)


def users_of(hv: Hypervisor, path: str, owned: frozenset[str]) -> list[str]:
    """Domains (other than those in `owned`) whose definition names `path` as a disk."""
    from tui.core import domxml

    users = []
    for dom in hv.call(hv.conn.listAllDomains, 0, what="listing domains"):
        try:
            if hv.call(dom.UUIDString) in owned:
                continue
            root = domxml.parse(hv.call(dom.XMLDesc, 0))
        except VirtdeckError:
            continue
        for disk in domxml.disk_elements(root):
            src = disk.find("source")
            if src is not None and path in (src.get("file"), src.get("dev")):
                users.append(f"domain '{root.findtext('name')}'")
                break
    return users


def _check_mode(hv: Hypervisor, action: UndoAction, live: bool, owned: frozenset[str]) -> str:
    path = action.args["path"]
    if action.identity is None:
        return NEVER_ACTED
    now = identify(hv, action)
    if now is not None and now != action.identity:
        return f"{path} changed since the operation made it read-only"
    return ""


def _check_private(hv: Hypervisor, action: UndoAction, live: bool, owned: frozenset[str]) -> str:
    path = action.args["path"]
    now = private.identity(path)
    if now is None or (action.identity is None and live):
        return ""
    if action.identity is None:
        return f"{path} was not recorded as written, so it is not provably this operation's"
    if now != action.identity:
        return f"{path} was replaced or changed since"
    return ""


def _check_define(hv: Hypervisor, action: UndoAction, live: bool, owned: frozenset[str]) -> str:
    from tui.core import domxml

    uuid = domxml.parse(action.args["xml"]).findtext("uuid") or ""
    now = domain_digest(hv, uuid.strip()) if uuid else None
    if now is None:
        return ""  # no domain has that UUID now: defining it again takes nothing from anyone
    was = (action.identity or {}).get("digest")
    if was is not None and now == was:
        return ""
    if now == xml_digest(action.args["xml"]):
        return "the definition is already the one it had"
    if was is None and live:
        return ""
    return "the domain's definition changed since the operation left it (kept as it is now)"


@contextlib.contextmanager
def running(
    hv: Hypervisor,
    title: str,
    *,
    domains: Iterable[str] = (),
    dirs: Iterable[str] = (),
    journal_directory: Path | None = None,
) -> Iterator[Undo]:
    """Run an operation's steps; on any failure or interrupt, undo what was done.

    `dirs` are the directories the plan writes in: an undo step can only name a file there
    (a journal naming anything else is refused as tampered by `recover`).

    The error that stopped it is raised again with one line naming what was undone (or what
    could not be undone, so the operator knows what to look at). The operation is recorded in
    the audit trail (tui.core.audit) with the `domains` it acts on, its steps and its result.
    """
    check_cancelled()
    debuglog.LOG.debug("operation on %s: %s (domains %s, dirs %s)", hv.uri, title,
                       list(domains), list(dirs))  # fmt: skip
    with audit.recorded(hv.uri, title, domains) as entry:
        journal = Journal(hv.uri, title, journal_directory, entry.domains, dirs)
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
        debuglog.LOG.debug("operation failed: %s: %r", title, err)
        if undo.committed:
            raise
        actions = list(journal.actions)
        skipped: list[str] = []
        undone_steps: list[str] = []
        failed = unwind(hv, actions, skipped=skipped, undone=undone_steps)
        if failed:
            # Keep only what failed in the journal: `virtdeck recover` tries those again.
            keep = {f.split(" (", 1)[0] for f in failed}
            journal.actions = [a for a in actions if a.label in keep]
            with contextlib.suppress(OperationError):
                journal._write()
            if isinstance(err, ConnectError) or not hv.alive:
                with _active_lock:
                    _lost.append(journal.path)
            raise OperationError(
                f"{title}: {_why(err)}; could not undo: {', '.join(failed)} "
                "('virtdeck recover' tries again)"
            ) from None
        journal.close()
        acted = len(undone_steps)
        undone = f"undid {acted} step(s)" if acted else "nothing had changed"
        if skipped:
            undone += f"; {'; '.join(skipped)}"
        if isinstance(err, Interrupted):
            raise Interrupted(f"{title}: {err}; {undone}") from None
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(f"{title}: interrupted; {undone}") from None
        if isinstance(err, VirtdeckError):
            raise type(err)(f"{err} ({undone})") from None
        raise
    else:
        journal.close()
        debuglog.LOG.debug("operation done: %s", title)
    finally:
        with _active_lock:
            _active[0] -= 1


_active = [0]
_active_lock = threading.Lock()
_lost: list[Path] = []  # journals this process kept because its host stopped answering


def kept_for_lost_hosts() -> list[Path]:
    """Journals of this process's operations that could not be undone because the connection
    to their host was lost (the CLI waits for the host and undoes them: `load` + `recover`)."""
    with _active_lock:
        return [p for p in _lost if p.exists()]


def load(path: Path) -> Pending:
    """One journal, validated (ValueError says what is wrong with it)."""
    return _parse(path, _read_journal(path))


def active() -> int:
    """How many operations are running in this process (the dashboard waits for them)."""
    return _active[0]


def _why(err: BaseException) -> str:
    return str(err) or type(err).__name__


def recover(hv: Hypervisor, item: Pending, skipped: list[str] | None = None) -> list[str]:
    """Roll back an interrupted operation of `hv`; returns what could not be undone.

    Each step first checks that what it would undo is still what the operation made (else it
    is skipped, the reason appended to `skipped`); every step that succeeded or was skipped
    is dropped from the journal at once, so a later recover retries only what failed."""
    start = time.monotonic()
    skipped = [] if skipped is None else skipped
    left = list(item.undo)

    def drop(action: UndoAction) -> None:
        left.remove(action)
        data = dict(item.raw, undo=[a.to_json() for a in left])
        with contextlib.suppress(OSError):
            write_journal(item.path, data)

    failed = unwind(hv, list(item.undo), live=False, skipped=skipped, done=drop)
    if not failed:
        with contextlib.suppress(FileNotFoundError):
            item.path.unlink()
    audit.write(
        audit.make_record(
            hv.uri,
            f"recovering: {item.title}",
            item.domains,
            [a.label for a in reversed(item.undo)] + skipped,
            "failed" if failed else "undone",
            f"could not undo: {', '.join(failed)}" if failed else "",
            time.monotonic() - start,
        )
    )
    return failed


# -- undo actions: data, idempotent ----------------------------------------------------------


@undo_kind("undefine")
def _undefine(
    hv: Hypervisor, uuid: str, name: str, keep_nvram: bool = False, snapshots: bool = False
) -> None:
    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return
    if hv.call(dom.name) != name:
        return  # that UUID is another domain's (its define is why ours failed): not ours
    if hv.call(dom.isActive):
        hv.call(dom.destroy)
    if snapshots:  # with its snapshot metadata (a migrated domain's, redefined on the target)
        hv.undefine_all(dom)
    else:
        hv.undefine(dom, keep_nvram=keep_nvram)
    hv.invalidate()


@undo_kind("delete_file", check=_check_file)
def _delete_file(hv: Hypervisor, path: str) -> None:
    from tui.core.storage import files_for

    files_for(hv, "undo", define_pools=False).delete(path)


@undo_kind("define", check=_check_define)
def _define(hv: Hypervisor, xml: str) -> None:
    hv.define(xml, what="restoring a definition")
    hv.invalidate()


@undo_kind("restore_mode", check=_check_mode)
def _restore_mode(hv: Hypervisor, path: str, mode: int) -> None:
    from tui.core.storage import files_for

    files = files_for(hv, "undo", define_pools=False)
    if files.lexists(path):
        files.restore_mode(path, mode)


@undo_kind("remove_private", check=_check_private)
def _remove_private(hv: Hypervisor, path: str) -> None:
    from tui.core.storage.local import remove_private

    remove_private(path)


@undo_kind("rename")
def _rename(hv: Hypervisor, uuid: str, name: str) -> None:
    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return
    old = hv.call(dom.name)
    if old != name:
        hv.rename(dom, old, name)
    hv.invalidate()


@undo_kind("start")
def _start(hv: Hypervisor, name: str) -> None:
    dom = hv.lookup(name)
    if not hv.call(dom.isActive):
        hv.call(dom.create, what=f"starting '{name}'")


@undo_kind("restore_memory")
def _restore_memory(hv: Hypervisor, domain: str, path: str, xml: str, running: bool) -> None:
    import libvirt

    dom = hv.lookup(domain)
    if hv.call(dom.isActive):
        return
    flags = libvirt.VIR_DOMAIN_SAVE_RUNNING if running else libvirt.VIR_DOMAIN_SAVE_PAUSED
    hv.call(hv.conn.restoreFlags, path, xml, flags, what=f"restoring '{domain}'")
