"""`virtdeck recover`: list and roll back operations whose process died half-way (see
tui.core.ops: every operation journals how to undo each step before the step acts)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tui.cli import print_json
from tui.core import bases, ops, undo_kinds  # noqa: F401  (every undo kind registered)
from tui.core.errors import InvalidInputError, VirtdeckError
from tui.core.hypervisor import Hypervisor


def register(sub: Any) -> None:
    p = sub.add_parser(
        "recover",
        help="list, and with --yes roll back, operations a crash or kill left half-done",
    )
    p.add_argument("--yes", action="store_true", help="roll them back (default: only list)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # Listing reads only the journals: it works while the hosts are down (what a crash left
    # is wanted most then); --yes opens each journal's host itself, or uses the one given.
    p.set_defaults(handler=cmd_recover, needs_hosts=lambda a: a.yes)


def cmd_recover(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    scan = ops.scan()
    found = scan.pending
    by_uri = {hv.uri: hv for hv in hypervisors}
    broken = [{"path": str(b.path), "broken": b.reason} for b in scan.broken]
    alive = [{**_json(p), "running": True} for p in scan.alive]
    if not args.json:
        for b in scan.broken:
            print(f"broken journal {b.path}: {b.reason} (left as it is)")
        for p in scan.alive:
            print(f"skipped: '{p.title}' on {p.host} is still running (pid {p.pid})")
    if args.json and not args.yes:
        print_json([_json(p) for p in found] + broken + alive)
        return 0
    if not found:
        if not args.json and not scan.broken and not scan.alive:
            print("nothing to recover: no operation was left half-done")
        if args.json:
            print_json(broken + alive)
        return 1 if broken and args.yes else 0
    status = 1 if broken and args.yes else 0
    results = []
    opened: list[Hypervisor] = []
    for item in found:
        if not args.yes:
            print(f"half-done: {item.describe()}")
            continue
        hv = by_uri.get(item.host)
        if hv is None:
            try:
                hv = by_uri[item.host] = Hypervisor.open(item.host)
            except VirtdeckError as err:
                raise InvalidInputError(f"'{item.title}' ran on {item.host}: {err}") from None
            opened.append(hv)
        skipped: list[str] = []
        failed = bases.recover(hv, item, skipped)  # under the image families' locks
        results.append({**_json(item), "failed": failed, "skipped": skipped})
        if not args.json:
            for line in skipped:
                print(f"{item.title}: {line}")
        if failed:
            status = 1
            print(f"virtdeck: could not undo all of '{item.title}': {', '.join(failed)}",
                  file=sys.stderr)  # fmt: skip
        elif not args.json:
            print(f"rolled back: {item.title} on {item.host}")
    for hv in opened:
        hv.close()
    if args.json:
        print_json(results + broken + alive)
    elif not args.yes:
        print("roll them back with 'virtdeck recover --yes'")
    return status


def _json(item: ops.Pending) -> dict[str, Any]:
    return {
        "id": item.id,
        "host": item.host,
        "title": item.title,
        "started": item.started,
        "pid": item.pid,
        "undo": [a.label for a in reversed(item.undo)],
    }
