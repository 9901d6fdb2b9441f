"""At 80x24 the plan screen and the deploy form keep their buttons reachable and say which
key confirms."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import App
from textual.widgets import Button

from tests.waiting import wait_for
from tui.modals.confirm import PlanScreen
from tui.modals.template_forms import DeployScreen


@dataclass(frozen=True)
class LongPlan:
    title: str = "deploy 40 thin clones of 'template-web'"
    destructive: bool = False
    option: str | None = None
    confirm_label: str = "Deploy"

    def summary(self) -> list[str]:
        return [f"web-{n}: thin clone of template-web" for n in range(1, 41)]


def _on_screen(app: App[None], button: Button) -> bool:
    region = button.region
    return region.height > 0 and region.y >= 0 and region.bottom <= app.size.height


async def test_a_long_plan_keeps_its_buttons_on_an_80x24_screen() -> None:
    app: App[None] = App()
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(PlanScreen(LongPlan()))  # type: ignore[arg-type]
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        yes = app.screen.query_one("#yes", Button)
        assert "(y)" in str(yes.label)  # the key that confirms
        assert _on_screen(app, yes) and _on_screen(app, app.screen.query_one("#no", Button))
        assert app.screen.query_one("#plan").region.right <= 80


async def test_the_deploy_form_s_buttons_are_reachable_at_80x24() -> None:
    app: App[None] = App()
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(DeployScreen("template-web", sealed=True))
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        assert "Enter plans" in str(app.screen.query_one("#title").render())
        ok = app.screen.query_one("#ok", Button)
        ok.focus()  # tabbing to it scrolls the form
        await wait_for(pilot, lambda: _on_screen(app, ok), what="the focused button on screen")
