"""The dashboard with many hosts and many rows (test driver): the header folds to one summary
line, the table and the tabs keep their room, a filter keystroke shows its rows, names sort
naturally, and a poll that brings nothing new rewrites nothing.

Times are measured in benchmarks/bench_idle.py and bench_filter.py; here only behaviour."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import Static, TabbedContent, Tabs

from tests.waiting import wait_for
from tui.app import VirtdeckApp
from tui.core.hypervisor import Hypervisor
from tui.core.models import natural_key
from tui.core.testdriver import DomainSpec, node_xml
from tui.widgets.domains import DomainsTable

STATES = ("running", "shutoff", "shutoff")


def fleet(tmp_path: Path, hosts: int, per_host: int) -> list[Hypervisor]:
    hvs = []
    for h in range(1, hosts + 1):
        path = tmp_path / f"h{h}.xml"
        specs = [DomainSpec(f"h{h}-vm{i}", STATES[i % 3]) for i in range(1, per_host + 1)]
        path.write_text(node_xml(specs))
        hvs.append(Hypervisor.open(f"test://{path}"))
    return hvs


@pytest.fixture
def thirty(tmp_path: Path) -> Iterator[list[Hypervisor]]:
    hvs = fleet(tmp_path, 30, 100)
    yield hvs
    for hv in hvs:
        hv.close()


def header_lines(app: VirtdeckApp) -> int:
    return app.screen.query_one("#hosts", Static).size.height


def shown_names(table: DomainsTable) -> list[str]:
    return [table.domains[k].name for k in table._order]


async def test_thirty_hosts_fit_the_screen_and_filter(thirty: list[Hypervisor]) -> None:
    app = VirtdeckApp(thirty, poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        table = app.screen.query_one(DomainsTable)
        await wait_for(pilot, lambda: table.row_count == 3000)
        await pilot.pause()
        assert 1 <= header_lines(app) <= 3
        summary = str(app.screen.query_one("#hosts", Static).render())
        assert "30 hosts" in summary and "30 answering" in summary and "3000 domains" in summary
        # the table and the tabs are on the screen, with room
        screen = app.screen.region
        assert table.region.height >= 6 and screen.contains_region(table.region)
        tabs = app.screen.query_one(TabbedContent).query_one(Tabs)
        assert tabs.region.height >= 1 and screen.contains_region(tabs.region)
        assert tabs.region.y > table.region.y

        # a filter keystroke by keystroke: the rows of host 17 named vm5*
        await pilot.press("slash", *"h17-vm5")
        await pilot.pause()
        names = shown_names(table)
        assert names == ["h17-vm5"] + [f"h17-vm{i}" for i in range(50, 60)]
        assert table.row_count == 11
        await pilot.press("escape")
        await pilot.pause()
        assert table.row_count == 3000

        # `h` lists the hosts under the summary line, and folds them again
        await pilot.press("h")
        await pilot.pause()
        listed = str(app.screen.query_one("#hosts", Static).render())
        assert all(hv.uri in listed for hv in thirty) and header_lines(app) == 31
        await pilot.press("h")
        await pilot.pause()
        assert header_lines(app) == 1

        # `o` reaches the Host column: rows grouped by host, hosts and names in natural order
        while table.sort_column != "host":
            await pilot.press("o")
        await pilot.pause()
        firsts = shown_names(table)[:102]
        assert firsts[:3] == ["h1-vm1", "h1-vm2", "h1-vm3"] and firsts[100:] == ["h2-vm1", "h2-vm2"]


def test_natural_key_orders_numbers_as_numbers() -> None:
    names = ["vm50", "vm5", "VM6", "vm10", "vm", "web-2", "web-10", "vm5a"]
    assert sorted(names, key=natural_key) == [
        "vm", "vm5", "vm5a", "VM6", "vm10", "vm50", "web-2", "web-10",
    ]  # fmt: skip


async def test_names_sort_naturally_in_the_table(tmp_path: Path) -> None:
    path = tmp_path / "node.xml"
    path.write_text(node_xml([DomainSpec(n) for n in ("vm50", "vm5", "vm6", "vm51", "vm10")]))
    hv = Hypervisor.open(f"test://{path}")
    app = VirtdeckApp([hv], poll_interval=3600)
    try:
        async with app.run_test(size=(140, 45)) as pilot:
            table = app.screen.query_one(DomainsTable)
            await wait_for(pilot, lambda: table.row_count == 5)
            assert shown_names(table) == ["vm5", "vm6", "vm10", "vm50", "vm51"]
            table.sort_by("name")  # again: reversed
            await pilot.pause()
            assert shown_names(table) == ["vm51", "vm50", "vm10", "vm6", "vm5"]
    finally:
        hv.close()


async def test_a_poll_that_brings_nothing_new_rewrites_nothing(tmp_path: Path) -> None:
    hvs = fleet(tmp_path, 4, 30)
    app = VirtdeckApp(hvs, poll_interval=0.05)
    try:
        async with app.run_test(size=(140, 45)) as pilot:
            table = app.screen.query_one(DomainsTable)
            await wait_for(pilot, lambda: table.row_count == 120)
            await app.workers.wait_for_complete()
            await pilot.pause()
            cells, rebuilds, polls = table.cell_updates, table.rebuilds, app.polls
            header = app.screen._hosts_text
            # every host answers a few times more, with the same domains
            await wait_for(pilot, lambda: app.polls >= polls + 12)
            assert (table.cell_updates, table.rebuilds) == (cells, rebuilds)

            # a change: one domain of one host goes off; only its changed cells are written
            hvs[2].destroy("h3-vm3")
            app.refresh_inventory(hvs[2].uri)
            await wait_for(pilot, lambda: table.cell_updates > cells)
            await pilot.pause()
            assert table.rebuilds == rebuilds  # sorted by name: no row moved
            assert table.cell_updates - cells == 1  # the state cell, nothing else
            assert app.screen._hosts_text.split("read")[0] == header.split("read")[0]
    finally:
        for hv in hvs:
            hv.close()


async def test_a_host_without_running_domains_shown_is_polled_slower(tmp_path: Path) -> None:
    path = tmp_path / "node.xml"
    path.write_text(node_xml([DomainSpec("off1"), DomainSpec("on1", "running")]))
    hv = Hypervisor.open(f"test://{path}")
    app = VirtdeckApp([hv], poll_interval=0.5)
    try:
        async with app.run_test(size=(140, 45)) as pilot:
            table = app.screen.query_one(DomainsTable)
            await wait_for(pilot, lambda: table.row_count == 2)
            assert app.main.shows_running(hv.uri, measured=False)
            table.set_filter("off")  # the running domain is not shown: its CPU % is not needed
            await pilot.pause()
            assert not app.main.shows_running(hv.uri, measured=False)
            await wait_for(pilot, lambda: app.hosts[hv.uri].timer is not None)
            app.refresh_inventory(hv.uri)
            await wait_for(pilot, lambda: not app.hosts[hv.uri].refreshing)
            timer = app.hosts[hv.uri].timer
            assert timer is not None and timer._interval == pytest.approx(2.5)
    finally:
        hv.close()
