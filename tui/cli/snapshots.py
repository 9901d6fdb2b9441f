"""`virtdeck snapshot ls|create|revert|delete` and `virtdeck rollback` (see tui.core.snapshots)."""

from __future__ import annotations

import argparse
from typing import Any

from tui.cli import add_plan_options, carry_out, find_domain, print_json, stderr_progress
from tui.cli.groups import (
    add_group_options,
    carry_out_group,
    is_group,
    members,
    need_selection,
    resolver,
)
from tui.core import groups, snapshots
from tui.core.hypervisor import Hypervisor
from tui.core.units import size


def register(sub: Any) -> None:
    """Add this module's subcommands to the parser."""
    snap = sub.add_parser("snapshot", help="snapshot trees: list, create, revert, delete")
    ssub = snap.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)

    p = ssub.add_parser("ls", help="a domain's snapshot tree (the current one marked)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_ls)

    p = ssub.add_parser(
        "create",
        help="take a snapshot (of one DOMAIN, or of a group: NAME with --domain, --template "
        "or --match)",
        usage="%(prog)s [DOMAIN] NAME [--domain D ...] [--template T] [--match GLOB] [options]",
    )
    p.add_argument("words", metavar="[DOMAIN] NAME", nargs="+", help=argparse.SUPPRESS)
    p.add_argument(
        "--domain",
        dest="domains",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="a domain of the group (repeatable); the same snapshot NAME for each",
    )
    add_group_options(p, plan_options=False)
    p.add_argument(
        "--external",
        action="store_true",
        help="a copy-on-write overlay per disk (raw or qcow2), memory too when running",
    )
    p.add_argument(
        "--disk-only", action="store_true", help="with --external: disks only, no memory state"
    )
    p.add_argument("--description", default="", metavar="TEXT", help="what this snapshot is for")
    p.add_argument(
        "--quiesce", action="store_true", help="freeze guest file systems (needs the guest agent)"
    )
    add_plan_options(p)
    p.set_defaults(handler=cmd_create, parser_error=p.error)

    p = ssub.add_parser("revert", help="go back to a snapshot (the current state is lost)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("name", metavar="NAME")
    add_plan_options(p)
    p.set_defaults(handler=cmd_revert)

    p = ssub.add_parser("delete", help="delete a snapshot (its data merges into what follows)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--children", action="store_true", help="delete its descendants too")
    add_plan_options(p)
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("rollback", help="revert domains to their current snapshot")
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="one or more domains")
    add_group_options(p)
    p.set_defaults(handler=cmd_rollback, parser_error=p.error)


def cmd_ls(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.domain)
    tree = snapshots.snapshot_tree(hv, args.domain)
    if args.json:
        print_json([n.to_json() for n in tree.nodes])
        return 0
    if not tree.nodes:
        print(f"{args.domain}: no snapshots")
        return 0
    print(tree.render(), end="")
    for node in tree.nodes:
        created = node.created.astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
        line = f"{node.name}: {node.kind}, {node.state}, {created}"
        if node.description:
            line += f" - {node.description}"
        print(line)
        for f in node.files:
            why = f": {f.problem}" if f.problem else ""
            print(f"    {f.role}: {f.path} ({size(f.size_bytes)}{why})")
    return 0


def _create_shape(args: argparse.Namespace) -> tuple[str | None, str]:
    """`create DOMAIN NAME`, or `create NAME` with --domain/--template/--match (a group)."""
    grouped = bool(args.domains) or args.template is not None or args.match is not None
    if grouped:
        if len(args.words) != 1:
            args.parser_error(
                "with --domain, --template or --match give only the snapshot NAME "
                f"(got {' '.join(args.words)})"
            )
        return None, args.words[0]
    if len(args.words) != 2:
        args.parser_error(
            "give DOMAIN NAME, or NAME with --domain DOMAIN (repeatable), --template T or "
            "--match GLOB"
        )
    return args.words[0], args.words[1]


def cmd_create(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    domain, name = _create_shape(args)
    if domain is None:
        found = members(args, hypervisors, args.domains)
        group = groups.plan_group(
            resolver(hypervisors),
            "snapshot",
            found,
            snapshot=name,
            external=args.external,
            disk_only=args.disk_only,
            description=args.description,
            quiesce=args.quiesce,
        )
        return carry_out_group(args, group)
    args.domain, args.name = domain, name
    hv = find_domain(hypervisors, args.domain)
    plan = snapshots.plan_create(
        hv,
        args.domain,
        args.name,
        external=args.external,
        disk_only=args.disk_only,
        description=args.description,
        quiesce=args.quiesce,
    )
    return carry_out(
        args,
        plan,
        lambda: snapshots.create(hv, plan, stderr_progress).to_json(),
        lambda node: [f"{args.domain}: {node['kind']} snapshot '{node['name']}' created"],
    )


def _revert(args: argparse.Namespace, hv: Hypervisor, plan: snapshots.RevertPlan) -> int:
    def execute() -> dict[str, str]:
        snapshots.revert(hv, plan, stderr_progress)
        return {"domain": plan.domain, "snapshot": plan.snapshot, "state": plan.result_state}

    return carry_out(
        args,
        plan,
        execute,
        lambda r: [f"{r['domain']}: reverted to '{r['snapshot']}' ({r['state']})"],
    )


def cmd_revert(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.domain)
    return _revert(args, hv, snapshots.plan_revert(hv, args.domain, args.name))


def cmd_rollback(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    need_selection(args.parser_error, args, args.domains)
    if is_group(args, args.domains):
        found = members(args, hypervisors, args.domains)
        return carry_out_group(args, groups.plan_group(resolver(hypervisors), "rollback", found))
    hv = find_domain(hypervisors, args.domains[0])
    return _revert(args, hv, snapshots.plan_rollback(hv, args.domains[0]))


def cmd_delete(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.domain)
    plan = snapshots.plan_delete(hv, args.domain, args.name, children=args.children)

    def execute() -> list[str]:
        snapshots.delete(hv, plan, stderr_progress)
        return list(plan.names)

    return carry_out(
        args,
        plan,
        execute,
        lambda names: [f"{args.domain}: deleted {', '.join(repr(n) for n in names)}"],
    )
