"""`virtdeck log [DOMAIN]`: the audit trail (tui.core.audit), newest last; no host is asked."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from tui.core.errors import InvalidInputError


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {n}")
    return n


def register(sub: Any) -> None:
    p = sub.add_parser(
        "log", help="the audit trail: every operation virtdeck carried out, newest last"
    )
    p.add_argument("domain", nargs="?", metavar="DOMAIN", help="only operations on this domain")
    p.add_argument("--json", action="store_true", help="an array of records")
    p.add_argument("--limit", type=_positive, metavar="N", help="only the last N records")
    p.add_argument(
        "--host",
        dest="log_host",
        metavar="HOST",
        help="only operations on this host: its URI, a saved host name (config.toml) or its "
        "host name",
    )
    p.add_argument(
        "--debug",
        dest="debug_tail",
        action="store_true",
        help="the tail of the debug log instead (see 'virtdeck --debug'); --limit N lines",
    )
    p.set_defaults(handler=cmd_log, needs_hosts=False)


def cmd_log(args: argparse.Namespace, hypervisors: list[Any]) -> int:
    from tui.core import audit

    if args.debug_tail:
        return debug_tail(args.limit or 200)

    try:
        records, bad = audit.read()
    except OSError as err:
        raise InvalidInputError(f"cannot read the audit log {audit.log_path()}: {err}") from None
    if bad:
        print(
            f"virtdeck: skipped {bad} line(s) of {audit.log_path()} that are not audit records",
            file=sys.stderr,
        )
    saved: dict[str, str] = {}
    if args.log_host:
        from tui.core.errors import ConfigError
        from tui.core.settings import load_settings

        with contextlib.suppress(ConfigError):  # (a broken config names no host; log goes on)
            saved = {h.name: h.uri for h in load_settings().hosts}
    shown = audit.select(
        records, domain=args.domain, host=args.log_host, limit=args.limit, saved=saved
    )
    if args.json:
        from tui.cli import print_json

        print_json([r.to_json() for r in shown])
        return 0
    if shown:
        print("\n".join(table(shown)))
    elif args.domain or args.log_host:  # a filter that matched nothing is said, not silent
        which = [f"domain '{args.domain}'"] if args.domain else []
        which += [f"host '{args.log_host}'"] if args.log_host else []
        print(f"virtdeck: no operation on {' and '.join(which)} in {audit.log_path()}",
              file=sys.stderr)  # fmt: skip
    return 0


def table(records: list[Any]) -> list[str]:
    """TIME, USER, HOST, OPERATION, DOMAINS, RESULT, DURATION; a failure's error line below."""
    from tui.cli import format_table

    rows = [["TIME", "USER", "HOST", "OPERATION", "DOMAINS", "RESULT", "DURATION"]]
    errors: dict[int, str] = {}
    for r in records:
        user = r.user + (f"@{r.client}" if r.client else "")
        when = r.time.replace("T", " ")[:19]
        rows.append(
            [when, user, r.host, r.operation, ",".join(r.domains), r.result, f"{r.duration:.1f}s"]
        )
        if r.error:
            errors[len(rows) - 1] = r.error
    out = []
    for i, line in enumerate(format_table(rows, right={6})):
        out.append(line)
        if i in errors:
            out.append(f"    {errors[i]}")
    return out


def debug_tail(lines: int) -> int:
    """The last `lines` lines of the debug log (its last 8 MiB read at most)."""
    from tui.core import debuglog

    path = debuglog.log_path()
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - (8 << 20)))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        print(
            f"virtdeck: no debug log at {path} yet (run 'virtdeck --debug …' "
            "or set VIRTDECK_DEBUG=1)",
            file=sys.stderr,
        )
        return 1
    except OSError as err:
        raise InvalidInputError(f"cannot read the debug log {path}: {err}") from None
    tail = text.splitlines()[-lines:]
    if tail:
        print("\n".join(tail))
    return 0
