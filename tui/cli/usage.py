"""`virtdeck usage`: what templates, thin and full clones use on disk (shared bases once)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tui.cli import format_table, print_json
from tui.core.bases import shared_storage
from tui.core.hypervisor import Hypervisor
from tui.core.units import size, total
from tui.core.usage import TemplateUsage, UsageCollector, UsageReport


def register(sub: Any) -> None:
    p = sub.add_parser(
        "usage",
        help="disk usage: what thin clones cost against full copies, backing chains, host totals",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (sizes in bytes)")
    p.set_defaults(handler=cmd_usage)


def usage_json(reports: list[UsageReport]) -> dict[str, Any]:
    """One object for all hypervisors; each image and template names its host."""
    images = [{**i.to_json(), "host": r.host} for r in reports for i in r.images]
    templates = [{**t.to_json(), "host": r.host} for r in reports for t in r.templates]
    return {
        "images": images,
        "templates": templates,
        "domains": [{**d.to_json(), "host": r.host} for r in reports for d in r.domains],
        "total_actual_bytes": total(r.total_actual_bytes for r in reports),
        "hosts": [
            {
                "host": r.host,
                "total_actual_bytes": r.total_actual_bytes,
                "problems": list(r.problems),
            }
            for r in reports
        ],
    }


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    return format_table(rows, right=(3,), indent=indent)


def template_lines(t: TemplateUsage) -> list[str]:
    state = "" if t.defined else " (undefined; known from its clones)"
    lines = [f"template {t.name}{state}: base {t.base or '?'} ({size(t.base_bytes)}, shared)"]
    rows = [["KIND", "DOMAIN", "IMAGE", "ACTUAL"]]
    rows += [["thin", c.domain, c.path, size(c.actual_bytes)] for c in t.thin]
    rows += [["full", c.domain, c.path, size(c.actual_bytes)] for c in t.full]
    if len(rows) > 1:
        lines += _table(rows)
    pct = (
        f" ({t.saved_bytes / t.full_equivalent_bytes:.0%})"
        if t.full_equivalent_bytes and t.saved_bytes is not None
        else ""
    )
    lines += [
        f"  thin clones: {len(t.thin_domains)} using {size(t.thin_bytes)}; as full copies "
        f"{size(t.full_equivalent_bytes)}; saved {size(t.saved_bytes)}{pct}",
        f"  full clones: {len(t.full_domains)} using {size(t.full_bytes)}",
    ]
    return lines


def cmd_usage(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    reports = [UsageCollector(hv).report() for hv in hypervisors]
    shared = shared_storage(hypervisors, {r.host: [i.path for i in r.images] for r in reports})
    if args.json:
        data = usage_json(reports)
        for image in data["images"]:
            image["shared_storage"] = list(shared.get(image["host"], {}).get(image["path"], ()))
        data["reclaimable"] = [i.to_json() | {"host": uri} for uri, i in _plans(hypervisors)]
        print_json(data)
    else:
        for r in reports:
            for t in r.templates:
                print("\n".join(template_lines(t)))
                print()
            print(
                f"host {r.host}: {len(r.images)} images, {size(r.total_actual_bytes)} on disk "
                "(shared bases counted once)"
            )
            for path, why in shared.get(r.host, {}).items():
                print(f"  shared storage: {path} ({'; '.join(why)})")
        _reclaimable(hypervisors)
    for r in reports:
        for problem in r.problems:
            print(f"virtdeck: warning: {problem}", file=sys.stderr)
    return 0


def _plans(hypervisors: list[Hypervisor]) -> list[tuple[str, Any]]:
    """(host, item) of what `virtdeck reclaim` would free (tui.core.reclaim); a host whose
    files cannot all be told apart is warned about (unknown is not zero)."""
    from tui.core import reclaim
    from tui.core.errors import VirtdeckError

    out: list[tuple[str, Any]] = []
    for hv in hypervisors:
        try:
            plan = reclaim.plan_reclaim(hv, others=hypervisors)
        except VirtdeckError as err:
            print(f"virtdeck: warning: reclaimable space unknown: {err}", file=sys.stderr)
            continue
        out += [(hv.uri, item) for item in plan.items]
    return out


def _reclaimable(hypervisors: list[Hypervisor]) -> None:
    """What `virtdeck reclaim` would free, one line each, and the total per host."""
    found = _plans(hypervisors)
    for _, item in found:
        print(f"  reclaimable: {item.path} ({size(item.bytes)}): {item.why}")
    if found:
        print(f"  'virtdeck reclaim' frees {size(total(i.bytes for _, i in found))}")
