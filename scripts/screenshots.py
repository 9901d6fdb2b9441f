"""Render virtdeck's screens from the demo lab into SVGs (README pictures, visual review).

    .venv/bin/python scripts/screenshots.py [OUTDIR]     # default: screenshots/

The lab is built under a fixed cache directory so the pictures are the same on every machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["XDG_CACHE_HOME"] = "/tmp/virtdeck-screenshots"

from textual.widgets import Static  # noqa: E402

from tui.app import VirtdeckApp  # noqa: E402
from tui.core import demo  # noqa: E402
from tui.core.fleet import connect_all  # noqa: E402
from tui.core.hypervisor import Hypervisor, start_event_loop  # noqa: E402
from tui.core.settings import Settings  # noqa: E402
from tui.widgets.domains import DomainsTable  # noqa: E402

SIZE = (140, 45)
SHOTS = (("snapshots", "web-1"), ("templates", "template-web"), ("usage", "web-1"))


async def render(outdir: Path) -> list[Path]:
    start_event_loop()
    hv = Hypervisor.open(demo.ensure_lab(), demo=True)
    app = VirtdeckApp([hv], poll_interval=3600)
    written = []
    async with app.run_test(size=SIZE) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        for pane, domain in SHOTS:
            app.screen.query_one(DomainsTable).select_name(domain)
            await pilot.press({"snapshots": "1", "templates": "2", "usage": "3"}[pane])
            await pilot.pause(0.5)
            await app.workers.wait_for_complete()
            await pilot.pause(0.5)
            path = outdir / f"{pane}.svg"
            app.save_screenshot(filename=path.name, path=str(outdir))
            written.append(path)
        # the details view of a running domain (key i)
        app.screen.query_one(DomainsTable).select_name("web-1")
        await pilot.press("i")
        await pilot.pause(0.5)
        await app.screen.workers.wait_for_complete()
        await pilot.pause(0.5)
        path = outdir / "details.svg"
        app.save_screenshot(filename=path.name, path=str(outdir))
        written.append(path)
        await pilot.press("escape")
        written.append(await render_group(app, pilot, outdir))
    hv.close()
    written.append(await render_fleet(outdir))
    return written


async def render_group(app: VirtdeckApp, pilot: Any, outdir: Path) -> Path:
    """A group plan: the clones of template-web marked (t), one snapshot for all (n)."""
    from tui.modals.confirm import PlanScreen

    await pilot.pause(0.3)
    await pilot.press("1")
    app.screen.query_one(DomainsTable).select_name("web-1")
    await pilot.press("t", "n")
    await pilot.pause(0.3)
    await pilot.press(*"pre-upgrade", "enter")
    for _ in range(100):
        if isinstance(app.screen, PlanScreen):
            break
        await pilot.pause(0.1)
    await pilot.pause(0.5)
    path = outdir / "group.svg"
    app.save_screenshot(filename=path.name, path=str(outdir))
    await pilot.press("n", "U")
    return path


async def render_fleet(outdir: Path) -> Path:
    """Several hosts: the demo lab, libvirt's test:///default, and a host that never answers
    (a socket that accepts connections but no daemon behind it, like a stopped libvirtd)."""
    import socket
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX) as hung:
        path = f"{tmp}/libvirt-sock"
        hung.bind(path)
        hung.listen(8)
        uris = [demo.ensure_lab(), "test:///default", f"qemu+unix:///system?socket={path}"]
        hvs, failures = connect_all(uris, timeout=1)
        hvs[0].demo = True
        settings = Settings(poll_interval=3600, connect_timeout=1, answer_timeout=1)
        app = VirtdeckApp(hvs, settings=settings, unreachable=failures)
        async with app.run_test(size=SIZE) as pilot:
            # The silent host's refresh passes its 1 s deadline: wait for its badge (a loaded
            # machine takes longer, so a condition and not a fixed pause).
            for _ in range(300):
                await pilot.pause(0.1)
                if "NO ANSWER" in str(app.screen.query_one("#hosts", Static).render()):
                    break
            app.screen.query_one(DomainsTable).select_name("web-1")
            await pilot.press("2")
            await pilot.pause(1.0)
            target = outdir / "fleet.svg"
            app.save_screenshot(filename=target.name, path=str(outdir))
        for hv in hvs:
            hv.close(timeout=0.2)
    return target


def main() -> None:
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "screenshots"
    outdir.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(render(outdir)):
        print(path)


if __name__ == "__main__":
    main()
