"""Pilot tests of the Templates pane on a private test-driver hypervisor with real images.

From keys alone: make a template from a running VM, deploy thin clones after seeing the plan,
be refused when deleting the base they depend on, delete a clone with its overlay only.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Checkbox, DataTable, Input, RadioButton, SelectionList, Static

from tests.test_templates import Lab, uefi_template
from tests.waiting import wait_for
from tui.app import VirtdeckApp
from tui.core.models import DomainState
from tui.modals.confirm import PlanScreen
from tui.modals.template_forms import (
    DeployScreen,
    MakeTemplateScreen,
)
from tui.widgets.domains import DomainsTable
from tui.widgets.templates_pane import TemplatesPane


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lab = Lab(tmp_path)
    yield lab
    lab.hv.close()


async def start(app: VirtdeckApp, pilot: Pilot[None]) -> TemplatesPane:
    pane = app.screen.query_one(TemplatesPane)
    await wait_for(pilot, lambda: pane.loads >= 1 and bool(pane.templates))
    await pilot.press("2")  # the Templates tab
    return pane


async def select(app: VirtdeckApp, pilot: Pilot[None], pane: TemplatesPane, name: str) -> None:
    await wait_for(pilot, lambda: app.screen.query_one(DomainsTable).select_name(name))
    await wait_for(pilot, lambda: pane.selected is not None and pane.selected.name == name)


def cell(pane: TemplatesPane, template: str, column: str) -> str:
    table = pane.query_one("#tpl-table", DataTable)
    return str(table.get_cell(f"{pane.templates[0].host}\0{template}", column))


def messages(app: VirtdeckApp) -> list[str]:
    return [n.message for n in app._notifications]


async def test_deploy_then_refuse_the_base_then_delete_a_clone(lab: Lab) -> None:
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        assert cell(pane, "template-base", "Thin") == "0"
        assert cell(pane, "template-base", "Base image(s)") == "base.qcow2"
        assert lab.base in str(pane.query_one("#tpl-details", Static).render())

        await select(app, pilot, pane, "template-base")
        await pilot.press("c")
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        app.screen.query_one("#count", Input).value = "2"
        app.screen.query_one("#name", Input).focus()
        await pilot.press(*"www", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        plan_text = str(app.screen.query_one("#body", Static).render())
        assert "www-1" in plan_text and "www-2" in plan_text
        assert str(lab.images / "www-1.qcow2") in plan_text and "space needed" in plan_text
        assert not (lab.images / "www-1.qcow2").exists()  # nothing before "y"
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy)
        for n in (1, 2):
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", str(lab.images / f"www-{n}.qcow2")],
                check=True, capture_output=True, text=True).stdout)  # fmt: skip
            assert info["backing-filename"] == lab.base
        await wait_for(pilot, lambda: cell(pane, "template-base", "Thin") == "2")
        details = str(pane.query_one("#tpl-details", Static).render())
        assert "www-1, www-2" in details

        # The base of two thin clones cannot be deleted: the refusal names them.
        await select(app, pilot, pane, "template-base")
        await pilot.press("x")
        await wait_for(pilot, lambda: not pane.busy)
        assert any("www-1" in m and "www-2" in m and "cannot be removed" in m
                   for m in messages(app))  # fmt: skip
        assert "template-base" in {d.name for d in lab.hv.domains()}

        # A clone goes, with its own overlay only.
        await select(app, pilot, pane, "www-1")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        app.screen.query_one("#option", Checkbox).value = True
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy)
        assert "www-1" not in {d.name for d in lab.hv.domains()}
        assert not (lab.images / "www-1.qcow2").exists() and os.path.exists(lab.base)
        await wait_for(pilot, lambda: cell(pane, "template-base", "Thin") == "1")


async def test_deploy_plan_shows_what_each_clone_gets_of_its_own(lab: Lab) -> None:
    tname, nvram = uefi_template(lab)
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, tname)
        await pilot.press("c")
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        app.screen.query_one("#count", Input).value = "2"
        app.screen.query_one("#name", Input).focus()
        await pilot.press(*"uefi", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        plan_text = str(app.screen.query_one("#body", Static).render())
        copy = nvram.parent / "uefi-2_VARS.fd"
        assert f"os nvram: copy of {nvram} -> {copy}" in plan_text
        assert f"{lab.root}/efi-serial.log -> {lab.root}/uefi-1-serial.log" in plan_text
        assert "graphics vnc: port 5977 -> autoport" in plan_text
        assert "fresh TPM state" in plan_text
        assert not copy.exists()  # nothing before "y"
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy)
        assert copy.read_bytes() == nvram.read_bytes()
        assert {"uefi-1", "uefi-2"} <= {d.name for d in lab.hv.domains()}


async def test_make_template_from_a_running_vm_with_keys(lab: Lab) -> None:
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, "web")
        await pilot.press("T")
        await wait_for(
            pilot, lambda: isinstance(app.screen, MakeTemplateScreen) and app.screen.is_mounted
        )
        ops = app.screen.query_one("#ops", SelectionList)
        assert "machine-id" in ops.selected  # virt-sysprep's defaults are ticked
        app.screen.query_one("#seal", Checkbox).value = False  # no sysprep on the test driver
        app.screen.query_one("#name", Input).value = "tpl-web"
        app.screen.query_one("#name", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        body = str(app.screen.query_one("#body", Static).render())
        assert "rename 'web' to 'tpl-web'" in body and "do not seal" in body
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy)
        info = lab.hv.domain("tpl-web")
        assert info.is_template and info.state is DomainState.SHUTOFF
        await wait_for(pilot, lambda: any(t.name == "tpl-web" for t in pane.templates))
        assert cell(pane, "tpl-web", "Sealed") == "no"
        assert any("'tpl-web' is a template" in m for m in messages(app))


async def test_cancel_changes_nothing(lab: Lab) -> None:
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, "template-base")
        await pilot.press("c")
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        app.screen.query_one("#name", Input).focus()
        await pilot.press(*"nope", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        await pilot.press("n")
        await wait_for(pilot, lambda: not pane.busy)
        assert "nope" not in {d.name for d in lab.hv.domains()}
        assert not (lab.images / "nope.qcow2").exists()


async def test_full_deploy_reports_progress_and_makes_an_independent_copy(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record what the worker reports, where it reports it: the messages that carry it to the
    # pane may be coalesced under load (can_replace), the calls cannot.
    seen: list[tuple[str, float | None]] = []
    original = TemplatesPane._progress

    def recording(self: TemplatesPane) -> Callable[[str, float | None], None]:
        report = original(self)

        def record(text: str, fraction: float | None) -> None:
            seen.append((text, fraction))
            report(text, fraction)

        return record

    monkeypatch.setattr(TemplatesPane, "_progress", recording)
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, "template-base")
        await pilot.press("c")
        await wait_for(
            pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen.is_mounted
        )
        app.screen.query_one("#full", RadioButton).value = True
        app.screen.query_one("#name", Input).focus()
        await pilot.press(*"db", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "copy of" in str(app.screen.query_one("#body", Static).render())
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy)
        await wait_for(pilot, lambda: cell(pane, "template-base", "Full") == "1")
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(lab.images / "db.qcow2")],
        check=True, capture_output=True, text=True).stdout)  # fmt: skip
    assert "backing-filename" not in info
    assert seen and seen[-1][1] == 1.0
    assert any(text.startswith("defining 'db'") for text, _ in seen)


async def test_detach_key_makes_a_thin_clone_full(lab: Lab) -> None:
    """F on a shut-off thin clone: the plan first, then a standalone image, the overlay gone,
    the template's thin count down to 0."""
    from tui.core.clones import execute_clone, plan_clone

    execute_clone(lab.hv, plan_clone(lab.hv, "template-base", "www"))
    overlay = lab.images / "www.qcow2"
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await wait_for(pilot, lambda: cell(pane, "template-base", "Thin") == "1")
        await select(app, pilot, pane, "www")
        await pilot.press("F")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        plan_text = str(app.screen.query_one("#body", Static).render())
        assert str(lab.images / "www-full.qcow2") in plan_text
        assert not (lab.images / "www-full.qcow2").exists()  # nothing before "y"
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy and not overlay.exists())
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(lab.images / "www-full.qcow2")],
            check=True, capture_output=True, text=True).stdout)  # fmt: skip
        assert "backing-filename" not in info
        await wait_for(pilot, lambda: cell(pane, "template-base", "Thin") == "0")
        assert os.path.exists(lab.base)


async def test_new_version_key_plans_the_edit_vm_then_its_seal(lab: Lab) -> None:
    app = VirtdeckApp([lab.hv])
    async with app.run_test(size=(160, 50)) as pilot:
        pane = await start(app, pilot)
        await select(app, pilot, pane, "template-base")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "template-base-v2-edit" in str(app.screen.query_one("#body", Static).render())
        await pilot.press("y")
        await wait_for(pilot, lambda: not pane.busy)
        edit = lab.images / "template-base-v2-edit.qcow2"
        argv = ["qemu-img", "info", "--output=json", str(edit)]
        info = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
        assert info["backing-filename"] == lab.base

        # On the edit VM the same key plans its seal into version 2 (declined here: nothing).
        await select(app, pilot, pane, "template-base-v2-edit")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, PlanScreen) and app.screen.is_mounted)
        assert "rename 'template-base-v2-edit' to 'template-base-v2'" in str(
            app.screen.query_one("#body", Static).render()
        )
        await pilot.press("n")
        await wait_for(pilot, lambda: not pane.busy)
        assert "template-base-v2" not in {d.name for d in lab.hv.domains()}
