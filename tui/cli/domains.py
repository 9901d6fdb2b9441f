"""`virtdeck ls` and the lifecycle commands."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from tui.cli import find_domain, format_table, print_json, report_unreachable
from tui.cli.groups import (
    add_group_options,
    carry_out_group,
    is_group,
    members,
    need_selection,
    resolver,
)
from tui.core.errors import VirtdeckError
from tui.core.fleet import on_each
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainInfo, natural_key


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ls",
        help="list domains of every connected hypervisor",
        description="List the domains of every host. Hosts are connected and listed in "
        "parallel; with several hosts each host's rows are printed as soon as it and every "
        "host before it (in the order given) have answered, so the output order is always the "
        "same; a host that does not answer in time gets one line on stderr (exit 1).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # ls connects by itself: each host is listed as soon as it is connected (not after all)
    p.set_defaults(handler=cmd_ls, needs_hosts=False)
    for name, helptext in (
        ("start", "start domains"),
        ("destroy", "force domains off (pull the plug)"),
        ("reboot", "reboot running domains"),
        ("suspend", "pause running domains"),
        ("resume", "resume paused domains"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("names", metavar="NAME", nargs="*", help="one or more domains")
        add_group_options(p)
        p.set_defaults(handler=cmd_lifecycle, action=name, parser_error=p.error)
    p = sub.add_parser("shutdown", help="shut domains down gracefully and wait for them")
    p.add_argument("names", metavar="NAME", nargs="*", help="one or more domains")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the guest to power off "
        "(default: config timeouts.shutdown, else 60)",
    )
    p.add_argument("--no-wait", action="store_true", help="ask the guest and return at once")
    add_group_options(p)
    p.set_defaults(handler=cmd_shutdown, parser_error=p.error)


def _row(d: DomainInfo, show_host: bool) -> list[str]:
    import humanize  # (here, not at import: `virtdeck ls` starts faster)

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


def cmd_ls(args: argparse.Namespace, _none: list[Hypervisor]) -> int:
    """Several hosts (not --json, not --demo): each connected and listed in its own thread,
    printed in the order given as answers arrive (`_stream_ls`). Else every host connected,
    then asked in parallel. A host that does not answer in time gets a line on stderr and the
    others' domains are printed (exit 1)."""
    from tui.cli import connect, host_uris

    uris = [] if args.demo else host_uris(args, args.settings)
    if len(uris) > 1 and not args.json:
        return _stream_ls(args, uris)
    hypervisors = connect(args)
    try:
        status = _ls(args, hypervisors)
    finally:
        for hv in hypervisors:
            hv.close()
    return 1 if args.unreachable and status == 0 else status


