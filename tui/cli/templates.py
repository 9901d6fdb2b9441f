"""`virtdeck template create|ls`, `virtdeck clone` and `virtdeck rm` (see tui.core.templates
and tui.core.clones): each plans first, prints the plan on stderr, then executes it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tui.cli import (
    add_plan_options,
    carry_out,
    find_domain,
    format_table,
    print_json,
    stderr_progress,
)
from tui.cli.groups import add_group_options, cmd_rm_group, is_group
from tui.cli.identity_args import identity_from_args
from tui.core import clones, templates
from tui.core.errors import NotFoundError
from tui.core.hypervisor import Hypervisor
from tui.core.identity import METHODS, IdentityError
from tui.core.paths import template_backup_dir
from tui.core.units import size


def register(sub: Any) -> None:
    """Add this module's subcommands to the parser."""
    p = sub.add_parser("template", help="make and list templates")
    tsub = p.add_subparsers(dest="template_command", metavar="SUBCOMMAND", required=True)
    _register_create(tsub)
    _register_copy(tsub)
    _register_import(tsub)
    ls = tsub.add_parser("ls", help="list templates, their base images and clones")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    ls.set_defaults(handler=cmd_ls)

    from tui.cli import versions

    versions.register(tsub)
    _register_clone(sub)
    _register_rm(sub)


def _register_create(tsub: Any) -> None:
    c = tsub.add_parser(
        "create",
        help="seal a VM into a template (shut down, virt-sysprep, rename, back up, read-only)",
    )
    c.add_argument("vm", metavar="VM")
    c.add_argument("--name", help="template name (default: template-VM)")
    c.add_argument("--no-seal", action="store_true", help="do not run virt-sysprep")
    c.add_argument(
        "--operations",
        metavar="OPS",
        help="comma-separated virt-sysprep operations (default: virt-sysprep's defaults), "
        "e.g. ssh-hostkeys,udev-persistent-net,net-hwaddr,machine-id,user-account; with "
        "machine-id the base keeps an empty /etc/machine-id and no random seed, with "
        "ssh-hostkeys a unit makes each clone's host keys at first boot (the plan says so)",
    )
    c.add_argument(
        "--backup-dir",
        metavar="DIR",
        type=Path,
        help=f"where the XML backup goes (default: {template_backup_dir()})",
    )
    c.add_argument(
        "--undefine",
        action="store_true",
        help="undefine it afterwards (the XML backup and the disks stay; still deployable)",
    )
    c.add_argument(
        "--force", action="store_true", help="force the VM off if it ignores the shutdown"
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for a graceful shutdown (default 120)",
    )
    c.add_argument(
        "--identity",
        choices=METHODS,
        default=None,
        help="how its clones get their identity by default, recorded in the template: "
        "cloud-init (a seed each, when the guest runs cloud-init) or virt-customize (the "
        "default)",
    )
    add_plan_options(c)
    c.set_defaults(handler=cmd_create)


def _register_copy(tsub: Any) -> None:
    cp = tsub.add_parser(
        "copy",
        help="copy a template (base images and definition) to another hypervisor",
    )
    cp.add_argument("template", metavar="TEMPLATE")
    cp.add_argument("--to", required=True, metavar="URI", help="the target hypervisor's URI")
    cp.add_argument(
        "--dir",
        metavar="DIR",
        help="directory on the target (default: its pool 'default', else its first dir pool)",
    )
    cp.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(cp)
    cp.set_defaults(handler=cmd_copy)


