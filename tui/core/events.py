"""libvirt's domain and connection events for one hypervisor, handed to listeners as
DomainEvent values (a mixin of tui.core.hypervisor.Hypervisor, which owns the connection).

Events only arrive on connections opened after libvirt's event implementation is registered
(tui.core.connection.start_event_loop). Registering and deregistering talk to the daemon, so
they run on the host's own worker, and `detach` bounds the wait for a daemon that hangs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import libvirt

from tui.core.errors import VirtdeckError
from tui.core.models import DomainEvent, EventKind

EventCallback = Callable[[DomainEvent], None]

_LIFECYCLE = (
    "defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
    "pmsuspended", "crashed",
)  # fmt: skip


class Events:
    """Subscriptions to one connection's events; the class using it owns `_conn`."""

    uri: str
    _conn: Any
    _alive: bool
    _listeners: list[EventCallback]
    _callback_ids: list[int]

    def invalidate(self, uuid: str | None = None) -> None:
        raise NotImplementedError

    def subscribe(self, callback: EventCallback) -> None:
        """Call `callback` (on libvirt's event thread) for lifecycle and connection events.

        Needs start_event_loop() before open(). Registering talks to the daemon: call it from
        the host's own worker, not from a UI thread. Subscribing twice is a no-op.
        """
        if callback in self._listeners:
            return
        self._listeners.append(callback)
        if len(self._listeners) == 1 and self._conn is not None:
            self._register()

    def subscribed(self, callback: EventCallback) -> bool:
        return callback in self._listeners

    def detach(self, callback: EventCallback, timeout: float = 1.0) -> None:
        """Stop calling `callback` at once; deregister from the daemon within `timeout` s."""
        if callback in self._listeners:
            self._listeners.remove(callback)
        if not self._listeners and self._callback_ids:
            t = threading.Thread(target=self._deregister, name="libvirt-deregister", daemon=True)
            t.start()
            t.join(timeout)

    def unsubscribe(self, callback: EventCallback) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)
        if not self._listeners:
            self._deregister()

    def _emit(self, event: DomainEvent) -> None:
        for cb in list(self._listeners):
            cb(event)

    def _register(self) -> None:
        conn = self._conn

        def lifecycle(_c: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
            uuid = dom.UUIDString()
            self.invalidate(uuid)
            name = _LIFECYCLE[event] if 0 <= event < len(_LIFECYCLE) else str(event)
            self._emit(DomainEvent(self.uri, EventKind.LIFECYCLE, dom.name(), uuid, name))

        def changed(_c: Any, dom: Any, *_rest: Any) -> None:
            uuid = dom.UUIDString()
            self.invalidate(uuid)
            self._emit(DomainEvent(self.uri, EventKind.LIFECYCLE, dom.name(), uuid, "changed"))

        def closed(_c: Any, reason: int, _o: Any) -> None:
            self._alive = False
            self._callback_ids = []
            self._emit(DomainEvent(self.uri, EventKind.CONNECTION_LOST, detail=str(reason)))

        ids = [
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
            )
        ]
        for event_id in (
            libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
        ):
            # The test driver does not implement every event.
            with contextlib.suppress(libvirt.libvirtError):
                ids.append(conn.domainEventRegisterAny(None, event_id, changed, None))
        self._callback_ids = ids
        with contextlib.suppress(libvirt.libvirtError):
            conn.registerCloseCallback(closed, None)

    def _deregister(self) -> None:
        # A lost connection (ConnectError from its gate) has no registrations left to undo.
        for cid in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError, VirtdeckError):
                self._conn.domainEventDeregisterAny(cid)
        self._callback_ids = []
        with contextlib.suppress(libvirt.libvirtError, VirtdeckError):
            self._conn.unregisterCloseCallback()
