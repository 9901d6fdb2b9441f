"""The `virtdeck` command: the TUI when called bare, else a scriptable CLI over tui.core.

Keeps Textual out of its import path: the TUI is imported only when it is started.
Errors are one line on stderr with exit 1; usage errors and an invalid config file exit 2.

Several hosts: every connect runs in parallel with a deadline (`--connect-timeout`, config
`timeouts.connect`, default 10 s). A host that fails or does not answer gets one line on stderr,
the command works with the others, and the exit status is 1.

libvirt's event implementation is registered before any connection is opened (`setup`): only
connections opened after it get keepalive (and events), and keepalive is what turns a call to a
host that died into an error instead of a hang. An operation cut off that way says so in one
line, then waits for the host to answer again (`--undo-wait`, config `timeouts.undo`, default
60 s) and undoes what it left (tui.cli.recover `undo_when_back`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tui import __version__
from tui.cli.output import print_json  # noqa: F401  (re-exported: every command uses it)
from tui.core import debuglog
from tui.core.cancel import Interrupted, run_cancellable
from tui.core.errors import (
    ConfigError,
    ConnectError,
    InvalidInputError,
    NotFoundError,
    UsageError,
    VirtdeckError,
)
from tui.core.fleet import connect_all, on_each
from tui.core.hypervisor import Hypervisor, default_uris, start_event_loop
from tui.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from tui.app import VirtdeckApp

START_SETTLE = 1.0  # seconds the dashboard waits for the other hosts once one answered

Handler = Callable[[argparse.Namespace, list[Hypervisor]], int]


# Every command: the module under tui.cli whose register() defines it, and its one-line help.
# argparse knows every name and help from here; only the chosen command's module is imported
# (a fast start: `virtdeck ls` does not load the snapshot, template or usage code).
# tests/test_cli_start.py checks this table against what the modules register.
COMMANDS: dict[str, tuple[str, str]] = {
    "ls": ("domains", "list domains of every connected hypervisor"),
    "start": ("domains", "start domains"),
    "destroy": ("domains", "force domains off (pull the plug)"),
    "reboot": ("domains", "reboot running domains"),
    "suspend": ("domains", "pause running domains"),
    "resume": ("domains", "resume paused domains"),
    "shutdown": ("domains", "shut domains down gracefully and wait for them"),
    "show": ("details", "a domain's addresses, consoles, graphics and disks"),
    "console": ("details", "attach to a running domain's serial console (Ctrl-] detaches)"),
    "ssh": ("details", "ssh to a running domain's first address"),
    "template": ("templates", "make and list templates"),
    "clone": ("templates", "deploy thin (default) or full clones of a template"),
    "detach": ("detach", "make a thin clone full: its disks stop building on the template's base"),
    "rm": ("templates", "remove a domain or template (refused while thin clones depend on it)"),
    "snapshot": ("snapshots", "snapshot trees: list, create, revert, delete"),
    "rollback": ("snapshots", "revert domains to their current snapshot"),
    "usage": (
        "usage",
        "disk usage: what thin clones cost against full copies, backing chains, host totals",
    ),
    "reclaim": (
        "reclaim",
        "delete overlays in virtdeck's image directories that nothing reads (plan first)",
    ),
    "migrate": (
        "migrate",
        "move domains to another hypervisor, offline or live (a thin clone stays thin)",
    ),
    "recover": (
        "recover",
        "list, and with --yes roll back, operations a crash or kill left half-done",
    ),
    "log": ("log", "the audit trail: every operation virtdeck carried out, newest last"),
}

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


#: The host options every command also takes after its name (README: "every command takes
#: -c/-H"): the flags, where they land (merged into `connect`/`host` by `setup`), the metavar.
_HOST_OPTIONS = (
    (("-c", "--connect"), "sub_connect", "URI"),
    (("-H", "--host"), "sub_host", "NAME"),
)


class _Commands(_SubParsers):
    """Subcommand parsers that also take -c/-H after the command's name (and whose own
    subcommands do too), unless the command uses one of those flags for something else."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = super().add_parser(name, **kwargs)
        p.register("action", "parsers", _Commands)  # (its own subcommands: this class too)
        return p

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        # Added when the command is chosen, after its module defined its own options.
        chosen = self._name_parser_map.get(values[0]) if values else None
        if chosen is not None and not getattr(chosen, "_host_options", False):
            chosen._host_options = True  # type: ignore[attr-defined]
            for flags, dest, metavar in _HOST_OPTIONS:
                if not any(f in chosen._option_string_actions for f in flags):
                    chosen.add_argument(
                        *flags,
                        dest=dest,
                        metavar=metavar,
                        action="append",
                        default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS,
                    )
        super().__call__(parser, namespace, values, option_string)


