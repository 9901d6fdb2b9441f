"""`virtdeck template update|seal|rm|prune` (see tui.core.versions): each plans first, prints
the plan on stderr, then executes it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tui.cli import add_plan_options, carry_out, find_domain, stderr_progress
from tui.core import clones, templates, versions
from tui.core.errors import NotFoundError
from tui.core.hypervisor import Hypervisor


def register(tsub: Any) -> None:
    """Add the version subcommands to `virtdeck template`."""
    u = tsub.add_parser(
        "update",
        help="make an editable VM (TEMPLATE-vN-edit) on a thin overlay of the template's newest "
        "version; seal it into the next version with 'template seal' or --commit",
    )
    u.add_argument("template", metavar="TEMPLATE")
    u.add_argument(
        "--name", help="the edit VM's name (default: TEMPLATE-vN-edit, N the next version)"
    )
    u.add_argument("--dir", metavar="DIR", help="where its overlay goes (default: the base's)")
    u.add_argument(
        "--commit",
        action="store_true",
        help="seal the edit VM (TEMPLATE-vN-edit, or --name) into the next version",
    )
    _seal_options(u)
    u.set_defaults(handler=cmd_update)

    s = tsub.add_parser(
        "seal", help="seal an edit VM made by 'template update' into the template's next version"
    )
    s.add_argument("vm", metavar="VM")
    _seal_options(s)
    s.set_defaults(handler=cmd_seal)

    r = tsub.add_parser(
        "rm",
        help="remove one version of a template with its own files (refused while clones or "
        "later versions build on it)",
    )
    r.add_argument("template", metavar="TEMPLATE")
    r.add_argument("--version", type=int, required=True, metavar="N")
    r.add_argument(
        "--force",
        action="store_true",
        help="delete even when a host that may share the storage cannot be asked",
    )
    r.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(r)
    r.set_defaults(handler=cmd_rm_version)

    p = tsub.add_parser("prune", help="remove every version of a template that nothing uses")
    p.add_argument("template", metavar="TEMPLATE")
    p.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(p)
    p.set_defaults(handler=cmd_prune)


def _seal_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--flatten",
        action="store_true",
        help="make the new version a standalone image (its chain converted into one file) "
        "instead of a thin layer on the previous version: bigger, but the older versions "
        "can then be pruned once no clone uses them",
    )
    p.add_argument("--no-seal", action="store_true", help="do not run virt-sysprep")
    p.add_argument(
        "--operations", metavar="OPS", help="comma-separated virt-sysprep operations (as create)"
    )
    p.add_argument("--force", action="store_true", help="force the VM off if it ignores shutdown")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(p)


def find_template(hypervisors: list[Hypervisor], name: str, backup_dir: Path | None) -> Hypervisor:
    """The hypervisor holding template `name`; an undefined one (an XML backup) goes with the
    first hypervisor, which is where virtdeck lists it."""
    for hv in hypervisors:
        if hv.exists(name):
            return hv
    for hv in hypervisors:
        if any(b.name == name for b in templates.backup_templates(backup_dir, hv)):
            return hv
    where = ", ".join(hv.uri for hv in hypervisors)
    raise NotFoundError(f"no template named '{name}' on {where} ('virtdeck template ls')")


def _template_host(hypervisors: list[Hypervisor], name: str, backup_dir: Path | None) -> Hypervisor:
    return find_template(hypervisors, name, backup_dir)


def cmd_update(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    if args.commit:
        hv = _template_host(hypervisors, args.template, args.backup_dir)
        family = versions._family_named(hv, args.template, args.backup_dir)
        args.vm = args.name or (versions.edit_name(family) if family else args.template)
        return cmd_seal(args, hypervisors)
    hv = _template_host(hypervisors, args.template, args.backup_dir)
    plan = versions.plan_update(
        hv, args.template, name=args.name, directory=args.dir, backup_dir=args.backup_dir
    )
    return carry_out(
        args,
        plan,
        lambda: clones.execute_clone(hv, plan, stderr_progress),
        lambda names: [
            f"{n}: edit VM on {plan.template} (start it, change it, shut it down, then "
            f"'virtdeck template seal {n}')"
            for n in names
        ],
        result_key="clones",
        dry_result=[],
    )


def cmd_seal(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.vm)
    ops = args.operations.split(",") if args.operations is not None else None
    sysprep = templates.sysprep_for(hv) if not args.no_seal else templates.Sysprep()
    plan = versions.plan_seal(
        hv,
        args.vm,
        seal=not args.no_seal,
        operations=ops,
        backup_dir=args.backup_dir,
        force=args.force,
        shutdown_timeout=args.timeout,
        sysprep=sysprep,
    )
    if not args.flatten:
        return carry_out(
            args,
            plan,
            lambda: templates.execute_template(
                hv, plan, stderr_progress, sysprep=sysprep
            ).to_json(),
            lambda t: [f"{t['name']}: version {plan.version} of {plan.family}"],
            result_key="template",
        )
    assert plan.family is not None and plan.version is not None
    steps = versions.plan_flatten(hv, args.vm, plan.family, plan.version)
    for step in steps:
        print(f"virtdeck: plan: {step.line()}", file=sys.stderr)

    def execute() -> dict[str, Any]:
        versions.execute_flatten(hv, args.vm, steps, stderr_progress)
        again = versions.plan_seal(  # its disks are the flattened files now
            hv,
            args.vm,
            seal=not args.no_seal,
            operations=ops,
            backup_dir=args.backup_dir,
            force=args.force,
            shutdown_timeout=args.timeout,
            sysprep=sysprep,
        )
        return templates.execute_template(hv, again, stderr_progress, sysprep=sysprep).to_json()

    return carry_out(
        args,
        plan,
        execute,
        lambda t: [f"{t['name']}: version {plan.version} of {plan.family} (flattened)"],
        result_key="template",
    )


def cmd_rm_version(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = _template_host(hypervisors, args.template, args.backup_dir)
    name = versions.version_name(hv, args.template, args.version, args.backup_dir)
    plan = clones.plan_remove(
        hv, name, storage=True, backup_dir=args.backup_dir, others=hypervisors, force=args.force
    )
    return carry_out(
        args,
        plan,
        lambda: clones.execute_remove(
            hv, plan, stderr_progress, backup_dir=args.backup_dir, others=hypervisors
        ),
        lambda done: [f"{name}: version {args.version} of {args.template} removed"],
        result_key="deleted",
        dry_result=[],
    )


def cmd_prune(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = _template_host(hypervisors, args.template, args.backup_dir)
    plan = versions.plan_prune(hv, args.template, args.backup_dir)
    return carry_out(
        args,
        plan,
        lambda: versions.execute_prune(
            hv, plan, stderr_progress, backup_dir=args.backup_dir, others=hypervisors
        ),
        lambda done: [f"{n}: removed" for n in done] or ["nothing pruned"],
        result_key="removed",
        dry_result=[],
    )
