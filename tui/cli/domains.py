"""`virtdeck ls` and the lifecycle commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import humanize

from tui.cli import find_domain, format_table, print_json, report_unreachable
from tui.core.fleet import on_each
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo


def register(sub: Any) -> None:
    p = sub.add_parser("ls", help="list domains of every connected hypervisor")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_ls)
    for name, helptext in (
        ("start", "start a domain"),
        ("destroy", "force a domain off (pull the plug)"),
        ("reboot", "reboot a running domain"),
        ("suspend", "pause a running domain"),
        ("resume", "resume a paused domain"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(handler=cmd_lifecycle, action=name)
    p = sub.add_parser("shutdown", help="shut a domain down gracefully and wait for it")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the guest to power off "
        "(default: config timeouts.shutdown, else 60)",
    )
    p.add_argument("--no-wait", action="store_true", help="ask the guest and return at once")
    p.set_defaults(handler=cmd_shutdown)


def _row(d: DomainInfo, show_host: bool) -> list[str]:
    alloc = d.disk_allocation_bytes
    row = [
        d.name + (" [T]" if d.is_template else ""),
        d.state.value,
        str(d.vcpus),
        humanize.naturalsize(d.memory_bytes, binary=True),
        "-" if d.cpu_percent is None else f"{d.cpu_percent:.1f}%",
        "-" if alloc is None else humanize.naturalsize(alloc, binary=True),
    ]
    return ([d.host] if show_host else []) + row


def cmd_ls(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    """Every host asked in parallel; one that does not answer in time gets a line on stderr
    and the others' domains are printed (exit 1)."""
    timeout = max((hv.timeout for hv in hypervisors), default=10.0)
    result = on_each(hypervisors, lambda hv: hv.domains(), timeout=timeout)
    report_unreachable(args, result.failures)
    domains = [d for hv in hypervisors for d in result.answers.get(hv.uri, [])]
    if args.json:
        print_json([d.to_json() for d in domains])
        return 0
    show_host = len(hypervisors) + len(args.unreachable) > 1
    header = (["HOST"] if show_host else []) + ["NAME", "STATE", "VCPUS", "MEMORY", "CPU", "DISK"]
    rows = [header] + [_row(d, show_host) for d in domains]
    print("\n".join(format_table(rows)))
    return 0


def cmd_lifecycle(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.name)
    getattr(hv, args.action)(args.name)
    print(f"{args.name}: {args.action} done")
    return 0


def cmd_shutdown(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.name)
    if args.no_wait:
        hv.shutdown(args.name)
        print(f"{args.name}: shutdown requested")
        return 0
    if args.timeout is None:
        args.timeout = args.settings.shutdown_timeout
    if hv.shutdown_and_wait(args.name, args.timeout):
        print(f"{args.name}: shut off")
        return 0
    print(
        f"virtdeck: '{args.name}' is still running after {args.timeout:g} s "
        f"(the guest ignored the request); force it off with 'virtdeck destroy {args.name}'",
        file=sys.stderr,
    )
    return 1
