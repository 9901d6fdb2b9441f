"""`virtdeck clone --from-snapshot VM SNAP NAME`: clones of a VM as it was at a snapshot (see
tui.core.snapclone), planned and carried out like `clone`."""

from __future__ import annotations

import argparse
import sys

from tui.cli import carry_out, find_domain, stderr_progress
from tui.cli.identity_args import identity_from_args
from tui.core import snapclone
from tui.core.hypervisor import Hypervisor
from tui.core.identity import IdentityError


def cmd_clone_snapshot(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    if not args.from_snapshot:
        args.parser_error("NAME is missing (clone TEMPLATE NAME)")
    if args.name is not None:
        args.parser_error("with --from-snapshot VM SNAP only NAME follows")
    unsupported = [
        opt
        for opt, given in (
            ("--start", args.start),
            ("--dir", args.dir),
            ("--identity cloud-init", args.identity == "cloud-init"),
        )
        if given
    ]
    if unsupported:
        args.parser_error(f"--from-snapshot does not take {', '.join(unsupported)} (yet)")
    vm, snap = args.from_snapshot
    name = args.template  # the one positional
    try:  # a bad key file or a contradiction is a usage error (exit 2), before any lookup
        who = identity_from_args(args)
        hv = find_domain(hypervisors, vm)
        plan = snapclone.plan_snapshot_clone(
            hv, vm, snap, name, count=args.count, full=args.full, identity=who
        )
    except IdentityError as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return 2
    return carry_out(
        args,
        plan,
        lambda: snapclone.execute_snapshot_clone(hv, plan, stderr_progress),
        lambda names: [f"{n}: {plan.mode} clone of {vm} at {snap}" for n in names],
        result_key="clones",
        dry_result=[],
    )