def _ls(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    timeout = max((hv.timeout for hv in hypervisors), default=10.0)
    result = on_each(hypervisors, lambda hv: hv.domains(), timeout=timeout)
    report_unreachable(args, result.failures)
    domains = [
        d
        for hv in hypervisors
        for d in sorted(result.answers.get(hv.uri, []), key=lambda d: natural_key(d.name))
    ]
    if args.json:
        by_host = {hv.uri: hv for hv in hypervisors}
        found = listed_addresses([(by_host[d.host], d) for d in domains])
        print_json([{**d.to_json(), **found[(d.host, d.name)]} for d in domains])
        return 0
    show_host = len(hypervisors) + len(args.unreachable) > 1
    header = (["HOST"] if show_host else []) + ["NAME", "STATE", "VCPUS", "MEMORY", "CPU", "DISK"]
    rows = [header] + [_row(d, show_host) for d in domains]
    print("\n".join(format_table(rows)))
    return 0


def _stream_ls(args: argparse.Namespace, uris: list[str]) -> int:
    """Connect and list every host in its own thread; print host by host in the order given,
    each as soon as it and all before it have answered (or failed). One deadline for all:
    the connect timeout plus the answer timeout, from now. Columns widen as longer cells come
    (a later host with longer names shifts its own rows, never the ones printed)."""
    from tui.cli import report_unreachable
    from tui.core.hypervisor import no_answer

    settings = args.settings
    hvs = [Hypervisor.unconnected(uri) for uri in dict.fromkeys(uris)]
    answers: dict[int, list[DomainInfo] | str] = {}
    arrived = threading.Condition()

    def run(i: int, hv: Hypervisor) -> None:
        value: list[DomainInfo] | str
        try:
            hv.try_connect(settings.connect_timeout)
            hv.timeout = settings.answer_timeout
            value = hv.domains()
        except VirtdeckError as err:
            value = str(err)
        with arrived:
            answers[i] = value
            arrived.notify_all()

    for i, hv in enumerate(hvs):
        threading.Thread(target=run, args=(i, hv), name=f"ls {hv.uri}", daemon=True).start()
    waited = settings.connect_timeout + settings.answer_timeout
    deadline = time.monotonic() + waited
    header = ["HOST", "NAME", "STATE", "VCPUS", "MEMORY", "CPU", "DISK"]
    widths = [len(h) for h in header]
    first = True
    for i, hv in enumerate(hvs):
        with arrived:
            while i not in answers and time.monotonic() < deadline:
                arrived.wait(max(0.0, deadline - time.monotonic()))
            value = answers.get(i, str(no_answer(hv.uri, waited)))
        if isinstance(value, str):
            report_unreachable(args, {hv.uri: value})
            continue
        rows = [_row(d, True) for d in sorted(value, key=lambda d: natural_key(d.name))]
        if first:
            rows.insert(0, header)
        for row in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        if lines:
            print("\n".join(lines), flush=True)
        first = False
    if first:  # no host answered: the header alone
        print("  ".join(header))
    for hv in hvs:
        if hv.alive:
            hv.close()
    return 1 if args.unreachable else 0


ADDRESS_DEADLINE = 3.0  # seconds `ls --json` waits for all address answers together


def listed_addresses(
    domains: list[tuple[Hypervisor, DomainInfo]], deadline: float = ADDRESS_DEADLINE
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each domain's addresses for `ls --json`: running ones only, asked in parallel (lease
    and a connected guest agent; see tui.core.details.addresses), a failure is a reason.

    A connected but silent guest agent holds its call for libvirt's agent timeout (5 s by
    default); changing that timeout would change it for everyone using the domain, so the
    listing stops waiting after `deadline` instead and says so. The callers run in daemon
    threads, so a call still waiting does not hold the command's exit."""
    import queue

    from tui.core.details import addresses

    out: dict[tuple[str, str], dict[str, Any]] = {}
    todo: queue.SimpleQueue[tuple[Hypervisor, DomainInfo]] = queue.SimpleQueue()
    for hv, d in domains:
        if d.state.active:
            todo.put((hv, d))
        else:
            out[(d.host, d.name)] = {"addresses": [], "address_errors": {}}

    def worker() -> None:
        while True:
            try:
                hv, d = todo.get_nowait()
            except queue.Empty:
                return
            try:
                addrs, sources = addresses(hv, d.name)
                found = {
                    "addresses": [asdict(a) for a in addrs],
                    "address_errors": {s.source: s.reason for s in sources if not s.ok},
                }
            except VirtdeckError as err:
                found = {"addresses": [], "address_errors": {"all": str(err)}}
            out[(d.host, d.name)] = found

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    late = {"addresses": [], "address_errors": {"all": f"no answer within {deadline:g} s"}}
    return {(d.host, d.name): dict(out.get((d.host, d.name), late)) for _hv, d in domains}


def _single(args: argparse.Namespace) -> bool:
    """One NAME, no selection options, no plan options: the plain single-domain command."""
    return not is_group(args, args.names) and not (args.dry_run or args.json)


def _group(args: argparse.Namespace, hypervisors: list[Hypervisor], action: str) -> int:
    from tui.core import groups

    need_selection(args.parser_error, args, args.names)
    found = members(args, hypervisors, args.names)
    timeout = getattr(args, "timeout", None)
    plan = groups.plan_group(resolver(hypervisors), action, found, timeout=timeout)
    return carry_out_group(args, plan)


def cmd_lifecycle(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    if not _single(args):
        return _group(args, hypervisors, args.action)
    name = args.names[0]
    hv = find_domain(hypervisors, name)
    getattr(hv, args.action)(name)
    print(f"{name}: {args.action} done")
    return 0


def cmd_shutdown(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    if args.timeout is None and not args.no_wait:
        args.timeout = args.settings.shutdown_timeout
    if args.no_wait:
        args.timeout = None
    if not _single(args):
        return _group(args, hypervisors, "shutdown")
    name = args.names[0]
    hv = find_domain(hypervisors, name)
    if args.no_wait:
        hv.shutdown(name)
        print(f"{name}: shutdown requested")
        return 0
    if hv.shutdown_and_wait(name, args.timeout):
        print(f"{name}: shut off")
        return 0
    print(
        f"virtdeck: '{name}' is still running after {args.timeout:g} s "
        f"(the guest ignored the request); force it off with 'virtdeck destroy {name}'",
        file=sys.stderr,
    )
    return 1
