"""`virtdeck migrate`: move domains to another hypervisor, offline or live (tui.core.migrate)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tui.cli import positive_int, print_json, stderr_progress
from tui.cli.groups import add_group_options, members, need_selection
from tui.core.cancel import check_cancelled
from tui.core.errors import InvalidInputError, VirtdeckError
from tui.core.hypervisor import Hypervisor

HELP = "move domains to another hypervisor, offline or live (a thin clone stays thin)"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help=HELP,
        description=(
            "Move domains to another hypervisor. A thin clone sends only its own "
            "layers when the target has its template (recognised by the sha256 of its base, "
            "never by name); else the template is copied there first. Offline (shut-off "
            "domains): each layer is streamed sparse through libvirt, checked (size, sha256, "
            "qemu-img check) and rebased onto the target's base; the domain is defined there "
            "with its snapshots; only then is the source undefined and its own files deleted. "
            "Live (--live, running domains): an overlay is made on the target over its copy of "
            "the base and libvirt's live migration fills it with the domain's own layer and "
            "moves its memory (no copy at all on shared storage); an interrupt before the "
            "switchover leaves it running on the source."
        ),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="domains to move")
    p.add_argument("--to", required=True, metavar="URI|HOST", help="target URI or saved host")
    p.add_argument("--dir", metavar="DIR", help="image directory on the target (default: its pool)")
    p.add_argument(
        "--keep-source",
        action="store_true",
        help="keep the source stopped, renamed NAME-migrated, with its files",
    )
    p.add_argument("--live", action="store_true", help="move running domains, live")
    p.add_argument(
        "--max-downtime",
        type=positive_int,
        metavar="MS",
        help="live: how long the domain may be paused for the switchover (milliseconds)",
    )
    p.add_argument(
        "--bandwidth", type=positive_int, metavar="MIB/S", help="live: cap the transfer's rate"
    )
    p.add_argument(
        "--all-from",
        metavar="URI|HOST",
        help="every domain of that host (a drain): running ones live, shut-off ones offline",
    )
    add_group_options(p)
    p.set_defaults(handler=cmd_migrate, parser_error=p.error)


def _uri(args: argparse.Namespace, value: str) -> str:
    if "://" in value or value.startswith("qemu:") or value.startswith("test:"):
        return value
    settings = getattr(args, "settings", None)
    if settings is None:
        raise InvalidInputError(f"'{value}' is no URI and no saved host")
    return str(settings.host(value).uri)


def _live(args: argparse.Namespace, live: bool | None) -> dict[str, Any]:
    return {"live": live, "max_downtime": args.max_downtime, "bandwidth": args.bandwidth}


def _selected(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> list[Any]:
    """The domains named or matched, or with --all-from every domain of that host."""
    from tui.core.groups import Member

    if args.all_from is None:
        need_selection(args.parser_error, args, args.names)
        return list(members(args, hypervisors, args.names))
    from_uri = _uri(args, args.all_from)
    hv = next((h for h in hypervisors if h.uri == from_uri), None)
    if hv is None:
        raise InvalidInputError(f"--all-from {args.all_from}: not connected (add -c {from_uri})")
    return [Member(hv.uri, d.name) for d in hv.domains() if not d.is_template]


def cmd_migrate(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    from tui.core import migrate

    target_uri = _uri(args, args.to)
    if (args.max_downtime or args.bandwidth) and not args.live and args.all_from is None:
        args.parser_error("--max-downtime and --bandwidth apply to a live migration (--live)")
    # (a drain: each domain as its state asks)
    live: bool | None = None if args.all_from is not None else bool(args.live)
    found = [m for m in _selected(args, hypervisors) if m.host != target_uri]
    if not found:
        raise InvalidInputError("nothing to migrate: no domain selected outside the target")
    by_uri = {hv.uri: hv for hv in hypervisors}
    target = by_uri.get(target_uri)
    opened = target is None
    if target is None:
        target = Hypervisor.open(target_uri)
    plans: list[Any] = []
    refused: list[str] = []
    status = 0
    try:
        for m in found:
            try:
                plans.append(
                    migrate.plan_migrate(
                        by_uri[m.host], target, m.name, directory=args.dir,
                        keep_source=args.keep_source, progress=stderr_progress,
                        record=not args.dry_run, **_live(args, live),
                    )
                )  # fmt: skip
            except VirtdeckError as err:
                refused.append(f"{m.name}: {err}")
        for line in refused:
            print(f"virtdeck: {line}", file=sys.stderr)
        for plan in plans:
            for line in plan.summary():
                print(f"virtdeck: plan: {line}", file=sys.stderr)
        results: list[dict[str, Any]] = []
        if not args.dry_run:
            for plan in plans:
                check_cancelled()  # Ctrl-C, SIGTERM, SIGHUP: the rest are not started
                try:
                    if plan.template_copy is not None and target.exists(plan.template or ""):
                        # An earlier member copied the template: plan this one on it.
                        plan = migrate.plan_migrate(
                            by_uri[plan.source_host], target, plan.domain, directory=args.dir,
                            keep_source=args.keep_source, progress=stderr_progress,
                            record=not args.dry_run, **_live(args, live),
                        )  # fmt: skip
                    done = migrate.execute_migrate(by_uri[plan.source_host], target, plan,
                                                   stderr_progress)  # fmt: skip
                    result = {"domain": plan.domain, "ok": True, "live": plan.live}
                    if plan.live:
                        result["result"] = done
                    results.append(result)
                    if not args.json:
                        how = f" live ({done})" if plan.live else ""
                        print(f"{plan.domain}: migrated to {plan.target_host}{how}")
                except VirtdeckError as err:
                    results.append({"domain": plan.domain, "ok": False, "error": str(err)})
                    print(f"virtdeck: {plan.domain}: {err}", file=sys.stderr)
                    status = 1
        if args.json:
            from tui.core import ops

            print_json({"plans": [ops.plan_json(p) for p in plans], "refused": refused,
                        "dry_run": bool(args.dry_run), "results": results})  # fmt: skip
        return 1 if refused or status else 0
    finally:
        if opened:
            target.close()
