"""The `virtdeck` command: the TUI when called bare, else a scriptable CLI over tui.core.

Keeps Textual out of its import path: the TUI is imported only when it is started.
Errors are one line on stderr with exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

from tui import __version__
from tui.core.errors import InvalidInputError, NotFoundError, VirtdeckError
from tui.core.hypervisor import Hypervisor, default_uris, open_all

Handler = Callable[[argparse.Namespace, list[Hypervisor]], int]


def build_parser() -> argparse.ArgumentParser:
    from tui.cli import details, domains, snapshots, templates, usage

    parser = argparse.ArgumentParser(
        prog="virtdeck",
        description="Keyboard-driven dashboard and CLI for KVM/libvirt: templates, thin and "
        "full clones, snapshot trees. Without a command it starts the dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"virtdeck {__version__}")
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        action="append",
        default=[],
        help="libvirt URI (repeat for several hypervisors); "
        "default: $LIBVIRT_DEFAULT_URI, else qemu:///system",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the demo lab (real qcow2 images, libvirt's test driver): no hypervisor needed",
    )
    parser.add_argument("--reset", action="store_true", help="with --demo: rebuild the lab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (domains, details, templates, snapshots, usage):
        module.register(sub)
    return parser


def connect(args: argparse.Namespace) -> list[Hypervisor]:
    if args.demo:
        from tui.core import demo

        if args.connect:
            raise InvalidInputError("--demo and -c/--connect exclude each other")
        return [Hypervisor.open(demo.ensure_lab(reset=args.reset), demo=True)]
    if args.reset:
        raise InvalidInputError("--reset only goes with --demo")
    return open_all(default_uris(args.connect))


def find_domain(hypervisors: list[Hypervisor], name: str) -> Hypervisor:
    """The one hypervisor that has domain `name`."""
    found = [hv for hv in hypervisors if hv.exists(name)]
    if not found:
        where = ", ".join(hv.uri for hv in hypervisors)
        raise NotFoundError(f"no domain named '{name}' on {where} ('virtdeck ls' lists them)")
    if len(found) > 1:
        where = " and ".join(hv.uri for hv in found)
        raise InvalidInputError(f"'{name}' exists on {where}: pick one with -c URI")
    return found[0]


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def format_table(
    rows: list[list[str]], *, right: Collection[int] = (), indent: str = ""
) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; columns in `right` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def stderr_progress(message: str, fraction: float | None) -> None:
    """Progress lines on stderr (a percentage when the step has a size)."""
    if fraction is None:
        print(f"virtdeck: {message}", file=sys.stderr, flush=True)
    else:
        print(f"virtdeck: {message} {fraction * 100:5.1f}%", file=sys.stderr, flush=True)


def run_tui(args: argparse.Namespace) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInputError(
            "the dashboard needs a terminal; from a script use a command ('virtdeck --help')"
        )
    hypervisors = connect(args)
    from tui.app import VirtdeckApp  # Textual only for the dashboard

    VirtdeckApp(hypervisors).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            return run_tui(args)
        hypervisors = connect(args)
        try:
            handler: Handler = args.handler
            return handler(args, hypervisors)
        finally:
            for hv in hypervisors:
                hv.close()
    except VirtdeckError as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("virtdeck: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `virtdeck ls --json | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