class LazyCommands(_Commands):
    """The subcommands: placeholders named in COMMANDS until one is chosen, then its module's
    register() replaces the placeholders of that module with the real parsers."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values and values[0] in COMMANDS:
            self.load(COMMANDS[values[0]][0])
            if self._name_parser_map.get(values[0]) is None:  # the table and module disagree
                parser.error(f"command '{values[0]}' is not available")
        super().__call__(parser, namespace, values, option_string)

    def load(self, module_name: str) -> None:
        loaded: set[str] = self.__dict__.setdefault("loaded", set())
        if module_name in loaded:
            return
        loaded.add(module_name)
        names = {n for n, (m, _) in COMMANDS.items() if m == module_name}
        for n in names:
            self._name_parser_map.pop(n, None)
        self._choices_actions[:] = [a for a in self._choices_actions if a.dest not in names]
        importlib.import_module(f"tui.cli.{module_name}").register(self)


def _columns() -> int:
    """shutil.get_terminal_size().columns without importing shutil (and bz2 with it)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter; argparse builds one for every add_argument, and its own
    looks the width up through shutil (a few ms of every start)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """Every virtdeck parser (subcommands get the class of their parent) uses _Formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        "-H",
        "--host",
        metavar="NAME",
        action="append",
        default=[],
        help="a saved host from the config file (repeatable; with -c too)",
    )
    parser.add_argument(
        "--all-hosts", action="store_true", help="every saved host of the config file"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="a host that does not answer within this is reported unreachable "
        "(default: config timeouts.connect, else 10)",
    )
    parser.add_argument(
        "--undo-wait",
        type=float,
        metavar="SECONDS",
        help="an operation cut off by a lost host waits this long for the host to answer "
        "again, then undoes what it left; 0: leave it to 'virtdeck recover' (default: config "
        "timeouts.undo, else 60)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the demo lab (real qcow2 images, libvirt's test driver): no hypervisor needed",
    )
    parser.add_argument("--reset", action="store_true", help="with --demo: rebuild the lab")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="write a debug log (each step, libvirt change, XML diff, command run; no secrets) "
        "to $XDG_STATE_HOME/virtdeck/debug.log; also VIRTDECK_DEBUG=1; 'virtdeck log --debug' "
        "shows it",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=LazyCommands)
    for name, (_module, helptext) in COMMANDS.items():
        # A placeholder (an ArgumentParser each would cost a millisecond): LazyCommands puts
        # the real parser in its place before argparse looks the name up.
        sub._name_parser_map[name] = None  # type: ignore[assignment]
        sub._choices_actions.append(sub._ChoicesPseudoAction(name, (), helptext))
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, with -c/-H given after the command's name added to those before it."""
    args = build_parser().parse_args(argv)
    args.connect = [*args.connect, *getattr(args, "sub_connect", [])]
    args.host = [*args.host, *getattr(args, "sub_host", [])]
    return args


