"""Reaching a hypervisor: URIs and locality, libvirt's event loop, bounded connects, keepalive.

A connect to a host that does not answer (a stopped daemon, an address that drops packets)
would block for minutes inside libvirt: `_PendingOpen` runs it in a daemon thread that the
caller waits on with a deadline and abandons after it (a late success is adopted by the next
reconnect). Events and keepalive only work on connections opened after the event
implementation is registered (`start_event_loop`), so every face registers it first.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from typing import Any

import libvirt

from tui.core.errors import ConnectError

DEFAULT_URI = "qemu:///system"

# A host that has not answered a connect (or a refresh) within this many seconds is unreachable.
DEFAULT_CONNECT_TIMEOUT = 10.0

# Keepalive: a ping every 3 s, the connection closed by libvirt after 2 unanswered ones (about
# 9 s). Only remote-driver connections (qemu:///system included: the remote driver over a unix
# socket) take it, and only when opened after the event implementation was registered.
KEEPALIVE_INTERVAL = 3
KEEPALIVE_COUNT = 2

# libvirt prints every error on stderr unless a handler is registered; virtdeck reports its own.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_REMOTE_TRANSPORTS = {"ssh", "libssh", "libssh2", "tcp", "tls", "ext"}


def is_local_uri(uri: str) -> bool:
    """True when the hypervisor's image paths are files on this machine.

    `qemu:///system`, `qemu+unix:///system`, `test:///path`: local. `qemu+ssh://host/system`,
    `qemu://host/system` (TLS): remote, whatever the host name.
    """
    from urllib.parse import urlsplit  # (here: `virtdeck ls` starts faster without it)

    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if transport == "unix":
        return True
    if transport in _REMOTE_TRANSPORTS:
        return False
    return not parts.netloc


def default_uris(cli_uris: Iterable[str] | None = None) -> list[str]:
    """-c/--connect wins, then LIBVIRT_DEFAULT_URI, then qemu:///system (virsh's order)."""
    uris = [u for u in (cli_uris or []) if u]
    if uris:
        return list(dict.fromkeys(uris))
    return [os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI]


_loop_lock = threading.Lock()
_loop_started = False


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (idempotent).

    Must run before any connection is opened: libvirt (9.0) delivers events and keepalive only
    on connections opened after the implementation was registered. The CLI and the dashboard
    both call it first thing.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def event_loop_started() -> bool:
    return _loop_started


