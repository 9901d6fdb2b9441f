"""`virtdeck recover`: list and roll back operations whose process died half-way (see
tui.core.ops: every operation journals how to undo each step before the step acts)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tui.cli.output import print_json
from tui.core import bases, ops, undo_kinds  # noqa: F401  (every undo kind registered)
from tui.core.cancel import Interrupted, check_cancelled, run_cancellable
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


def undo_when_back(wait: float) -> int:
    """After an operation was cut off by a lost host (its error line printed): wait up to
    `wait` seconds for the host to answer again, reconnect, and undo what the operation left,
    as `virtdeck recover --yes` would (the same identity-checked steps, under the same locks).
    Returns 0 when everything was undone (the command still failed: the caller exits 1), 1 when
    something is left to 'virtdeck recover', 130 when interrupted while waiting."""
    import time

    from tui.core.errors import ConnectError

    items = []
    for path in ops.kept_for_lost_hosts():
        try:
            items.append(ops.load(path))
        except ValueError:
            continue
    if not items:
        return 1
    if wait <= 0:
        return 1  # the error line already says 'virtdeck recover' tries again
    hosts = sorted({item.host for item in items})
    start = time.monotonic()
    deadline = start + wait
    left = list(items)

    def waiting() -> int:
        status = 0
        for host in hosts:
            hv = Hypervisor.unconnected(host)
            try:
                for item in [i for i in items if i.host == host]:
                    if not _undo_until(hv, item, deadline, start):
                        status = 1
                    left.remove(item)
            finally:
                hv.close()
        return status

    try:  # (a Ctrl-C right after the line below is a Ctrl-C while waiting too)
        print(
            f"virtdeck: waiting up to {wait:g} s for {', '.join(hosts)} to answer again, to undo "
            "what was left (Ctrl-C leaves it to 'virtdeck recover')",
            file=sys.stderr,
            flush=True,
        )
        # In a worker, with the signals turned into cancel(): a Ctrl-C is never raised inside
        # a lock of the threading module (it was: 'release unlocked lock', a traceback).
        status = run_cancellable(waiting)
    except (KeyboardInterrupt, Interrupted, ConnectError) as err:
        stopped = isinstance(err, (KeyboardInterrupt, Interrupted))
        why = "interrupted" if stopped else str(err)
        for item in left:
            print(
                f"virtdeck: {why} while waiting: 'virtdeck recover' undoes '{item.title}' on "
                f"{item.host}",
                file=sys.stderr,
                flush=True,
            )
        return 130 if stopped else 1
    return status


def _undo_until(hv: Hypervisor, item: ops.Pending, deadline: float, start: float) -> bool:
    """Connect (again) and recover `item` until it is undone or the deadline passed."""
    import time

    from tui.core.errors import ConnectError

    failed: list[str] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            why = f"; could not undo: {', '.join(failed)}" if failed else ""
            print(
                f"virtdeck: {item.host} did not answer within {deadline - start:g} s{why}: "
                f"'virtdeck recover' undoes '{item.title}'",
                file=sys.stderr,
                flush=True,
            )
            return False
        check_cancelled()
        try:
            if not hv.alive:
                hv.try_connect(min(left, 1.0))  # (the open goes on between tries)
            skipped: list[str] = []
            failed = bases.recover(hv, item, skipped)
        except ConnectError as err:
            failed = [str(err)]
            _pause(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        except VirtdeckError as err:
            failed = [str(err)]
        if not failed:
            for line in skipped:
                print(f"virtdeck: {item.title}: {line}", file=sys.stderr, flush=True)
            steps = "; ".join(a.label for a in reversed(item.undo)) or "nothing to undo"
            print(
                f"virtdeck: {item.host} answered again after {time.monotonic() - start:.0f} s; "
                f"undid '{item.title}': {steps}",
                file=sys.stderr,
                flush=True,
            )
            return True
        # Still failing (libvirt may still be finishing what it was asked): the journal now
        # holds only what failed; try that again shortly.
        try:
            item = ops.load(item.path)
        except ValueError:
            return False
        _pause(min(2.0, max(0.0, deadline - time.monotonic())))


def _pause(seconds: float) -> None:
    """Sleep, stopping at once when the wait is cancelled (Ctrl-C: Interrupted)."""
    import time

    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        check_cancelled()
        time.sleep(min(0.1, left))
    check_cancelled()
