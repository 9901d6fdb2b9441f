"""The connection ownership model (tui.core.hypervisor's docstring) without a daemon: one call
in flight per connection, objects from a replaced connection refused, close after the call."""

from __future__ import annotations

import threading
import time

import libvirt
import pytest

from tui.core.connection import Gate, Guarded
from tui.core.errors import ConnectError
from tui.core.hypervisor import Hypervisor


def test_objects_from_a_replaced_connection_raise_connection_lost(test_hv: Hypervisor) -> None:
    dom = test_hv.lookup(test_hv.domains()[0].name)
    assert isinstance(dom, Guarded) and dom.info()  # usable while its connection is current
    generation = test_hv.generation
    test_hv._adopt(libvirt.open(test_hv.uri))  # what a reconnect does
    assert test_hv.generation == generation + 1
    with pytest.raises(ConnectError, match="lost"):
        dom.info()
    assert test_hv.domains()  # the new connection works
    assert dom.name()  # what the client holds needs no call (event callbacks, messages)


def test_lists_and_tuples_come_back_guarded_and_go_in_unwrapped(test_hv: Hypervisor) -> None:
    conn = test_hv.conn
    doms = conn.listAllDomains(0)
    assert doms and all(isinstance(d, Guarded) for d in doms)
    stats = conn.domainListGetStats(doms, libvirt.VIR_DOMAIN_STATS_STATE, 0)  # proxies unwrapped
    assert len(stats) == len(doms) and isinstance(stats[0][0], Guarded)
    assert {s[0].UUIDString() for s in stats} == {d.UUIDString() for d in doms}


def test_one_call_at_a_time_and_close_waits_for_it(test_uri: str) -> None:
    gate = Gate(test_uri, libvirt.open(test_uri), 0)
    conn = Guarded(gate.raw, gate)
    order: list[str] = []

    gate.enter()  # a call in flight (say, blocked on a hung host) holds the gate
    t = threading.Thread(target=lambda: order.append(f"second {conn.getHostname()}"))
    t.start()
    time.sleep(0.2)
    assert order == []  # the second call waits for the first
    order.append("first done")
    gate.lock.release()
    t.join(5)
    assert len(order) == 2 and order[1].startswith("second ")

    gate.enter()  # another call in flight while the connection is retired
    gate_closer = threading.Thread(target=gate.retire, args=(0.1,))
    gate_closer.start()
    gate_closer.join(2)
    assert gate.retired and gate.raw is None  # no new call from now on
    closing = [th for th in threading.enumerate() if th.name.startswith("libvirt-close")]
    assert closing and closing[0].is_alive()  # the close waits for the call in flight
    gate.lock.release()
    closing[0].join(5)
    assert not closing[0].is_alive()
    with pytest.raises(ConnectError, match="lost"):
        conn.getHostname()
