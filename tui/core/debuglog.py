"""The debug log: what virtdeck did, step by step, for whoever must find out why an operation
misbehaved on a host (the audit trail says only what was done and how it ended).

Off unless asked for (`virtdeck --debug …` or `VIRTDECK_DEBUG=1`). Then every plan run
(`ops.running`), each step journalled and each undo, every libvirt call that changes
something, each definition as a diff against the one it replaces, and each child process's
argv and exit status go to `$XDG_STATE_HOME/virtdeck/debug.log` (0600 in a 0700 directory,
rotated at 4 MiB, 3 old files kept); `virtdeck log --debug` shows its tail.

Secrets are never written: option values that carry them (passwords, injected SSH keys,
`password:`/`file:` specs of virt-customize) are replaced by `<secret>`, a definition's
`passwd` attributes too; the contents of files virtdeck writes (user-data, keys) are never
logged, only their paths.
"""

from __future__ import annotations

import difflib
import logging
import logging.handlers
import os
import re
from collections.abc import Sequence
from pathlib import Path

from tui.core.paths import state_dir

LOG = logging.getLogger("virtdeck")
MAX_BYTES = 4 << 20
BACKUPS = 3
SECRET = "<secret>"
#: Options whose value is a secret (or holds one): the value is never logged.
SECRET_OPTIONS = frozenset(
    {"--root-password", "--password", "--passwd", "--ssh-inject", "--user-data", "--secret"}
)
_SECRET_WORDS = re.compile(r"(password|passwd|secret|token|key)", re.IGNORECASE)
_PASSWD_ATTR = re.compile(r"""(passwd\s*=\s*)(["'])[^"']*\2""")


def log_path() -> Path:
    return state_dir() / "debug.log"


def wanted(flag: bool = False) -> bool:
    """Asked for on the command line or by `VIRTDECK_DEBUG` (1, yes, true, on)."""
    env = os.environ.get("VIRTDECK_DEBUG", "").strip().lower()
    return flag or env in ("1", "yes", "true", "on")


def enable() -> Path:
    """Start writing the debug log (idempotent); returns its path."""
    path = log_path()
    for handler in LOG.handlers:
        if getattr(handler, "_virtdeck", False):
            return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # (an older file made under another umask)
    os.close(fd)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
    )
    handler._virtdeck = True  # type: ignore[attr-defined]
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(threadName)s %(levelname)s %(message)s")
    )
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG)
    LOG.propagate = False
    return path


def disable() -> None:
    for handler in list(LOG.handlers):
        if getattr(handler, "_virtdeck", False):
            LOG.removeHandler(handler)
            handler.close()
    LOG.setLevel(logging.NOTSET)


def on() -> bool:
    return LOG.isEnabledFor(logging.DEBUG) and bool(LOG.handlers)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv with the values of secret-bearing options replaced by `<secret>`."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        arg = str(arg)
        if hide_next:
            out.append(SECRET)
            hide_next = False
            continue
        opt, eq, _value = arg.partition("=")
        if opt.startswith("-") and (opt in SECRET_OPTIONS or _SECRET_WORDS.search(opt)):
            if eq:
                out.append(f"{opt}={SECRET}")
            else:
                out.append(arg)
                hide_next = True
            continue
        if arg.startswith(("password:", "file:")) or "PRIVATE KEY" in arg:
            out.append(SECRET)
            continue
        out.append(arg)
    return out


def redact_xml(xml: str) -> str:
    return _PASSWD_ATTR.sub(lambda m: f"{m.group(1)}{m.group(2)}{SECRET}{m.group(2)}", xml)


def xml_diff(before: str | None, after: str | None, label: str) -> str:
    """A unified diff of two definitions (None: there was none), secrets removed."""
    old = redact_xml(before or "").splitlines()
    new = redact_xml(after or "").splitlines()
    lines = difflib.unified_diff(old, new, f"{label} (before)", f"{label} (after)", lineterm="")
    return "\n".join(lines) or "(no change)"


def started(argv: Sequence[str], pid: int) -> None:
    if on():
        LOG.debug("run [pid %d] %s", pid, " ".join(redact_argv(argv)))


def exited(pid: int, status: int | None) -> None:
    if on():
        LOG.debug("exit [pid %d] status %s", pid, status)


#: libvirt methods that only read (by name prefix): the others change something and are logged.
_READS = (
    "lookup",
    "list",
    "get",
    "XMLDesc",
    "info",
    "is",
    "has",
    "num",
    "UUID",
    "name",
    "state",
    "block",
    "snapshotLookup",
    "snapshotCurrent",
    "snapshotNum",
    "snapshotList",
    "interface",
    "memoryStats",
    "vcpus",
    "OSType",
    "ID",
    "hostname",
    "autostart",
    "capabilities",
    "storagePoolLookup",
    "storageVolLookup",
    "jobInfo",
    "jobStats",
    "path",
    "key",
    "connect",
    "parent",
    "children",
    "domain",
    "listAll",
    "close",
    "ref",
    "pool",
)


def libvirt_call(uri: str, fn: object, args: tuple[object, ...], what: str) -> None:
    """Log a libvirt call that changes something (XML arguments are logged by `define`)."""
    if not on():
        return
    name = getattr(fn, "__name__", "?")
    if name.startswith(_READS):
        return
    shown = [a if isinstance(a, int) else "<xml>" if "<" in str(a) else str(a)[:200] for a in args]
    owner = getattr(getattr(fn, "__self__", None), "name", None)
    target = ""
    if callable(owner):
        try:
            target = f"{owner()}."
        except Exception:  # (a handle whose domain is gone has no name to show)
            target = ""
    LOG.debug("libvirt %s %s%s(%s)%s", uri, target, name, ", ".join(map(str, shown)),
              f" [{what}]" if what else "")  # fmt: skip