class _PendingOpen:
    """`libvirt.open` in a daemon thread, so a caller can stop waiting for it.

    A connect to a stopped daemon blocks forever inside libvirt (the kernel accepts the socket,
    the handshake never answers); the thread is abandoned then and its result, if it ever
    comes, is adopted by the next reconnect() or closed.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.done = threading.Event()
        self.conn: Any = None
        self.error: libvirt.libvirtError | None = None
        self.abandoned = False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name=f"libvirt-open {uri}", daemon=True).start()

    def _run(self) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            self.error = err
            conn = None
        with self._lock:
            self.conn = conn
            self.done.set()
            close = self.abandoned and conn is not None
        if close:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
            conn = self.conn if self.done.is_set() else None
            self.conn = None
        if conn is not None:
            _close_bounded(conn, 1.0)


def _close_bounded(conn: Any, timeout: float) -> None:
    """conn.close() sends an RPC: on a hung host it would never return."""

    def run() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    t = threading.Thread(target=run, name="libvirt-close", daemon=True)
    t.start()
    t.join(timeout)


def no_answer(uri: str, timeout: float) -> ConnectError:
    return ConnectError(
        f"{uri}: no answer within {timeout:g} s (host down, daemon stopped, "
        "or a network dropping packets?)"
    )


def _cannot_connect(uri: str, err: libvirt.libvirtError) -> ConnectError:
    return ConnectError(
        f"cannot connect to {uri}: {libvirt_message(err)} "
        f"(is libvirtd running? try 'virsh -c {uri} list', another -c URI, "
        "or 'virtdeck --demo')"
    )


def libvirt_message(err: libvirt.libvirtError) -> str:
    msg = err.get_error_message() or str(err)
    return " ".join(msg.split())


# -- one call in flight per connection --------------------------------------------------------

# Methods that read what the client already holds (no round trip to the daemon): they never
# wait for the gate, so an event callback or a name in an error message cannot stall behind a
# call to a hung host.
_LOCAL = frozenset({"UUIDString", "UUID", "name", "connect", "c_pointer", "isAlive", "key"})


class Gate:
    """One libvirt connection and the right to call through it: one call in flight at a time.

    libvirt (9.0; not checked on other releases) fails only the thread running the client's I/O loop
    when keepalive closes a connection; a second thread in a call on the same connection stays
    blocked (no close callback either) until the daemon answers again, and then crashes the
    process (SIGSEGV, reproduced with two `getHostname` calls on a SIGSTOPped daemon). So every
    call through a connection holds its gate: with one call in flight keepalive ends it after
    about 9 s, and the calls queued behind it find the connection closed and fail at once.

    A gate is one generation of a hypervisor's connection: `retire()` (a reconnect replacing
    it, or close) marks it closed at once, so objects obtained through it (domains, pools,
    volumes, streams, all wrapped by `Guarded`) raise ConnectError instead of reaching a
    closed connection, and the connection itself is closed once the call in flight returns.
    """

    def __init__(self, uri: str, conn: Any, generation: int) -> None:
        self.uri = uri
        self.raw = conn
        self.generation = generation
        self.lock = threading.RLock()
        self.retired = False

    def lost(self) -> ConnectError:
        return ConnectError(f"connection to {self.uri} lost")

    def enter(self) -> None:
        """Take the gate for one call: ConnectError when the connection was retired or died
        while this thread waited for the call ahead of it."""
        self.lock.acquire()
        if self.retired or not _is_alive(self.raw):
            self.lock.release()
            raise self.lost()

    def retire(self, timeout: float = 1.0) -> None:
        """No new call through this connection; it is closed (deregistered first by the
        caller if needed) as soon as the call in flight returns, waited on for `timeout` s,
        in a daemon thread after that (a call to a hung host returns when keepalive ends it)."""
        self.retired = True
        conn, self.raw = self.raw, None
        if conn is None:
            return

        def run() -> None:
            with self.lock, contextlib.suppress(libvirt.libvirtError):
                conn.close()

        t = threading.Thread(target=run, name=f"libvirt-close {self.uri}", daemon=True)
        t.start()
        t.join(timeout)


def _is_alive(conn: Any) -> bool:
    if conn is None:
        return False
    try:
        return bool(conn.isAlive()) if hasattr(conn, "isAlive") else True
    except libvirt.libvirtError:
        return False


class Guarded:
    """A libvirt object (connection, domain, pool, volume, stream) seen through its gate:
    each method call holds the gate, and what it returns is guarded too."""

    __slots__ = ("_obj", "_gate")

    def __init__(self, obj: Any, gate: Gate) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_gate", gate)

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._obj, attr)
        if not callable(value) or attr.startswith("_"):
            return value
        gate = self._gate
        if attr in _LOCAL:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            gate.enter()
            try:
                out = value(*[_unwrap(a) for a in args], **kwargs)
            finally:
                gate.lock.release()
            return _wrap(out, gate)

        call.__name__ = attr  # (what the debug log names: tui.core.debuglog)
        call.__self__ = self  # type: ignore[attr-defined]
        return call

    def __eq__(self, other: object) -> bool:
        return bool(self._obj == _unwrap(other))

    def __hash__(self) -> int:
        return hash(self._obj)

    def __repr__(self) -> str:
        return f"Guarded({self._obj!r})"


_WRAPPED = (
    libvirt.virConnect, libvirt.virDomain, libvirt.virStoragePool, libvirt.virStorageVol,
    libvirt.virStream, libvirt.virDomainSnapshot, libvirt.virNetwork,
)  # fmt: skip


def _wrap(value: Any, gate: Gate) -> Any:
    if isinstance(value, _WRAPPED):
        return Guarded(value, gate)
    if isinstance(value, list):
        return [_wrap(v, gate) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v, gate) for v in value)
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Guarded):
        return value._obj
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _keepalive(conn: Any) -> None:
    # Remote drivers notice a dead or hung daemon only through keepalive: libvirt then closes the
    # connection and fails the calls waiting on it. Needs the event loop registered before
    # open; local drivers (test:///) refuse it, which is fine.
    if _loop_started:
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
