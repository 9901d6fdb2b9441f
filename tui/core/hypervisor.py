"""The libvirt backend: one connection to one hypervisor, its inventory, lifecycle and events.

This is where libvirt's untyped API lives. Everything leaving it is a frozen dataclass from
tui.core.models or a VirtdeckError subclass with a message an operator can act on.

Inventory cost: one `listAllDomains` and one bulk `getAllDomainStats` per refresh, whatever the
number of domains. Domain XML (disks, interfaces, metadata) is read once per domain and cached
until an event (or a virtdeck operation) says the domain changed.

Connections and threads. A `Hypervisor` owns one connection at a time (a `Gate`, one
generation: `generation` counts them); nothing else opens, replaces or closes it.

- One call in flight per connection. Every libvirt call made through `hv.conn` or an object
  obtained from it (domains, pools, volumes, snapshots, streams: `Guarded` proxies) holds the
  connection's gate for the call. libvirt's client fails only the thread running its I/O loop
  when keepalive closes a connection; a second thread in a call stays blocked and crashes the
  process when the daemon answers again (the segfaults of issue 19). With one call at a time,
  keepalive ends a call to a hung host after about 9 s, and the calls queued behind it fail at
  once with ConnectError.
- Replacing or closing a connection (`_adopt` on reconnect, `close`) retires its gate: no new
  call through it, objects from it raise ConnectError "connection ... lost" instead of reaching
  it, and it is closed (in a daemon thread) once the call in flight returns.
- Long calls get a connection of their own: `dedicated()` opens one (with keepalive) for
  `createXMLFrom`, held for the whole copy and closed after it, so the copy's progress poll and
  the dashboard keep the shared connection. Stream transfers (tui.core.transfer) go call by call
  through the gate, so a poll or a refresh fits between two chunks.

The threads that exist, and what each may touch:

- UI thread (Textual): no libvirt call at all; it reads frozen dataclasses from messages.
- one worker per host (tui.app `_load_host`): connects, reconnects (`ensure_connected`),
  subscribes, refreshes; the only thread that replaces a dashboard host's connection.
- operation workers (TUI) and the CLI's operation thread (tui.core.cancel): calls through
  `hv.conn` and `hv.call`; never replace or close the connection.
- progress polls (storage.remote `copy`) and the copy threads they wait for: calls through
  the shared and the dedicated connection respectively.
- libvirt-events (`start_event_loop`): runs libvirt's event loop, keepalive and the event
  callbacks. Callbacks only read what the client holds (`name()`, `UUIDString()`), mark the
  host lost and hand a DomainEvent to listeners; they never call the daemon, never close.
- libvirt-open / libvirt-close / libvirt-deregister: short daemon threads that bound a connect,
  a close or a deregistration to a hung host (abandoned after their deadline, never joined).
- fleet threads (tui.core.fleet `on_each`): one call per host with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import libvirt

from tui.core import debuglog, domxml
from tui.core.connection import (  # noqa: F401  (re-exported: the backend's public names)
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_URI,
    KEEPALIVE_COUNT,
    KEEPALIVE_INTERVAL,
    Gate,
    Guarded,
    _cannot_connect,
    _keepalive,
    _PendingOpen,
    default_uris,
    event_loop_started,
    is_local_uri,
    libvirt_message,
    no_answer,
    start_event_loop,
)
from tui.core.errors import (
    ConnectError,
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    UsageError,
    VirtdeckError,
)
from tui.core.events import EventCallback, Events
from tui.core.lifecycle import Lifecycle
from tui.core.models import (
    DiskInfo,
    DomainEvent,
    DomainInfo,
    DomainState,
    EventKind,
    HostInfo,
    InterfaceInfo,
    VirtdeckMeta,
    version_string,
)
from tui.core.text import CONTROL

_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)

_NOT_FOUND = (
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
)


@dataclass(frozen=True)
class _XmlFacts:
    """What the domain XML says, cached per UUID until the domain changes."""

    vcpus: int
    memory: int
    max_memory: int
    disks: tuple[DiskInfo, ...]
    interfaces: tuple[InterfaceInfo, ...]
    meta: VirtdeckMeta


class Hypervisor(Lifecycle, Events):
    """One libvirt connection. Safe to use from worker threads (libvirt connections are)."""

    def __init__(self, uri: str, conn: Any, *, demo: bool = False) -> None:
        self.uri = uri
        self.demo = demo
        self._generation = 0
        self._gate: Gate | None = None
        self._conn: Any = None
        if conn is not None:
            self._gate = Gate(uri, conn, 0)
            self._conn = Guarded(conn, self._gate)
        self._xml_cache: dict[str, _XmlFacts] = {}
        self._cpu_prev: dict[str, tuple[int, float]] = {}
        self._listeners: list[EventCallback] = []
        self._callback_ids: list[int] = []
        self._alive = conn is not None
        self._local: bool | None = None
        self._lock = threading.Lock()
        self._pending: _PendingOpen | None = None
        # Seconds this host gets to answer a call made through tui.core.fleet (set from the
        # settings); past it the host is reported as not answering.
        self.timeout = DEFAULT_CONNECT_TIMEOUT

    # -- connection -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, uri: str, *, demo: bool = False, timeout: float = DEFAULT_CONNECT_TIMEOUT
    ) -> Hypervisor:
        """Connect, or raise ConnectError; a host that does not answer within `timeout` s is
        unreachable (the connect is abandoned, never waited on forever)."""
        hv = cls.unconnected(uri, demo=demo)
        hv.try_connect(timeout)
        return hv

    @classmethod
    def unconnected(cls, uri: str, *, demo: bool = False) -> Hypervisor:
        """A hypervisor not connected yet (alive is False): try_connect()/reconnect() open it."""
        return cls(uri, None, demo=demo)

    def try_connect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Open (or re-open) the connection; ConnectError when it fails or does not answer in
        time. A connect still running from an earlier attempt is waited on, not started again."""
        pending = self._pending
        if pending is None:
            pending = self._pending = _PendingOpen(self.uri)
        if not pending.wait(timeout):
            raise no_answer(self.uri, timeout)
        self._pending = None
        if pending.error is not None or pending.conn is None:
            err = pending.error
            if err is None:  # pragma: no cover - old bindings returned None instead of raising
                raise ConnectError(f"cannot connect to {self.uri}")
            raise _cannot_connect(self.uri, err)
        self._adopt(pending.conn)

    def _adopt(self, conn: Any) -> None:
        _keepalive(conn)
        with self._lock:
            self._generation += 1
            old, self._gate = self._gate, Gate(self.uri, conn, self._generation)
            self._conn = Guarded(conn, self._gate)
            self._alive = True
            self._local = None
            self._xml_cache.clear()
            self._cpu_prev.clear()
        if old is not None:
            old.retire(1.0)  # closed once the call still in flight through it returns

    @property
    def generation(self) -> int:
        """Which connection this is: counts the connects (a reconnect is a new generation;
        objects from an older one raise ConnectError instead of reaching it)."""
        return self._generation

    def _shares_connection(self) -> bool:
        # libvirt's test driver without a daemon: a second open of a test:///file URI would be
        # a separate, empty hypervisor, and a call there never hangs.
        return self.uri.startswith("test:")

    @contextlib.contextmanager
    def dedicated(self, timeout: float | None = None) -> Iterator[Any]:
        """A connection of its own (with keepalive) for one long call (`createXMLFrom`, a
        migration), closed afterwards: the call holds that connection's gate for its whole
        duration while progress polls and the dashboard keep using the shared one."""
        if self._shares_connection():
            yield self.conn
            return
        wait = self.timeout if timeout is None else timeout
        pending = _PendingOpen(self.uri)
        if not pending.wait(wait):
            pending.abandon()
            raise no_answer(self.uri, wait)
        if pending.error is not None or pending.conn is None:
            if pending.error is None:  # pragma: no cover - old bindings returned None
                raise ConnectError(f"cannot connect to {self.uri}")
            raise _cannot_connect(self.uri, pending.error)
        _keepalive(pending.conn)
        gate = Gate(self.uri, pending.conn, self._generation)
        try:
            yield Guarded(pending.conn, gate)
        finally:
            gate.retire(1.0)

    @property
    def local(self) -> bool:
        """True when image paths in this hypervisor's XML are files on this machine: proved,
        not guessed from a path. The URI must reach the daemon over a local socket (no host,
        or the unix transport: `qemu+ssh://localhost/` is remote) and the daemon must report
        this machine's host name. Anything virtdeck reads or writes as a local file is gated
        on this (see tui.core.storage)."""
        if self._conn is None:
            return False  # not connected yet: nothing is proved
        if self._local is None:
            same = False
            if is_local_uri(self.uri):
                import socket  # (here: `virtdeck ls` starts faster without it)

                try:
                    same = self._conn.getHostname() == socket.gethostname()
                except (libvirt.libvirtError, ConnectError):
                    same = False
            self._local = same
        return self._local

    @property
    def conn(self) -> Any:
        """The raw virConnect, for the other backend modules of tui.core only."""
        if not self._alive:
            raise ConnectError(f"connection to {self.uri} lost")
        return self._conn

    @property
    def alive(self) -> bool:
        gate = self._gate
        if not self._alive or gate is None or gate.retired:
            return False  # (a retired connection may be being closed: not even isAlive on it)
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self, timeout: float = 2.0) -> None:
        """Deregister and close; gives up after `timeout` s on a host that does not answer."""
        if self._pending is not None:
            self._pending.abandon()
            self._pending = None
        gate = self._gate
        if gate is None:
            return
        start = time.monotonic()

        def run() -> None:
            with contextlib.suppress(ConnectError):
                self._deregister()

        t = threading.Thread(target=run, name=f"libvirt-deregister {self.uri}", daemon=True)
        t.start()
        t.join(timeout)
        gate.retire(max(0.1, timeout - (time.monotonic() - start)))

    def reconnect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> bool:
        """Open the URI again after the daemon went away; True once it answers (within
        `timeout` s; a connect still pending from the last try is waited on again)."""
        try:
            self.ensure_connected(timeout)
        except ConnectError:
            return False
        return True

    def ensure_connected(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Connect again if the connection is gone (ConnectError saying why if that fails),
        with the event subscriptions registered again on the new connection."""
        if self.alive:
            return
        was_open = self._conn is not None
        self.try_connect(timeout)
        if self._listeners:
            self._register()
        if was_open:
            self._emit(DomainEvent(self.uri, EventKind.RECONNECTED))

    def host_info(self) -> HostInfo:
        conn = self.conn
        try:
            hv_version: str | None = version_string(conn.getVersion())
        except libvirt.libvirtError:
            hv_version = None
        driver = conn.getType()
        return HostInfo(
            uri=self.uri,
            hostname=self.call(conn.getHostname),
            driver=driver,
            libvirt_version=version_string(conn.getLibVersion()),
            hypervisor_version=hv_version,
            demo=self.demo,
        )

    def virt_type(self) -> str:
        """'kvm' when the host can accelerate guests, else 'qemu' (TCG): probed, not assumed."""
        try:
            self.conn.getDomainCapabilities(None, None, None, "kvm", 0)
        except libvirt.libvirtError:
            return "qemu"
        return "kvm"

    def lib_version(self) -> int:
        return int(self.conn.getLibVersion())

    # -- errors: the one libvirt error translator -------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any, what: str = "") -> Any:
        """Call a libvirt method; its error becomes a VirtdeckError (see `translate`)."""
        debuglog.libvirt_call(self.uri, fn, args, what)
        try:
            return fn(*args)
        except libvirt.libvirtError as err:
            raise self.translate(err, what) from None

    @contextlib.contextmanager
    def translating(self, what: str = "") -> Iterator[None]:
        """`with hv.translating("deleting x"):` the block's libvirt errors are translated."""
        try:
            yield
        except libvirt.libvirtError as err:
            raise self.translate(err, what) from None

    def translate(self, err: libvirt.libvirtError, what: str = "") -> VirtdeckError:
        """libvirt's error code -> virtdeck's error type, with one operator-readable line.

        A lost connection is always marked, so the dashboard reconnects at once instead of
        waiting for the next failing call.
        """
        msg = libvirt_message(err)
        code = err.get_error_code()
        # Keepalive closing a connection fails the call in flight with VIR_ERR_INTERNAL_ERROR
        # ("connection closed due to keepalive timeout", libvirt 9.0): any error on a
        # connection that is no longer alive is a lost connection.
        if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN) or not self.alive:
            self._alive = False
            return ConnectError(f"connection to {self.uri} lost: {msg}")
        text = f"{what}: {msg}" if what else msg
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return NotFoundError(f"{what}: no such domain on {self.uri}" if what else msg)
        if code in _NOT_FOUND:
            return NotFoundError(text)
        if code == libvirt.VIR_ERR_OPERATION_INVALID:
            return StateError(text)
        return OperationError(text)

    # -- lookup -----------------------------------------------------------------------------

    def lookup(self, name: str) -> Any:
        """The raw virDomain for a name or UUID (backend modules only)."""
        conn = self.conn
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise self.translate(err, name) from None
        if len(name) == 36:
            try:
                return conn.lookupByUUIDString(name)
            except libvirt.libvirtError:
                pass
        raise NotFoundError(f"no domain named '{name}' on {self.uri} ('virtdeck ls' lists them)")

    def exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        return True

    # -- inventory --------------------------------------------------------------------------

    def invalidate(self, uuid: str | None = None) -> None:
        """Forget cached XML facts (of one domain, or all) after a change."""
        if uuid is None:
            self._xml_cache.clear()
        else:
            self._xml_cache.pop(uuid, None)

    def _facts(self, dom: Any, uuid: str) -> _XmlFacts:
        facts = self._xml_cache.get(uuid)
        if facts is None:
            root = domxml.parse(dom.XMLDesc(0))
            memory, max_memory = domxml.memory_bytes(root)
            facts = _XmlFacts(
                vcpus=domxml.vcpus(root),
                memory=memory,
                max_memory=max_memory,
                disks=domxml.disks(root),
                interfaces=domxml.interfaces(root),
                meta=domxml.read_meta(root),
            )
            self._xml_cache[uuid] = facts
        return facts

    def domains(self) -> list[DomainInfo]:
        """Every domain with state, size, CPU % and disks: two round trips per refresh whatever
        the number of domains (plus one XMLDesc per domain the first time or after a change).

        The bulk stats call lists every domain (active and inactive) with its state; the list
        call asks only for the transient ones, so persistence needs no call per domain.
        """
        conn = self.conn
        try:
            transient = {
                d.UUIDString()
                for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
            }
            # NOWAIT: a domain busy with a long job (snapshot, block commit, another tool's
            # call) gets its state and what needs no job, instead of stalling the whole
            # host's refresh for up to libvirt's 30 s job timeout.
            pairs = conn.getAllDomainStats(_STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
        except libvirt.libvirtError as err:
            raise self.translate(err, "listing domains") from None
        now = time.monotonic()
        out = []
        seen = set()
        for dom, st in pairs:
            uuid = dom.UUIDString()
            seen.add(uuid)
            try:
                info = self._domain_info(dom, uuid, st, now, persistent=uuid not in transient)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined between the list call and now
                raise self.translate(err, "listing domains") from None
            out.append(info)
        for uuid in set(self._cpu_prev) - seen:
            del self._cpu_prev[uuid]
        out.sort(key=lambda d: d.name)
        return out

    def domain(self, name: str) -> DomainInfo:
        dom = self.lookup(name)
        uuid = dom.UUIDString()
        try:
            stats = self.conn.domainListGetStats([dom], _STATS, 0)
            return self._domain_info(
                dom,
                uuid,
                stats[0][1] if stats else {},
                time.monotonic(),
                persistent=bool(dom.isPersistent()),
            )
        except libvirt.libvirtError as err:
            raise self.translate(err, name) from None

    def _domain_info(
        self, dom: Any, uuid: str, st: dict[str, Any], now: float, *, persistent: bool
    ) -> DomainInfo:
        facts = self._facts(dom, uuid)
        if "state.state" in st:
            state = DomainState.from_libvirt(st["state.state"])
        else:
            state = DomainState.from_libvirt(dom.state()[0])
        vcpus = int(st.get("vcpu.current", facts.vcpus))
        memory = int(st["balloon.current"]) * 1024 if "balloon.current" in st else facts.memory
        cpu = None
        if "cpu.time" in st and state.active:
            cpu_time = int(st["cpu.time"])
            prev = self._cpu_prev.get(uuid)
            if prev is not None and now > prev[1]:
                cpu = max(0.0, (cpu_time - prev[0]) / ((now - prev[1]) * 1e9 * vcpus) * 100)
            self._cpu_prev[uuid] = (cpu_time, now)
        else:
            self._cpu_prev.pop(uuid, None)
        disks = _with_block_stats(facts.disks, st, state.active)
        if self.local:  # no block stats (test driver), or none yet (a domain just started)
            disks = _with_file_allocation(disks)
        return DomainInfo(
            host=self.uri,
            name=dom.name(),
            uuid=uuid,
            state=state,
            vcpus=vcpus,
            memory_bytes=memory,
            max_memory_bytes=facts.max_memory,
            persistent=persistent,
            cpu_percent=cpu,
            disks=disks,
            interfaces=facts.interfaces,
            meta=facts.meta,
        )

    def xml(self, name: str, *, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        dom = self.lookup(name)
        return str(self.call(dom.XMLDesc, flags, what=name))


def _with_block_stats(
    disks: tuple[DiskInfo, ...], st: dict[str, Any], active: bool
) -> tuple[DiskInfo, ...]:
    # For a running domain libvirt's "allocation" is QEMU's highest written offset (0 on a fresh
    # overlay); "physical" is what the file takes on the host. Shut off, "allocation" is the
    # file's real allocation.
    key = "physical" if active else "allocation"
    count = int(st.get("block.count", 0))
    if not count:
        return disks
    by_target: dict[str, tuple[int | None, int | None]] = {}
    for i in range(count):
        name = st.get(f"block.{i}.name")
        if name and name not in by_target:
            alloc = st.get(f"block.{i}.{key}", st.get(f"block.{i}.allocation"))
            by_target[name] = (alloc, st.get(f"block.{i}.capacity"))
    return tuple(
        replace(d, allocation_bytes=by_target[d.target][0], capacity_bytes=by_target[d.target][1])
        if d.target in by_target
        else d
        for d in disks
    )


def _with_file_allocation(disks: tuple[DiskInfo, ...]) -> tuple[DiskInfo, ...]:
    """Where libvirt reported no allocation (no block stats: the test driver, or a domain
    whose QEMU has not answered for its disks yet), the file's real allocation."""
    out = []
    for d in disks:
        if d.allocation_bytes is None and d.path:
            with contextlib.suppress(OSError):
                d = replace(d, allocation_bytes=os.stat(d.path).st_blocks * 512)
        out.append(d)
    return tuple(out)


def validate_name(name: str, what: str = "name", why: str = "") -> str:
    """A name virtdeck will create (domain, snapshot): what libvirt and file names both accept."""
    if not _NAME_RE.fullmatch(name or ""):
        raise InvalidInputError(
            f"invalid {what} '{name}': use 1-63 letters, digits, '.', '_', '+' or '-', "
            f"starting with a letter or digit{why}"
        )
    return name


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}")


def validate_text(text: str, what: str, limit: int = 1000) -> str:
    """Free text virtdeck stores (a snapshot's description): one line of printable text (a
    newline or an escape sequence would forge lines in `snapshot ls` and the logs)."""
    bad = CONTROL.search(text)
    if bad:
        raise UsageError(
            f"the {what} holds a control character ({bad.group()!r} at {bad.start() + 1}); "
            "give one line of printable text"
        )
    if len(text) > limit:
        raise UsageError(f"the {what} is {len(text)} characters long; at most {limit}")
    return text
