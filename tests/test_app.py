"""Pilot tests of the dashboard on a private test-driver hypervisor."""

from __future__ import annotations

from pathlib import Path

from textual import events
from textual.message import Message
from textual.widgets import Input

from tui.app import VirtdeckApp
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.core.testdriver import DomainSpec, node_xml
from tui.messages import HostLoaded, ShutdownTimedOut
from tui.modals.confirm import ConfirmScreen
from tui.widgets.domains import DomainsTable


async def _settle(app: VirtdeckApp, pilot: object) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()  # type: ignore[attr-defined]


def _names(app: VirtdeckApp) -> list[str]:
    return [d.name for d in app.screen.query_one(DomainsTable).visible_domains()]


async def _select(app: VirtdeckApp, pilot: object, name: str) -> None:
    assert app.screen.query_one(DomainsTable).select_name(name)
    await pilot.pause()  # type: ignore[attr-defined]


async def test_rows_appear_with_state_and_header_versions(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        table = app.screen.query_one(DomainsTable)
        assert table.row_count == 4
        assert _names(app) == ["alpha", "beta", "gamma", "template-web"]
        hosts = str(app.screen.query_one("#hosts").render())
        assert test_hv.uri in hosts and "libvirt" in hosts


async def test_keys_change_domain_state(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "beta")
        await pilot.press("s")
        await _settle(app, pilot)
        assert test_hv.domain("beta").state is DomainState.RUNNING
        await pilot.press("p")
        await _settle(app, pilot)
        assert test_hv.domain("beta").state is DomainState.PAUSED
        await pilot.press("p")
        await _settle(app, pilot)
        assert test_hv.domain("beta").state is DomainState.RUNNING
        # the table follows without a keypress (event or next poll)
        await _settle(app, pilot)
        table = app.screen.query_one(DomainsTable)
        assert {d.name: d.state for d in table.domains.values()}["beta"] is DomainState.RUNNING


async def test_force_off_asks_first_and_no_keeps_it_running(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "alpha")
        await pilot.press("f")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await _settle(app, pilot)
        assert test_hv.domain("alpha").state is DomainState.RUNNING
        await pilot.press("f")
        await pilot.pause()
        await pilot.press("y")
        await _settle(app, pilot)
        assert test_hv.domain("alpha").state is DomainState.SHUTOFF


async def test_errors_become_notifications(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "alpha")
        await pilot.press("s")  # already running
        await _settle(app, pilot)
        messages = [n.message for n in app._notifications]
        assert any("'alpha' is already running" in m for m in messages)
        await _select(app, pilot, "template-web")
        await pilot.press("s")
        await _settle(app, pilot)
        assert any("is a template" in n.message for n in app._notifications)
        assert test_hv.domain("template-web").state is DomainState.SHUTOFF


async def test_filter_narrows_rows_and_escape_restores(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press("a", "l")
        await pilot.pause()
        assert _names(app) == ["alpha"]
        await pilot.press("escape")
        await pilot.pause()
        assert len(_names(app)) == 4
        await pilot.press("slash", *"paused")
        await pilot.pause()
        assert _names(app) == ["gamma"]


async def test_sort_key_cycles_columns(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await pilot.press("o")  # by state
        await pilot.pause()
        assert _names(app)[0] == "gamma"  # "paused" < "running" < "shut off"
        assert app.screen.query_one(DomainsTable).sort_column == "state"


async def test_graceful_shutdown_needs_no_force(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv], shutdown_timeout=5)
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "alpha")
        await pilot.press("d")  # the test driver powers off at once
        await _settle(app, pilot)
        assert test_hv.domain("alpha").state is DomainState.SHUTOFF
        assert not isinstance(app.screen, ConfirmScreen)


async def test_two_hosts_show_a_host_column(test_hv: Hypervisor) -> None:
    other = Hypervisor.open("test:///default")
    try:
        app = VirtdeckApp([test_hv, other])
        async with app.run_test(size=(140, 45)) as pilot:
            await _settle(app, pilot)
            table = app.screen.query_one(DomainsTable)
            assert table.show_host
            hosts = {d.host for d in table.domains.values()}
            assert hosts == {test_hv.uri, "test:///default"}
    finally:
        other.close()


async def test_command_palette_offers_actions_of_selected_row(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "beta")
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        assert "Start: beta" in commands
        assert "Force off: beta" in commands
        await pilot.press("1")  # the Snapshots tab: Templates' keys are not in the footer
        await pilot.pause()
        await commands["Make template: beta"].callback()  # type: ignore[misc]
        await pilot.pause()
        assert type(app.screen).__name__ == "MakeTemplateScreen"


async def test_a_pane_error_is_notified_once(test_hv: Hypervisor) -> None:
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "alpha")
        await pilot.press("x")  # delete a running domain: refused by the templates pane
        await _settle(app, pilot)
        refusals = [n for n in app._notifications if "'alpha' is running" in n.message]
        assert len(refusals) == 1