def _register_import(tsub: Any) -> None:
    im = tsub.add_parser(
        "import",
        help="make a template from a cloud image (a file or an http(s) URL), checksum checked",
    )
    im.add_argument("source", metavar="FILE|URL", help="a qcow2 or raw cloud image")
    im.add_argument("--name", required=True, help="the template's name")
    im.add_argument("--dir", metavar="DIR", help="where the image goes (default: the pool's)")
    im.add_argument(
        "--checksum", metavar="sha256:HEX", help="refuse the image unless its sha256 is this"
    )
    im.add_argument("--memory", type=int, default=1024, metavar="MIB", help="memory (1024)")
    im.add_argument("--vcpus", type=int, default=1, metavar="N", help="vCPUs (1)")
    im.add_argument(
        "--network", metavar="NAME", help="a libvirt network (default: user-mode networking)"
    )
    im.add_argument(
        "--virt-type",
        choices=("kvm", "qemu"),
        help="kvm or qemu (TCG); default: kvm when the host can accelerate guests",
    )
    im.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(im)
    im.set_defaults(handler=cmd_import)


def _register_clone(sub: Any) -> None:
    p = sub.add_parser(
        "clone",
        help="deploy thin (default) or full clones of a template",
        usage="%(prog)s [options] TEMPLATE NAME | --from-snapshot VM SNAP NAME [options]",
    )
    p.add_argument("template", metavar="TEMPLATE")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument(
        "--from-snapshot",
        nargs=2,
        metavar=("VM", "SNAP"),
        help="clones of VM's disks as they were at its snapshot SNAP (then NAME is the only "
        "positional): no template is made, VM and its snapshots stay as they are",
    )
    p.add_argument("--full", action="store_true", help="independent full copy (qemu-img convert)")
    p.add_argument(
        "--count",
        type=_count,
        default=1,
        metavar="N",
        help=f"make NAME-1 ... NAME-N (N from 1 to {clones.MAX_COUNT})",
    )
    p.add_argument("--start", action="store_true", help="start the clones afterwards")
    p.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="clone version N of the template (default: its newest; 'template ls')",
    )
    p.add_argument("--dir", metavar="DIR", help="where the disk files go (default: the base's)")
    p.add_argument(
        "--allow-unsealed", action="store_true", help="clone a template that was not sealed"
    )
    p.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    _identity_options(p)
    add_plan_options(p)
    p.set_defaults(handler=cmd_clone, parser_error=p.error)


def _identity_options(p: Any) -> None:
    who = p.add_argument_group(
        "identity",
        "written into each clone's own disk with virt-customize (this machine, image files; "
        "about 40 s per clone under TCG, several at once up to the number of cores), or "
        "given as a cloud-init seed per clone (--identity cloud-init: milliseconds, any host; "
        "the template's OS must run cloud-init). By default the hostname becomes the clone's "
        "name when the template is sealed and its disk has an OS; keys and first-boot "
        "commands only when asked for.",
    )
    who.add_argument(
        "--identity",
        choices=METHODS,
        default=None,
        help="how each clone gets its identity (default: cloud-init for a template imported "
        "from a cloud image, else virt-customize)",
    )
    who.add_argument(
        "--hostname-template",
        metavar="TPL",
        help="each clone's hostname: {name} is its domain name, {n} its number "
        "(e.g. '{name}.lab'); sets it even when the default would not",
    )
    who.add_argument(
        "--keep-hostname", action="store_true", help="leave the template's hostname alone"
    )
    who.add_argument(
        "--ssh-key",
        metavar="FILE",
        action="append",
        default=[],
        help="add the public key(s) in FILE to the user's authorized_keys (repeatable)",
    )
    who.add_argument(
        "--ssh-user", metavar="USER", default="root", help="whose keys --ssh-key adds (root)"
    )
    who.add_argument(
        "--first-boot",
        metavar="CMD",
        action="append",
        default=[],
        help="a shell command each clone runs once at its first boot (repeatable, in order)",
    )
    who.add_argument(
        "--ip",
        metavar="ADDR/PREFIX[+]",
        help="cloud-init: a static address for the first NIC; '+' gives --count clones "
        "consecutive ones (10.0.0.10/24+)",
    )
    who.add_argument("--gateway", metavar="ADDR", help="cloud-init: the default route (with --ip)")
    who.add_argument(
        "--dns", metavar="ADDR", action="append", default=[], help="cloud-init: a name server"
    )
    who.add_argument(
        "--user-data",
        metavar="FILE",
        help="cloud-init: your own #cloud-config or script, added to virtdeck's",
    )


