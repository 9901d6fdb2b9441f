"""What every command that takes a group shares: the selection options (several NAMEs,
`--template NAME`, `--match GLOB`), resolving them over the connected hosts, and carrying a
group plan out (see tui.core.groups)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tui.cli import add_plan_options, carry_out, find_domain, report_unreachable, stderr_progress
from tui.core.errors import OperationError
from tui.core.fleet import on_each
from tui.core.hypervisor import Hypervisor

if TYPE_CHECKING:
    from tui.core import groups


def add_group_options(p: argparse.ArgumentParser, *, plan_options: bool = True) -> None:
    p.add_argument(
        "--template",
        metavar="NAME",
        help="also every clone of template NAME (from virtdeck's metadata)",
    )
    p.add_argument(
        "--match",
        metavar="GLOB",
        help="also every domain whose name matches GLOB (quote it: --match 'web-*')",
    )
    if plan_options:
        add_plan_options(p)


def is_group(args: argparse.Namespace, names: list[str]) -> bool:
    return len(names) != 1 or args.template is not None or args.match is not None


def need_selection(parser_error: Any, args: argparse.Namespace, names: list[str]) -> None:
    if not names and args.template is None and args.match is None:
        parser_error("name at least one domain, or give --template NAME or --match GLOB")


def resolver(hypervisors: list[Hypervisor]) -> groups.HostResolver:
    by_uri = {hv.uri: hv for hv in hypervisors}

    def resolve(uri: str) -> Hypervisor:
        try:
            return by_uri[uri]
        except KeyError:
            raise OperationError(f"not connected to {uri}") from None

    return resolve


def members(
    args: argparse.Namespace, hypervisors: list[Hypervisor], names: list[str]
) -> list[groups.Member]:
    """The selection's members. Names alone are looked up one by one (as single-domain
    commands do); --template and --match read every host's domains, in parallel."""
    from tui.core import groups  # here: `virtdeck ls` shares this module's imports

    if args.template is None and args.match is None:
        out = [groups.Member(find_domain(hypervisors, n).uri, n) for n in names]
        return list(dict.fromkeys(out))
    timeout = max((hv.timeout for hv in hypervisors), default=10.0)
    result = on_each(hypervisors, lambda hv: hv.domains(), timeout=timeout)
    report_unreachable(args, result.failures)
    domains = {hv.uri: result.answers.get(hv.uri, []) for hv in hypervisors}
    return groups.select(domains, names=names, template=args.template, match=args.match)


def carry_out_group(args: argparse.Namespace, plan: groups.GroupPlan) -> int:
    """The group's plan through `carry_out`; a line per member; exit 1 if any failed."""
    from tui.core import groups

    results: list[groups.MemberResult] = []

    def execute() -> list[dict[str, Any]]:
        try:
            results.extend(plan.execute(progress=stderr_progress))
        except groups.GroupFailed as err:
            results.extend(err.results)
        return [r.to_json() for r in results]

    def describe(_rows: Any) -> list[str]:
        for r in results:
            if not r.ok:
                print(f"virtdeck: {r.text}", file=sys.stderr)
        return [r.text for r in results if r.ok]

    status = carry_out(args, plan, execute, describe, result_key="results", dry_result=[])
    failed = [r for r in results if not r.ok]
    if failed and getattr(args, "json", False):
        for r in failed:
            print(f"virtdeck: {r.text}", file=sys.stderr)
    return 1 if failed else status


def cmd_rm_group(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    """`virtdeck rm A B …` / `rm --template T` / `rm --match GLOB`: domains only (a template
    without its domain definition is removed by itself, by name)."""
    from tui.core import groups

    need_selection(args.parser_error, args, args.names)
    found = members(args, hypervisors, args.names)
    plan = groups.plan_group(
        resolver(hypervisors),
        "rm",
        found,
        storage=args.storage,
        backup_dir=args.backup_dir,
        others=hypervisors,
        force=args.force,
    )
    return carry_out_group(args, plan)