async def test_cells_that_grow_widen_their_column(tmp_path: Path) -> None:
    node = tmp_path / "one.xml"
    node.write_text(node_xml([DomainSpec("solo", "running")]))
    hv = Hypervisor.open(f"test://{node}")
    app = VirtdeckApp([hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        table = app.screen.query_one(DomainsTable)
        state = next(c for k, c in table.columns.items() if k.value == "state")
        assert state.content_width == len("running")
        hv.destroy("solo")  # "running" -> "shut off": one character wider
        app.refresh_inventory()
        await _settle(app, pilot)
        assert state.content_width >= len("shut off")
    hv.close()


async def test_the_footer_shows_the_active_tab_keys_at_140_columns(test_hv: Hypervisor) -> None:
    """README: the footer shows the lifecycle keys and those of the active tab. At 140
    columns the tab's keys came after the mark/filter/sort/hosts/quit keys and were cut off;
    `h` took room while it had nothing to fold (one host)."""
    from textual.widgets._footer import FooterKey

    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        for tab, keys in (("1", {"n", "v", "R", "D"}), ("2", {"T", "c", "x", "y"}), ("3", {"u"})):
            await pilot.press(tab)
            await pilot.pause()
            shown = {k.key: k.region for k in app.screen.query(FooterKey)}
            palette = shown.pop("ctrl+p")
            assert "h" not in shown
            cut = {k for k in keys | {"s", "d", "f", "r", "p"} if shown[k].right > palette.x}
            assert keys <= set(shown) and not cut, (tab, cut)


async def test_question_mark_lists_every_key_and_closes_again(test_hv: Hypervisor) -> None:
    """Half the keys are not in the footer (M, C, S, t, U, 1-3 and the other tabs' keys): `?`
    shows them all beside the dashboard, `?` again puts it away."""
    import io

    from rich.console import Console
    from textual.widgets import HelpPanel
    from textual.widgets._key_panel import BindingsTable

    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        table = app.screen.query_one(HelpPanel).query_one(BindingsTable)
        console = Console(width=60, record=True, file=io.StringIO())
        console.print(table.render_bindings_table())
        text = console.export_text()
        for hidden in ("Migrate", "Console", "Mark clones", "Make template", "Refresh usage"):
            assert hidden in text, hidden
        await pilot.press("question_mark")
        await pilot.pause()
        assert not app.screen.query(HelpPanel)


async def test_n_on_a_template_says_why_before_any_form(test_hv: Hypervisor) -> None:
    """The form was filled in first, and only its answer refused (the planner refuses)."""
    app = VirtdeckApp([test_hv])
    async with app.run_test(size=(140, 45)) as pilot:
        await _settle(app, pilot)
        await _select(app, pilot, "template-web")
        await pilot.press("n")
        await _settle(app, pilot)
        assert type(app.screen).__name__ == "MainScreen"
        assert any("'template-web' is a template" in n.message for n in app._notifications)
        label = str(app.screen.query_one("#snap-tree").root.label)
        assert "a template never has any" in label and "n takes one" not in label


async def test_results_arriving_while_the_app_closes_are_dropped(test_hv: Hypervisor) -> None:
    """A host's answer (or an event) handled while Textual takes the screens apart found no
    table and crashed the closing app: seen with a host that came back just before the end.
    Here the answer arrives as the table is unmounted."""
    app = VirtdeckApp([test_hv])
    sent: list[str] = []

    def hook(message: Message) -> None:
        if isinstance(message, events.Unmount) and isinstance(message._sender, DomainsTable):
            sent.append("answer")
            app.post_message(HostLoaded(test_hv.uri, list(app.domains), None))
            app.post_message(ShutdownTimedOut(test_hv.uri, "alpha", 1.0))

    async with app.run_test(size=(140, 45), message_hook=hook) as pilot:
        await _settle(app, pilot)
    assert sent
    assert app.return_code in (None, 0)
