"""Settings: `$XDG_CONFIG_HOME/virtdeck/config.toml` loaded into one frozen value.

    poll_interval = 2          # seconds between statistics polls (events update at once)
    backup_dir = "~/virtdeck-templates"    # template XML backups

    [timeouts]
    connect = 10               # a host that does not answer a connect within this is unreachable
    answer = 10                # a refresh taking longer marks the host "no answer"
    shutdown = 60              # graceful shutdown: wait this long before offering force off
    undo = 60                  # CLI: an operation cut off by a lost host waits this long for
                               # the host to answer again, to undo what it left

    [hosts]                    # saved hosts: `virtdeck -H kvm2`, `virtdeck --all-hosts`
    local = "qemu:///system"
    kvm2 = "qemu+ssh://root@kvm2/system"

    [keys]                     # key bindings by binding id (comma-separated keys)
    "domain.start" = "S"

A missing file means the defaults. An invalid one is a ConfigError whose one-line message
names the file and the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tui.core import private
from tui.core.errors import ConfigError, InvalidInputError
from tui.core.hypervisor import DEFAULT_CONNECT_TIMEOUT


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "virtdeck" / "config.toml"


@dataclass(frozen=True)
class SavedHost:
    name: str
    uri: str


@dataclass(frozen=True)
class KeyBinding:
    """A key binding override: binding id (e.g. "domain.start") → keys ("S" or "S,ctrl+s")."""

    binding_id: str
    keys: str
    line: int  # in the config file, for error messages about unknown ids


@dataclass(frozen=True)
class Settings:
    hosts: tuple[SavedHost, ...] = ()
    poll_interval: float = 2.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    answer_timeout: float = DEFAULT_CONNECT_TIMEOUT
    shutdown_timeout: float = 60.0
    undo_wait: float = 60.0
    backup_dir: Path | None = None
    keys: tuple[KeyBinding, ...] = ()
    source: Path | None = None

    def host(self, name: str) -> SavedHost:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none"
        where = self.source or config_path()
        raise InvalidInputError(f"no saved host named '{name}' in {where} (saved: {known})")

    @property
    def keymap(self) -> dict[str, str]:
        return {k.binding_id: k.keys for k in self.keys}

    def check_binding_ids(self, known: set[str]) -> None:
        """ConfigError naming the line of the first [keys] entry that is not a binding id."""
        for k in self.keys:
            if k.binding_id not in known:
                raise ConfigError(
                    f"{self.source}, line {k.line}: unknown binding id '{k.binding_id}' "
                    f"(known: {', '.join(sorted(known))})"
                )


_TOP = {"poll_interval", "backup_dir", "timeouts", "hosts", "keys"}
_TIMEOUTS = {
    "connect": "connect_timeout",
    "answer": "answer_timeout",
    "shutdown": "shutdown_timeout",
    "undo": "undo_wait",
}
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_KEY = re.compile(r"[A-Za-z0-9_+\-]+(,[A-Za-z0-9_+\-]+)*")


MAX_CONFIG_BYTES = 1 << 20  # a config.toml is a few KiB; anything bigger is refused unread


def load_settings(path: Path | None = None) -> Settings:
    """The settings from `path` (default: config_path()); defaults when the file is missing."""
    path = path or config_path()
    try:
        text = private.read_bounded(path, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        return Settings(source=path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror}") from None
    return parse_settings(text, path)


def parse_settings(text: str, path: Path) -> Settings:
    import tomllib  # (only when there is a file: `virtdeck ls` starts faster)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line N, column M)" or "(at end of document)"
        msg = str(err).replace("(at end of document)", f"(at line {text.count(chr(10)) + 1})")
        raise ConfigError(f"{path}: invalid TOML: {msg}") from None
    lines = text.splitlines()

    def fail(key: str, why: str, table: str | None = None) -> ConfigError:
        return ConfigError(f"{path}, line {_line_of(lines, key, table)}: {why}")

    for key in data:
        if key not in _TOP:
            raise fail(key, f"unknown setting '{key}' (known: {', '.join(sorted(_TOP))})")
    values: dict[str, Any] = {"source": path}
    if "poll_interval" in data:
        values["poll_interval"] = _seconds(data["poll_interval"], "poll_interval", fail)
    if "backup_dir" in data:
        if not isinstance(data["backup_dir"], str) or not data["backup_dir"]:
            raise fail("backup_dir", "backup_dir must be a directory path (a string)")
        values["backup_dir"] = Path(data["backup_dir"]).expanduser()
    timeouts = _table(data, "timeouts", fail)
    for key, value in timeouts.items():
        if key not in _TIMEOUTS:
            known = ", ".join(_TIMEOUTS)
            raise fail(key, f"unknown timeout '{key}' (known: {known})", "timeouts")
        values[_TIMEOUTS[key]] = _seconds(value, f"timeouts.{key}", fail, key, "timeouts")
    hosts = []
    for name, uri in _table(data, "hosts", fail).items():
        if not _HOST_NAME.fullmatch(name):
            why = f"invalid host name '{name}' (letters, digits, '.', '_', '-')"
            raise fail(name, why, "hosts")
        if not isinstance(uri, str) or ":" not in uri:
            raise fail(name, f"host '{name}' needs a libvirt URI string", "hosts")
        hosts.append(SavedHost(name, uri))
    values["hosts"] = tuple(hosts)
    keys = []
    for binding_id, spec in _table(data, "keys", fail).items():
        if not isinstance(spec, str) or not _KEY.fullmatch(spec.replace(" ", "")):
            why = f'keys for \'{binding_id}\' must be like "S" or "S,ctrl+s"'
            raise fail(binding_id, why, "keys")
        line = _line_of(lines, binding_id, "keys")
        keys.append(KeyBinding(binding_id, spec.replace(" ", ""), line))
    values["keys"] = tuple(keys)
    return Settings(**values)


def _table(data: dict[str, Any], name: str, fail: Any) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise fail(name, f"'{name}' must be a table ([{name}])")
    return table


def _seconds(value: Any, what: str, fail: Any, key: str = "", table: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise fail(key or what, f"{what} must be a number of seconds between 0 and 3600", table)
    return float(value)


def _line_of(lines: list[str], key: str, table: str | None = None) -> int:
    """1-based line where `key` is set (inside [table] when given); 1 when not found."""
    in_table = table is None
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    header = re.compile(r"^\s*\[([^\]]+)\]")
    for i, line in enumerate(lines, 1):
        m = header.match(line)
        if m:
            if table is not None:
                in_table = m.group(1).strip() == table
            elif key == m.group(1).strip():
                return i
            continue
        if in_table and pattern.match(line):
            return i
    return 1
