"""Pilot tests of the Disk usage pane: a test-driver hypervisor over real qcow2 files."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from textual.widgets import Static

from tests.test_usage import Lab, du, run, thin_spec, ulab, write, write_node
from tests.waiting import wait_for
from tui.app import VirtdeckApp
from tui.core.hypervisor import Hypervisor
from tui.core.models import VirtdeckMeta
from tui.core.testdriver import DiskSpec, DomainSpec
from tui.core.usage import UsageCollector
from tui.widgets.domains import DomainsTable
from tui.widgets.usage_pane import UsagePane

MiB = 1024**2
__all__ = ["ulab"]  # the fixture, shared with tests/test_usage.py


def text(app: VirtdeckApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def test_pane_shows_thin_against_full_and_the_selected_chain(ulab: Lab) -> None:
    hv = Hypervisor.open(ulab.uri)
    app = VirtdeckApp([hv])
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            pane = app.screen.query_one(UsagePane)
            await pilot.press("3")
            await wait_for(pilot, lambda: pane.measures >= 1)
            report = pane.reports[hv.uri]
            t = report.template("tpl")
            assert t is not None and t.thin_bytes == du(*ulab.thin)
            shown = text(app, "#usage-templates")
            assert "tpl" in shown and "thin clones (3)" in shown and "full clones (1)" in shown
            assert "as full copies" in shown and "saved" in shown
            assert "█" in shown
            for n in (t.thin_bytes, t.full_equivalent_bytes, t.saved_bytes, t.full_bytes):
                assert _human(n) in shown
            totals = text(app, "#usage-totals")
            assert "5 images" in totals and _human(du(*ulab.all_files())) in totals
            # The selected domain's backing chain, its base shared with the other three.
            assert app.screen.query_one(DomainsTable).select_name("thin1")
            await wait_for(pilot, lambda: "thin1.qcow2" in text(app, "#usage-chain"))
            chain = text(app, "#usage-chain")
            assert ulab.base in chain and "shared by 4" in chain and "owned" in chain
            assert chain.index("thin1.qcow2") < chain.index(ulab.base)
    finally:
        hv.close()


async def test_bar_grows_while_a_clone_writes_without_a_keypress(ulab: Lab) -> None:
    hv = Hypervisor.open(ulab.uri)
    app = VirtdeckApp([hv], poll_interval=0.3)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            pane = app.screen.query_one(UsagePane)
            await pilot.press("3")  # live while its tab is shown (a hidden tab does no work)
            await wait_for(pilot, lambda: pane.measures >= 1)
            before = pane.reports[hv.uri].template("tpl")
            assert before is not None
            shown_before = text(app, "#usage-templates")
            write(ulab.thin[1], "0xcd", 0, 12 * MiB)  # "the guest" of thin2 writes 12 MiB

            def grown() -> bool:
                t = pane.reports[hv.uri].template("tpl")
                return t is not None and t.thin_bytes > before.thin_bytes + 11 * MiB

            await wait_for(pilot, grown)
            after = pane.reports[hv.uri].template("tpl")
            assert after is not None and after.thin_bytes == du(*ulab.thin)
            await pilot.pause()
            shown = text(app, "#usage-templates")
            assert shown != shown_before and _human(after.thin_bytes) in shown
    finally:
        hv.close()


async def test_measures_never_overlap_and_the_last_one_wins(ulab: Lab) -> None:
    hv = Hypervisor.open(ulab.uri)
    app = VirtdeckApp([hv], poll_interval=60)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            pane = app.screen.query_one(UsagePane)
            await wait_for(pilot, lambda: pane.measures >= 1)
            done = pane.measures
            for _ in range(5):  # a burst of refresh requests while one runs
                pane.measure()
            assert len([w for w in app.workers if w.group == "usage" and w.is_running]) <= 1
            await wait_for(pilot, lambda: pane.measures >= done + 2 and not pane._measuring)
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert pane.measures == done + 2  # the one started, then one for the rest
    finally:
        hv.close()


async def test_200_images_measure_in_a_thread_without_stalling_the_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = str(tmp_path / "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "1G")
    write(base, "0x11", 0, MiB)
    first = tmp_path / "c-000.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(first))
    specs = [DomainSpec("tpl", disks=(DiskSpec(base),), meta=VirtdeckMeta(role="template"))]
    for i in range(199):
        p = tmp_path / f"c-{i:03d}.qcow2"
        if i:
            shutil.copyfile(first, p)
        specs.append(thin_spec(f"c-{i:03d}", str(p), base))
    hv = Hypervisor.open(write_node(tmp_path / "node.xml", specs))
    app = VirtdeckApp([hv], poll_interval=60)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            pane = app.screen.query_one(UsagePane)
            await wait_for(pilot, lambda: pane.measures >= 1)
            assert len(pane.reports[hv.uri].images) == 200
            # A measure that cannot finish until the UI thread has run a timer callback (a
            # cold measure over a slow NFS or SSH link, made to wait on the UI): were it run on
            # the UI thread, the callback could never run and the measure would give up.
            pane._collectors.clear()
            threads: list[threading.Thread] = []
            ui_ran = threading.Event()
            answered: list[bool] = []
            real_report = UsageCollector.report

            def slow_report(self: UsageCollector, domains: object = None) -> object:
                threads.append(threading.current_thread())
                ui_ran.clear()
                answered.append(ui_ran.wait(timeout=30))
                return real_report(self, domains)  # type: ignore[arg-type]

            monkeypatch.setattr(UsageCollector, "report", slow_report)
            timer = app.set_interval(0.01, ui_ran.set)
            done = pane.measures
            await pilot.press("u")
            await wait_for(pilot, lambda: pane.measures > done, timeout=60)
            timer.stop()
            assert threads and all(t is not threading.main_thread() for t in threads)
            assert answered and all(answered), "the UI did not run while the measure waited"
            t = pane.reports[hv.uri].template("tpl")
            assert t is not None and len(t.thin) == 199 and t.thin_domains[-1] == "c-198"
    finally:
        hv.close()


def _human(n: int) -> str:
    from tui.widgets.usage_pane import size

    return size(n)
