"""Run in a fresh interpreter (`python -X faulthandler -m tests.fault_probe ...`) by the fault
tests and the soak: the dashboard started as the `virtdeck` console script starts it (tui.cli
setup, then build_app), headless, against hosts that hang and come back.

    --hang PID --cycles N   SIGSTOP the daemon PID, wait for the host's badge, SIGCONT it,
                            wait for the host to answer again; N times
    --watch SECONDS         only watch (the soak injects the faults), then wait until every
                            host answers again
    --until FILE            (with --watch) watch until FILE exists, at most SECONDS

Prints one JSON line: per cycle how long the badge and the recovery took, and at the end which
hosts still had a badge. A crash of the process is the caller's to see (exit status < 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any

from tui.cli import build_app, setup

BADGE_DEADLINE = 30.0  # the host's answer deadline (settings) or keepalive, plus margin
RECOVER_DEADLINE = 60.0  # reconnect backoff is at most 30 s


async def probe(opts: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    args, settings = setup(argv)
    app = build_app(args, settings)
    out: dict[str, Any] = {"cycles": [], "badges_left": {}, "rows": 0}
    async with app.run_test(size=(160, 45)) as pilot:

        async def until(what: str, ok: Any, deadline: float) -> float:
            t0 = time.monotonic()
            while not ok():
                if time.monotonic() - t0 > deadline:
                    raise SystemExit(f"fault_probe: {what} not seen within {deadline:g} s")
                await pilot.pause(0.05)
            return time.monotonic() - t0

        since = [0.0]

        def answering() -> bool:
            # every host answered a refresh after `since` and has no badge
            return not any(app.host_status().values()) and all(
                st.error is None and not st.silent and st.last_answer > since[0]
                for st in app.hosts.values()
            )

        await until("every host answering", answering, RECOVER_DEADLINE)
        for _ in range(opts.cycles):
            uri = args.connect[0]
            await pilot.pause(opts.settle)
            os.kill(opts.hang, signal.SIGSTOP)
            try:
                badge = await until(
                    "the badge", lambda u=uri: bool(app.host_status().get(u)), BADGE_DEADLINE
                )
                await pilot.pause(opts.stopped)
            finally:
                os.kill(opts.hang, signal.SIGCONT)
                since[0] = time.monotonic()
            back = await until("the host answering again", answering, RECOVER_DEADLINE)
            out["cycles"].append({"badge": round(badge, 2), "recovered": round(back, 2)})
        if opts.watch:
            t0 = time.monotonic()
            while time.monotonic() - t0 < opts.watch:
                if opts.until and os.path.exists(opts.until):
                    break
                await pilot.pause(0.5)
            with_badge = {u: b for u, b in app.host_status().items() if b}
            out["badges_at_end_of_faults"] = with_badge
            since[0] = time.monotonic()
            await until("every host answering", answering, RECOVER_DEADLINE)
        out["badges_left"] = {u: b for u, b in app.host_status().items() if b}
        out["rows"] = sum(len(v) for v in app._by_host.values())
        out["generations"] = {hv.uri: hv.generation for hv in app.hypervisors}
    for hv in app.hypervisors:
        hv.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang", type=int, default=0)
    parser.add_argument("--cycles", type=int, default=0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--stopped", type=float, default=5.0)
    parser.add_argument("--watch", type=float, default=0.0)
    parser.add_argument("--until", default="")
    opts, rest = parser.parse_known_args()
    print(json.dumps(asyncio.run(probe(opts, rest))), flush=True)