def setup(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """What every start does first, in this order: parse the arguments, read the config file,
    register libvirt's event implementation (before any connection is opened)."""
    args = parse(argv)
    if debuglog.wanted(args.debug):
        try:
            debuglog.enable()
        except OSError as err:
            path = debuglog.log_path()
            raise InvalidInputError(f"cannot write the debug log {path}: {err}") from None
        shown = debuglog.redact_argv(sys.argv[1:] if argv is None else list(argv))
        debuglog.LOG.debug("virtdeck %s %s", __version__, " ".join(shown))
    settings = load_settings()
    if args.connect_timeout is not None:
        if not 0 < args.connect_timeout <= 3600:
            raise InvalidInputError("--connect-timeout must be between 0 and 3600 seconds")
        settings = replace(
            settings, connect_timeout=args.connect_timeout, answer_timeout=args.connect_timeout
        )
    if args.undo_wait is not None:
        if not 0 <= args.undo_wait <= 3600:
            raise InvalidInputError("--undo-wait must be between 0 and 3600 seconds")
        settings = replace(settings, undo_wait=args.undo_wait)
    if getattr(args, "backup_dir", False) is None and settings.backup_dir is not None:
        args.backup_dir = settings.backup_dir
    args.settings = settings
    args.unreachable = {}
    start_event_loop()
    return args, settings


def host_uris(args: argparse.Namespace, settings: Settings) -> list[str]:
    """-c URIs and -H / --all-hosts saved hosts, else $LIBVIRT_DEFAULT_URI, else qemu:///system."""
    uris = list(args.connect)
    uris += [settings.host(name).uri for name in args.host]
    if args.all_hosts:
        if not settings.hosts:
            raise InvalidInputError(f"--all-hosts: no [hosts] saved in {settings.source}")
        uris += [h.uri for h in settings.hosts]
    return default_uris(uris)


def connect_hosts(
    args: argparse.Namespace, settings: Settings, *, settle: float | None = None
) -> tuple[list[Hypervisor], dict[str, str]]:
    """Every host, connected in parallel within the connect deadline (with `settle`: no longer
    than that after the first host answered): one Hypervisor per URI (those that failed are
    not connected yet) and one line per host that failed."""
    if args.demo:
        from tui.core import demo

        if args.connect:
            raise InvalidInputError("--demo and -c/--connect exclude each other")
        if args.host or args.all_hosts:
            raise InvalidInputError("--demo and -H/--all-hosts exclude each other")
        return [Hypervisor.open(demo.ensure_lab(reset=args.reset), demo=True)], {}
    if args.reset:
        raise InvalidInputError("--reset only goes with --demo")
    hvs, failures = connect_all(
        host_uris(args, settings), timeout=settings.connect_timeout, settle=settle
    )
    for hv in hvs:
        hv.timeout = settings.answer_timeout
    if len(failures) == len(hvs):
        raise ConnectError(next(iter(failures.values())))
    return hvs, failures


def connect(args: argparse.Namespace) -> list[Hypervisor]:
    """The hosts that answered; a line on stderr for each one that did not."""
    settings: Settings = args.settings
    hvs, failures = connect_hosts(args, settings)
    report_unreachable(args, failures)
    return [hv for hv in hvs if hv.uri not in failures]


def report_unreachable(args: argparse.Namespace, failures: dict[str, str]) -> None:
    for uri, why in failures.items():
        if uri not in args.unreachable:
            args.unreachable[uri] = why
            print(f"virtdeck: {why}", file=sys.stderr, flush=True)


def find_domain(hypervisors: list[Hypervisor], name: str) -> Hypervisor:
    """The one hypervisor that has domain `name` (asked in parallel; a host that does not
    answer in time is left out and named in the error when the domain is not found)."""
    timeout = max((hv.timeout for hv in hypervisors), default=10.0)
    result = on_each(hypervisors, lambda hv: hv.exists(name), timeout=timeout)
    found = [hv for hv in hypervisors if result.answers.get(hv.uri)]
    if not found:
        where = ", ".join(hv.uri for hv in hypervisors if hv.uri in result.answers)
        silent = "".join(f"; {hv} did not answer" for hv in result.failures)
        raise NotFoundError(
            f"no domain named '{name}' on {where or 'any host'}{silent} ('virtdeck ls' lists them)"
        )
    if len(found) > 1:
        where = " and ".join(hv.uri for hv in found)
        raise InvalidInputError(f"'{name}' exists on {where}: pick one with -c URI")
    return found[0]


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


def positive_int(text: str) -> int:
    """An argparse type: a whole number, 1 or more (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value}: give a positive number")
    return value


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """--dry-run and --json, which every command that changes something takes."""
    p.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    p.add_argument("--json", action="store_true", help="the plan and the result as JSON")


def carry_out(
    args: argparse.Namespace,
    plan: Any,
    execute: Callable[[], Any],
    describe: Callable[[Any], list[str]],
    *,
    result_key: str = "result",
    dry_result: Any = None,
) -> int:
    """The one way a command shows its plan and carries it out: the plan's lines on stderr
    (`virtdeck: plan: ...`); with --dry-run nothing more (exit 0); with --json the plan and
    the result as one JSON object on stdout, else the result's lines."""
    for line in plan.summary():
        print(f"virtdeck: plan: {line}", file=sys.stderr)
    as_json = bool(getattr(args, "json", False))
    if getattr(args, "dry_run", False):
        if as_json:
            from tui.core import ops

            print_json({"plan": ops.plan_json(plan), "dry_run": True, result_key: dry_result})
        return 0
    result = execute()
    if as_json:
        from tui.core import ops

        print_json({"plan": ops.plan_json(plan), "dry_run": False, result_key: result})
    else:
        for line in describe(result):
            print(line)
    return 0


def stderr_progress(message: str, fraction: float | None) -> None:
    """Progress lines on stderr (a percentage when the step has a size)."""
    if fraction is None:
        print(f"virtdeck: {message}", file=sys.stderr, flush=True)
    else:
        print(f"virtdeck: {message} {fraction * 100:5.1f}%", file=sys.stderr, flush=True)


def build_app(args: argparse.Namespace, settings: Settings) -> VirtdeckApp:
    """The dashboard as `virtdeck` starts it (after setup()): hosts connected in parallel; one
    that did not answer starts as unreachable and reconnects by itself."""
    from tui.app import VirtdeckApp  # Textual only for the dashboard
    from tui.screens.main import binding_ids

    settings.check_binding_ids(binding_ids())
    # The dashboard does not wait the whole deadline for a silent host: it starts a second
    # after the first host answered and the others keep connecting in their own workers.
    hvs, failures = connect_hosts(args, settings, settle=START_SETTLE)
    return VirtdeckApp(hvs, settings=settings, unreachable=failures)


def run_tui(args: argparse.Namespace, settings: Settings) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInputError(
            "the dashboard needs a terminal; from a script use a command ('virtdeck --help')"
        )
    hosts = len(args.connect) + len(args.host) + len(settings.hosts) * args.all_hosts
    if hosts > 1:  # the connects take up to the deadline: say what the terminal waits for
        print(f"virtdeck: connecting to {hosts} hosts…", file=sys.stderr, flush=True)
    app = build_app(args, settings)
    app.run()
    return app.return_code or 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, settings = setup(argv)
    except (ConfigError, UsageError) as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return 2
    except VirtdeckError as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return 1
    try:
        if args.command is None:
            return run_tui(args, settings)
        needs_hosts = getattr(args, "needs_hosts", True)
        if callable(needs_hosts):
            needs_hosts = needs_hosts(args)
        if not needs_hosts:  # `virtdeck log` reads a file, no host
            return int(args.handler(args, []))
        hypervisors = connect(args)
        from tui.core.bases import ask_too

        ask_too(hypervisors)  # asked before a base is deleted or made read-only (issue 17)
        try:
            handler: Handler = args.handler
            # SIGINT, SIGTERM and SIGHUP (a dropped SSH session) stop a running operation
            # cleanly: it unwinds what it did and says so (tui.core.ops).
            status = int(run_cancellable(lambda: handler(args, hypervisors)))
        finally:
            for hv in hypervisors:
                hv.close()
        return 1 if args.unreachable and status == 0 else status
    except (ConfigError, UsageError) as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return 2
    except VirtdeckError as err:
        print(f"virtdeck: {err}", file=sys.stderr, flush=True)
        from tui.core import ops

        if ops.kept_for_lost_hosts():  # a host stopped answering mid-operation
            from tui.cli.recover import undo_when_back

            return undo_when_back(settings.undo_wait) or 1
        return 1
    except Interrupted as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("virtdeck: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `virtdeck ls --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