def _register_rm(sub: Any) -> None:
    p = sub.add_parser(
        "rm", help="remove a domain or template (refused while thin clones depend on it)"
    )
    p.add_argument("names", metavar="NAME", nargs="*", help="one or more domains or templates")
    add_group_options(p, plan_options=False)
    p.add_argument(
        "--storage",
        action="store_true",
        help="also delete its own disk images (never a shared base)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --storage: delete even when a host that may share the storage cannot be "
        "asked whether a domain there reads the files (the plan and the audit log say so)",
    )
    p.add_argument("--backup-dir", metavar="DIR", type=Path, help="XML backup directory")
    add_plan_options(p)
    p.set_defaults(handler=cmd_rm, parser_error=p.error)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= clones.MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {clones.MAX_COUNT} (got {n})")
    return n


def cmd_create(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    hv = find_domain(hypervisors, args.vm)
    ops = None
    if args.operations is not None:
        ops = [o for o in args.operations.split(",")]
    sysprep = templates.sysprep_for(hv) if not args.no_seal else templates.Sysprep()
    plan = templates.plan_template(
        hv,
        args.vm,
        name=args.name,
        seal=not args.no_seal,
        operations=ops,
        backup_dir=args.backup_dir,
        undefine=args.undefine,
        force=args.force,
        shutdown_timeout=args.timeout,
        sysprep=sysprep,
        identity=args.identity,
    )

    def describe(t: dict[str, Any]) -> list[str]:
        state = "defined" if t["defined"] else "undefined, XML in " + (t["xml_backup"] or "?")
        return [f"{t['name']}: template made from {plan.vm} ({state})"]

    return carry_out(
        args,
        plan,
        lambda: templates.execute_template(hv, plan, stderr_progress, sysprep=sysprep).to_json(),
        describe,
    )


def _find_template(hypervisors: list[Hypervisor], name: str, backup_dir: Path | None) -> Hypervisor:
    from tui.cli.versions import find_template

    return find_template(hypervisors, name, backup_dir)


def _find_versioned(
    hypervisors: list[Hypervisor], name: str, backup_dir: Path | None
) -> Hypervisor:
    """As _find_template; a family whose first version was removed goes by its name too."""
    from tui.core import versions

    try:
        return _find_template(hypervisors, name, backup_dir)
    except NotFoundError:
        for hv in hypervisors:
            if versions.members(hv, name, backup_dir):
                return hv
        raise


def cmd_copy(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    from tui.core import transfer

    source = _find_template(hypervisors, args.template, args.backup_dir)
    target = next((hv for hv in hypervisors if hv.uri == args.to), None)
    opened = target is None
    if target is None:
        target = Hypervisor.open(args.to)
    try:
        plan = transfer.plan_template_copy(
            source, target, args.template, directory=args.dir, backup_dir=args.backup_dir
        )
        return carry_out(
            args,
            plan,
            lambda: transfer.execute_template_copy(source, target, plan, stderr_progress),
            lambda name: [f"{name}: copied to {plan.target_host} ({plan.directory})"],
            result_key="template",
        )
    finally:
        if opened:
            target.close()


def cmd_import(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    from tui.core import cloudimage
    from tui.core.errors import UsageError

    if len(hypervisors) != 1:
        raise UsageError("template import makes the template on one host: give one -c URI")
    hv = hypervisors[0]
    plan = cloudimage.plan_import(
        hv,
        args.source,
        args.name,
        directory=args.dir,
        checksum=args.checksum,
        memory_mib=args.memory,
        vcpus=args.vcpus,
        network=args.network,
        virt_type=args.virt_type,
        backup_dir=args.backup_dir,
    )
    return carry_out(
        args,
        plan,
        lambda: cloudimage.execute_import(hv, plan, stderr_progress),
        lambda digest: [f"{plan.name}: template imported from {plan.source} ({digest})"],
        result_key="sha256",
    )


def cmd_ls(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    found = [t for hv in hypervisors for t in templates.list_templates(hv, args.backup_dir)]
    if args.json:
        print_json([t.to_json() for t in found])
        return 0
    show_host = len(hypervisors) + len(getattr(args, "unreachable", {})) > 1  # same tpl, 2 hosts
    header = ["NAME", "VERSION", "DEFINED", "VIRTUAL", "REAL", "SEALED", "FIRST BOOT", "THIN",
              "FULL", "BASE IMAGES"]  # fmt: skip
    rows = [(["HOST"] if show_host else []) + header]
    for t in found:
        sealed = (t.created or "?")[:16] if t.sealed else "no"
        rows.append(
            ([t.host] if show_host else [])
            + [
                t.name,
                f"{t.family or t.name} v{t.version}",
                "yes" if t.defined else "no",
                size(t.virtual_bytes),
                size(t.actual_bytes),
                sealed,
                "cloud-init seed"
                if t.identity == "cloud-init"
                else ",".join(t.first_boot.regenerates) or "-",
                str(len(t.thin_clones)),
                str(len(t.full_clones)),
                " ".join(b.path for b in t.base_images),
            ]
        )
    print("\n".join(format_table(rows)))
    for t in found:  # where an imported cloud image came from, and the sha256 it had
        if t.imported:
            print(f"{t.name}: imported from {t.source or '?'} ({t.imported})")
    for t in found:
        for problem in t.problems:
            print(f"virtdeck: warning: template {t.name}: {problem}", file=sys.stderr)
        for shared in t.shares:
            print(f"virtdeck: warning: template {t.name}: its clones share {shared}",
                  file=sys.stderr)  # fmt: skip
    return 0


def cmd_clone(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    if args.from_snapshot or args.name is None:  # tui.cli.snapclone
        from tui.cli.snapclone import cmd_clone_snapshot

        return cmd_clone_snapshot(args, hypervisors)
    try:  # a bad key file or a contradiction is a usage error (exit 2), before any lookup
        who = identity_from_args(args)
        from tui.core import versions

        hv = _find_versioned(hypervisors, args.template, args.backup_dir)
        args.template = versions.resolve(hv, args.template, args.version, args.backup_dir)
        plan = clones.plan_clone(
            hv,
            args.template,
            args.name,
            full=args.full,
            count=args.count,
            start=args.start,
            directory=args.dir,
            allow_unsealed=args.allow_unsealed,
            backup_dir=args.backup_dir,
            identity=who,
        )
    except IdentityError as err:
        print(f"virtdeck: {err}", file=sys.stderr)
        return 2
    return carry_out(
        args,
        plan,
        lambda: clones.execute_clone(hv, plan, stderr_progress),
        lambda names: [
            f"{name}: {plan.mode} clone of {plan.template}" + (" (started)" * plan.start)
            for name in names
        ],
        result_key="clones",
        dry_result=[],
    )


def cmd_rm(args: argparse.Namespace, hypervisors: list[Hypervisor]) -> int:
    if args.force and not args.storage:
        args.parser_error("--force only makes sense with --storage (nothing is deleted without it)")
    if is_group(args, args.names):  # several: one group plan (tui.cli.groups)
        return cmd_rm_group(args, hypervisors)
    args.name = args.names[0]
    try:
        hv = find_domain(hypervisors, args.name)
    except NotFoundError:
        hv = _find_template(hypervisors, args.name, args.backup_dir)
    plan = clones.plan_remove(
        hv,
        args.name,
        storage=args.storage,
        backup_dir=args.backup_dir,
        others=hypervisors,
        force=args.force,
    )
    return carry_out(
        args,
        plan,
        lambda: clones.execute_remove(
            hv, plan, stderr_progress, backup_dir=args.backup_dir, others=hypervisors
        ),
        lambda done: [f"{args.name}: removed" + (f" (deleted {', '.join(done)})" if done else "")],
        result_key="deleted",
        dry_result=[],
    )
