"""`virtdeck detach NAME`: a thin clone becomes full (see tui.core.detach): the plan on
stderr, then the detach (a shut-off clone's chain converted into a new image, a running
clone's base pulled in live); Ctrl-C, SIGTERM or SIGHUP leave it as it was."""

from __future__ import annotations

import argparse
from typing import Any

from tui.cli import add_plan_options, carry_out, find_domain, stderr_progress
from tui.core import detach
from tui.core.hypervisor import Hypervisor


def register(sub: Any) -> None:
    p = sub.add_parser(
        "detach",
        help="make a thin clone full: its disks stop building on the template's base",
        description="Make a thin clone full. Shut off: each disk's chain is converted into a "
        "new standalone image beside the overlay, the definition switched to it, the old "
        "overlay removed last. Running: the base is pulled into each overlay live (libvirt "
        "block pull), the guest keeps running. Refused while the clone has snapshots. An "
        "interrupt leaves the clone as it was (still thin).",
    )
    p.add_argument("name", metavar="NAME")
    add_plan_options(p)
    p.set_defaults(handler=cmd_detach)


def cmd_detach(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.name)
    plan = detach.plan_detach(hv, args.name)
    return carry_out(
        args,
        plan,
        lambda: detach.execute_detach(hv, plan, stderr_progress),
        lambda paths: [f"{args.name}: detached, now full ({', '.join(paths)})"],
        result_key="images",
        dry_result=[],
    )
