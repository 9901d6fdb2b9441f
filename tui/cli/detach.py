"""`virtdeck detach NAME... | --template T | --match GLOB`: thin clones become full (see
tui.core.detach): the plans on stderr, then each detach (a shut-off clone's chain converted
into a new image, a running clone's base pulled in live); Ctrl-C, SIGTERM or SIGHUP leave the
clone being detached as it was."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tui.cli import carry_out, positive_int, stderr_progress
from tui.cli.groups import add_group_options, members, need_selection
from tui.core import detach
from tui.core.errors import VirtdeckError
from tui.core.hypervisor import Hypervisor


def register(sub: Any) -> None:
    p = sub.add_parser(
        "detach",
        help="make a thin clone full: its disks stop building on the template's base",
        description="Make thin clones full. Shut off: each disk's chain is converted into a "
        "new standalone image beside the overlay, the definition switched to it, the old "
        "overlay removed last. Running: the base is pulled into each overlay live (libvirt "
        "block pull), the guest keeps running. Refused while a clone has snapshots. An "
        "interrupt leaves the clone being detached as it was (still thin). Several clones "
        "are detached one after another.",
    )
    p.add_argument("names", metavar="NAME", nargs="*", help="one or more clones")
    p.add_argument(
        "--bandwidth",
        metavar="MIB",
        type=positive_int,
        default=0,
        help="at most MIB MiB/s for a running clone's block pull, so the other guests on the "
        "host keep their disk (default: no limit; a shut-off clone's copy is not limited)",
    )
    add_group_options(p)
    p.set_defaults(handler=cmd_detach, parser_error=p.error)


def cmd_detach(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    need_selection(args.parser_error, args, args.names)
    by_uri = {hv.uri: hv for hv in hypervisors}
    found = [(by_uri[m.host], m.name) for m in members(args, hypervisors, args.names)]
    plan = detach.plan_group_detach(found, bandwidth=args.bandwidth)
    hv_of = {id(p): by_uri[p.host] for p in plan.plans}
    failed: list[str] = []

    def execute() -> list[dict[str, Any]]:
        done = []
        for p in plan.plans:
            try:
                paths = detach.execute_detach(hv_of[id(p)], p, stderr_progress)
            except VirtdeckError as err:
                failed.append(f"{p.domain}: {err}")
                break
            done.append({"domain": p.domain, "images": paths})
        return done

    def describe(done: list[dict[str, Any]]) -> list[str]:
        return [f"{d['domain']}: detached, now full ({', '.join(d['images'])})" for d in done]

    status = carry_out(args, plan, execute, describe, result_key="detached", dry_result=[])
    for line in failed:
        print(f"virtdeck: {line}", file=sys.stderr)
    return 1 if failed else status
