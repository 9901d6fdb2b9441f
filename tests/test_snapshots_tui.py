"""Pilot tests of the Snapshots pane on a private test-driver hypervisor."""

from __future__ import annotations

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Static, Tree

from tests.lab import SystemLab
from tests.test_snapshots_system import disk_paths, has_pattern, live_write, stop
from tests.waiting import wait_for
from tui.app import VirtdeckApp
from tui.core import snapshots as S
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.modals.confirm import PlanScreen
from tui.modals.snapshot_forms import NewSnapshotScreen
from tui.widgets.domains import DomainsTable
from tui.widgets.snapshots_pane import SnapshotsPane


def tree_names(app: VirtdeckApp) -> list[str]:
    widget = app.screen.query_one("#snap-tree", Tree)
    out: list[str] = []

    def walk(node: object) -> None:
        for child in node.children:  # type: ignore[attr-defined]
            out.append(child.data)
            walk(child)

    walk(widget.root)
    return out


def highlight(app: VirtdeckApp, name: str) -> None:
    widget = app.screen.query_one("#snap-tree", Tree)

    def find(node: object) -> object:
        for child in node.children:  # type: ignore[attr-defined]
            if child.data == name:
                return child
            hit = find(child)
            if hit is not None:
                return hit
        return None

    node = find(widget.root)
    assert node is not None, name
    widget.move_cursor(node)  # type: ignore[arg-type]


async def start(app: VirtdeckApp, pilot: Pilot[None], domain: str) -> SnapshotsPane:
    await app.workers.wait_for_complete()
    await pilot.pause()
    pane = app.screen.query_one(SnapshotsPane)
    assert app.screen.query_one(DomainsTable).select_name(domain)
    await wait_for(pilot, lambda: pane.selected is not None and pane.selected.name == domain)
    await wait_for(pilot, lambda: pane.snap_tree is not None)
    return pane


async def idle(app: VirtdeckApp, pilot: Pilot[None], pane: SnapshotsPane) -> None:
    await wait_for(pilot, lambda: not pane.busy)
    await app.workers.wait_for_complete()
    await pilot.pause()


async def test_create_revert_rollback_delete_with_keys(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(150, 50)) as pilot:
        pane = await start(app, pilot, "beta")
        assert tree_names(app) == []
        assert "no snapshots" in str(app.screen.query_one("#snap-tree", Tree).root.label)

        # n: the modal, a bad name is refused in place, a good one creates the snapshot
        await pilot.press("n")
        await wait_for(
            pilot, lambda: isinstance(app.screen, NewSnapshotScreen) and app.screen.is_mounted
        )
        form = app.screen
        form.query_one("#name", Input).value = "bad/name"
        await pilot.press("enter")
        assert app.screen is form
        assert "invalid snapshot name" in str(form.query_one("#error", Static).render())
        form.query_one("#name", Input).value = "one"
        form.query_one("#description", Input).value = "before the upgrade"
        await pilot.press("enter")
        await idle(app, pilot, pane)
        await wait_for(pilot, lambda: tree_names(app) == ["one"])
        assert pane.snap_tree is not None and pane.snap_tree.get("one").current
        assert pane.snap_tree.get("one").description == "before the upgrade"
        assert "current" in str(app.screen.query_one("#snap-details", Static).render())

        # made outside the pane (like virsh): shows up at the next inventory refresh
        S.create(test_hv, S.plan_create(test_hv, "beta", "two"))
        app.refresh_inventory()
        await wait_for(pilot, lambda: tree_names(app) == ["one", "two"])
        assert pane.snap_tree is not None and pane.snap_tree.get("two").parent == "one"

        # nothing changed: a reload does not rebuild the Tree widget
        rebuilds, loads = pane.rebuilds, pane.loads
        pane.load()
        await wait_for(pilot, lambda: pane.loads > loads)
        assert pane.rebuilds == rebuilds

        # v on "one": the confirmation names what is lost; yes reverts
        highlight(app, "one")
        await pilot.press("v")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        assert "lost:" in body and "'one'" in str(app.screen.query_one("#title").render())
        await pilot.press("y")
        await idle(app, pilot, pane)
        await wait_for(pilot, lambda: bool(pane.snap_tree and pane.snap_tree.get("one").current))
        assert S.snapshot_tree(test_hv, "beta").current.name == "one"  # type: ignore[union-attr]

        # R then n: nothing happens
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        await pilot.press("n")
        await idle(app, pilot, pane)
        assert not isinstance(app.screen, PlanScreen)
        assert not pane.busy

        # D on "two": confirmed, deleted
        highlight(app, "two")
        await pilot.press("D")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "'two'" in str(app.screen.query_one("#title").render())
        await pilot.press("y")
        await idle(app, pilot, pane)
        await wait_for(pilot, lambda: tree_names(app) == ["one"])
        assert S.snapshot_tree(test_hv, "beta").names == ("one",)


async def test_refusal_reaches_the_error_funnel(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(150, 50)) as pilot:
        pane = await start(app, pilot, "beta")
        seen: list[BaseException] = []
        app.report_error = seen.append  # type: ignore[method-assign]
        await pilot.press("R")  # no current snapshot
        await idle(app, pilot, pane)
        assert seen and "no current snapshot" in str(seen[0])
        assert not isinstance(app.screen, PlanScreen) and not pane.busy
        # switching domains shows the other domain's (empty) tree
        assert app.screen.query_one(DomainsTable).select_name("alpha")
        await wait_for(pilot, lambda: pane.selected is not None and pane.selected.name == "alpha")
        await wait_for(pilot, lambda: bool(pane.snap_tree and pane.snap_tree.domain == "alpha"))
        assert tree_names(app) == []


@pytest.mark.system
async def test_two_keys_bring_a_running_vm_back(system_hv: Hypervisor, lab: SystemLab) -> None:
    """The issue's promise on real KVM: snapshot a running VM (external, with memory), break
    its disk, press R and y, and it runs again with the old data (whatever libvirt does it)."""
    hv = system_hv
    name = lab.define("tui")
    hv.start(name)
    live_write(hv, name, 0x11)
    S.create(hv, S.plan_create(hv, name, "good", external=True))
    live_write(hv, name, 0x66)  # the "broken" disk
    app = VirtdeckApp([hv])
    async with app.run_test(size=(150, 50)) as pilot:
        pane = await start(app, pilot, name)
        await wait_for(pilot, lambda: tree_names(app) == ["good"])
        await pilot.press("R")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen), timeout=30)
        body = str(app.screen.query_one("#body", Static).render())
        assert "lost:" in body and "running state" in body
        await pilot.press("y")
        await idle(app, pilot, pane)
    assert hv.domain(name).state == DomainState.RUNNING
    stop(hv, name)
    assert has_pattern(disk_paths(hv, name)[0], 0x11)
