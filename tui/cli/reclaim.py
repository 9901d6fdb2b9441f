"""`virtdeck reclaim` (see tui.core.reclaim): plan, print the plan, delete."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tui.cli import COMMANDS, add_plan_options, carry_out, stderr_progress
from tui.core import reclaim
from tui.core.hypervisor import Hypervisor


def register(sub: Any) -> None:
    """Add this module's subcommand to the parser."""
    p = sub.add_parser("reclaim", help=COMMANDS["reclaim"][1])
    p.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(p)
    p.set_defaults(handler=cmd_reclaim)


def cmd_reclaim(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    status = 0
    for hv in hypervisors:
        status |= _one(args, hv, hypervisors)
    return status


def _one(args: argparse.Namespace, hv: Hypervisor, hypervisors: list[Hypervisor]) -> int:
    plan = reclaim.plan_reclaim(hv, backup_dir=args.backup_dir, others=hypervisors)
    return carry_out(
        args,
        plan,
        lambda: reclaim.execute_reclaim(
            hv, plan, stderr_progress, backup_dir=args.backup_dir, others=hypervisors
        ),
        lambda done: [f"deleted {p}" for p in done] or ["nothing deleted"],
        result_key="deleted",
        dry_result=[],
    )
