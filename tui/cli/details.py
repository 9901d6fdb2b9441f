"""`virtdeck show`, `virtdeck console` and `virtdeck ssh`: reaching one domain."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from tui.cli import find_domain, format_table, print_json
from tui.core.details import (
    DomainDetails,
    console_command,
    read_details,
    refuse_demo_ssh,
    run_attached,
    ssh_command,
)
from tui.core.hypervisor import Hypervisor

Runner = Callable[[Sequence[str]], int]


runner: Runner = run_attached  # tests swap it


def register(sub: Any) -> None:
    p = sub.add_parser("show", help="a domain's addresses, consoles, graphics and disks")
    p.add_argument("name", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_show)
    p = sub.add_parser(
        "console", help="attach to a running domain's serial console (Ctrl-] detaches)"
    )
    p.add_argument("name", metavar="DOMAIN")
    p.set_defaults(handler=cmd_console)
    p = sub.add_parser("ssh", help="ssh to a running domain's first address")
    p.add_argument("name", metavar="DOMAIN")
    p.add_argument("-l", "--user", default="root", help="login name (default root)")
    p.set_defaults(handler=cmd_ssh)


def _details(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> DomainDetails:
    hv = find_domain(hypervisors, args.name)
    return read_details(hv, args.name)


def cmd_show(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    details = _details(args, hypervisors)
    if args.json:
        print_json(details.to_json())
        return 0
    print("\n".join(describe(details)))
    return 0


def cmd_console(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    return runner(console_command(_details(args, hypervisors)))


def cmd_ssh(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    refuse_demo_ssh(find_domain(hypervisors, args.name))
    return runner(ssh_command(_details(args, hypervisors), args.user))


def describe(d: DomainDetails) -> list[str]:
    """The details as text lines (the CLI prints them; the dashboard has its own view)."""
    lines = [f"{d.name}  {d.state.value}  on {d.host}", "", "Interfaces"]
    if not d.interfaces:
        lines.append("  none")
    rows = [["MAC", "TYPE", "NETWORK", "MODEL", "GUEST", "ADDRESSES"]]
    for i in d.interfaces:
        addrs = ", ".join(f"{a} ({a.source})" for a in i.addresses) or "-"
        rows.append(
            [i.mac or "-", i.type, i.source or "-", i.model or "-", i.guest_name or "-", addrs]
        )
    if d.interfaces:
        lines += format_table(rows, indent="  ")
    lines.append("  address sources:")
    for s in d.sources:
        lines.append(f"    {s.source}: " + ("ok" if s.ok else s.reason))
    lines += ["", "Graphics"]
    for g in d.graphics:
        where = f"socket {g.socket}" if g.socket else f"{g.listen or '*'}:{g.port or '-'}"
        tls = f" tls {g.tls_port}" if g.tls_port else ""
        lines.append(f"  {g.type} {where}{tls}")
        lines.append(f"    reach it: {g.tunnel}" if g.tunnel else f"    ({g.reason})")
    if not d.graphics:
        lines.append("  none")
    lines += ["", "Console"]
    for c in d.consoles:
        lines.append(f"  {c.kind} {c.type} {c.target or ''} {c.path or ''}".rstrip())
    why = d.console_refusal()
    lines.append(f"  {why}" if why else f"  attach: virtdeck console {d.name}  (Ctrl-] detaches)")
    lines += ["", "Disks"]
    for disk in d.disks:
        lines.append(f"  {disk.target}  {disk.described}")
    if not d.disks:
        lines.append("  none")
    lines += ["", "Recent operations"]
    for r in d.operations:
        when = r.time.replace("T", " ")[:19]
        lines.append(f"  {when}  {r.user}  {r.operation}  {r.result}  {r.duration:.1f}s")
        if r.error:
            lines.append(f"    {r.error}")
    if not d.operations:
        lines.append("  none recorded ('virtdeck log' shows the whole trail)")
    return lines
