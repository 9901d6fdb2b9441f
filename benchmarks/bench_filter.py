"""Filtering and sorting the domains table at 3000 rows (one host, and 30 hosts x 100).

In-process (Textual's Pilot, 140x45, libvirt's test driver): each filter keystroke typed into
the filter box, each sort key, timed two ways: the table's own work (DomainsTable.set_filter /
sort_by) and the whole keystroke up to the next screen update, as process CPU time (the
machine may be loaded by others; CPU time stays comparable). Target: under 100 ms.

    .venv/bin/python benchmarks/bench_filter.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_idle import test_uris  # noqa: E402

from tui.app import VirtdeckApp  # noqa: E402
from tui.core.hypervisor import Hypervisor, start_event_loop  # noqa: E402
from tui.widgets.domains import DomainsTable  # noqa: E402

TYPED = "h17-vm5"


async def run(hosts: int, per_host: int, d: Path) -> None:
    hvs = [Hypervisor.open(u) for u in test_uris(hosts, per_host, d)]
    app = VirtdeckApp(hvs, poll_interval=3600)
    async with app.run_test(size=(140, 45)) as pilot:
        table = app.screen.query_one(DomainsTable)
        while table.row_count < hosts * per_host:
            await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        await pilot.pause(0.5)
        own: list[float] = []
        real_set_filter, real_sort_by = table.set_filter, table.sort_by

        def timed(fn: Any) -> Any:
            def wrapper(*args: Any) -> Any:
                t = time.process_time()
                try:
                    return fn(*args)
                finally:
                    own.append(time.process_time() - t)

            return wrapper

        table.set_filter = timed(real_set_filter)  # type: ignore[method-assign]
        table.sort_by = timed(real_sort_by)  # type: ignore[method-assign]
        await pilot.press("slash")
        await pilot.pause()
        steps = [(c, c) for c in TYPED] + [("escape", "Esc (clear)")] + [("o", "sort o")] * 3
        print(f"{hosts} host(s) x {per_host} domains:")
        for key, label in steps:
            own.clear()
            t = time.process_time()
            await pilot.press(key)
            await pilot.pause()
            whole = time.process_time() - t
            print(
                f"  {label:12} rows {table.row_count:5d} | table {sum(own) * 1000:5.1f} ms CPU"
                f" | keystroke to screen {whole * 1000:5.1f} ms CPU"
            )
            if key == "escape":
                table.focus()
    for hv in hvs:
        hv.close()


def main() -> None:
    start_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(1, 3000, Path(tmp)))
        asyncio.run(run(30, 100, Path(tmp)))


if __name__ == "__main__":
    main()
