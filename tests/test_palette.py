"""The command palette over everything: any domain's, template's or snapshot's action by typing,
on the demo lab (real images, libvirt's test driver, snapshots on web-1 and db)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from textual.command import CommandList, CommandPalette

from tui.app import VirtdeckApp
from tui.core import demo
from tui.core.hypervisor import Hypervisor
from tui.modals.confirm import PlanScreen
from tui.screens.palette import EverythingCommands
from tui.widgets.domains import DomainsTable


@pytest.fixture(scope="module")
def lab_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo lab, built once for this module (its images take seconds to make)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield demo.ensure_lab()


@pytest.fixture
def lab(lab_uri: str) -> Iterator[Hypervisor]:
    """A fresh connection: the test driver's state (what a test started) is per connection."""
    hv = Hypervisor.open(lab_uri, demo=True)
    yield hv
    hv.close()


async def _ready(app: VirtdeckApp, pilot: object) -> None:
    """The inventory and the templates are loaded (the palette lists what the panes know)."""
    for _ in range(50):
        await app.workers.wait_for_complete()
        await pilot.pause()  # type: ignore[attr-defined]
        if app.domains and app.main.templates():
            return
    raise AssertionError("the demo lab's domains and templates never loaded")


async def _choose(app: VirtdeckApp, pilot: object, typed: str) -> str:
    """Open the palette, type, take the first hit; returns the hit's text."""
    app.action_command_palette()
    await pilot.pause()  # type: ignore[attr-defined]
    assert isinstance(app.screen, CommandPalette)
    await pilot.press(*typed)  # type: ignore[attr-defined]
    commands = app.screen.query_one(CommandList)
    for _ in range(200):  # the search runs in the palette's own task
        await pilot.pause()  # type: ignore[attr-defined]
        if commands.option_count and commands.get_option_at_index(0).id != "no-matches":
            break
    first = str(commands.get_option_at_index(0).prompt)
    await pilot.press("enter")  # type: ignore[attr-defined]
    await app.workers.wait_for_complete()
    await pilot.pause()  # type: ignore[attr-defined]
    return first


async def _plan_screen(app: VirtdeckApp, pilot: object) -> PlanScreen:
    for _ in range(50):
        await app.workers.wait_for_complete()
        await pilot.pause()  # type: ignore[attr-defined]
        if isinstance(app.screen, PlanScreen):
            return app.screen
    raise AssertionError(f"no plan confirmation; the screen is {type(app.screen).__name__}")


async def test_rollback_of_a_domain_that_is_not_selected(lab: Hypervisor) -> None:
    app = VirtdeckApp([lab], poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        await _ready(app, pilot)
        table = app.main.query_one(DomainsTable)
        assert table.select_name("web-2")
        await pilot.press("space")  # web-2 marked: the keys would act on it; the palette names db
        await pilot.pause()
        assert [d.name for d in table.marked_domains()] == ["web-2"]
        hit = await _choose(app, pilot, "rollback db")
        assert "Rollback db" in hit
        screen = await _plan_screen(app, pilot)
        assert "db" in screen.plan.title and "pre-migration" in " ".join(screen.plan.summary())
        assert "web-2" not in screen.plan.title + " ".join(screen.plan.summary())
        selected = table.selected()
        assert selected is not None and selected.name == "db"  # the cursor followed the command


async def test_revert_to_a_snapshot_of_another_domain_by_name(lab: Hypervisor) -> None:
    app = VirtdeckApp([lab], poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        await _ready(app, pilot)
        hit = await _choose(app, pilot, "revert web-1 to php-test")
        assert hit.startswith("Revert web-1 to php-test")
        screen = await _plan_screen(app, pilot)
        assert "php-test" in screen.plan.title


async def test_deploy_a_template_and_a_filter_hiding_the_target_is_cleared(
    lab: Hypervisor,
) -> None:
    app = VirtdeckApp([lab], poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        await _ready(app, pilot)
        await pilot.press("slash", *"web-1", "enter")
        hit = await _choose(app, pilot, "start web-3")  # web-3 is shut off and filtered out
        assert hit.startswith("Start web-3")
        selected = app.main.query_one(DomainsTable).selected()
        assert selected is not None and selected.name == "web-3"
        hit = await _choose(app, pilot, "deploy template-web")
        assert hit.startswith("Deploy template-web")
        assert type(app.screen).__name__ == "DeployScreen"
        await pilot.press("escape")
        await app.workers.wait_for_complete()
        hit = await _choose(app, pilot, "import cloud image")
        assert hit.startswith("Import a cloud image as a template")
        assert type(app.screen).__name__ == "ImportScreen"


async def test_commands_fit_the_state_and_every_host_is_named(lab: Hypervisor) -> None:
    app = VirtdeckApp([lab], poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        await _ready(app, pilot)
        provider = EverythingCommands(app.main)
        await provider.startup()
        texts = {e.text for e in provider.entries}
        states = {d.name: d.state.active for d in app.domains}
        for name, active in states.items():
            template = name == "template-web"
            assert (f"Start {name}" in texts) is (not active and not template), name
            assert (f"Force off {name}" in texts) is active, name
        assert "Delete snapshot pre-migration of db" in texts
        assert "Deploy template-web" in texts
        assert not any("Start template-web" in t for t in texts)
