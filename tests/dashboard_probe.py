"""Run by tests/test_fleet.py in a fresh interpreter: start the dashboard exactly as the
`virtdeck` console script does (tui.cli.setup, then build_app: event loop registered before any
connection), suspend DOMAIN with `virsh`, and print as JSON how long the row took to say
"paused". The poll interval comes from the config file (60 s): only an event can be that fast.

    python -m tests.dashboard_probe DOMAIN -c qemu:///system
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from tui.cli import build_app, setup
from tui.core.models import DomainState
from tui.widgets.domains import DomainsTable


async def probe(name: str, argv: list[str]) -> dict[str, object]:
    args, settings = setup(argv)
    app = build_app(args, settings)
    async with app.run_test(size=(140, 45)) as pilot:
        table = app.screen.query_one(DomainsTable)

        def state() -> DomainState | None:
            return next((d.state for d in table.domains.values() if d.name == name), None)

        events: list[Any] = []
        deadline = time.monotonic() + 30
        while state() is not DomainState.RUNNING and time.monotonic() < deadline:
            await pilot.pause(0.02)
        before = state()
        app.hypervisors[0].subscribe(events.append)  # diagnostics: which events arrived
        await pilot.pause(0.3)  # the first refresh's follow-ups are done; next poll in 60 s
        uri = args.connect[0]
        t0 = time.monotonic()
        subprocess.run(["virsh", "-c", uri, "suspend", name], check=True, capture_output=True)
        elapsed = None
        while time.monotonic() - t0 < 5:
            if state() is DomainState.PAUSED:
                elapsed = time.monotonic() - t0
                break
            await pilot.pause(0.005)
        st = app.hosts[args.connect[0]]
        result = {
            "events": [e.detail for e in events],
            "refreshing": st.refreshing,
            "before": before.value if before else None,
            "after": (state() or DomainState.NOSTATE).value,
            "elapsed": elapsed,
            "poll_interval": app.poll_interval,
        }
    for hv in app.hypervisors:
        hv.close()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(sys.argv[1], sys.argv[2:]))))
