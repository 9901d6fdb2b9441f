"""Templates: seal a shut-off VM into a read-only base that clones are deployed from.

Plan, then execute. `plan_template()` checks everything it can without changing anything (the
domain, the new name, the backup file, the virt-sysprep operations) and returns a frozen
TemplatePlan the UI can show; `execute_template()` then shuts the domain down, seals it with
virt-sysprep, renames it, records virtdeck's <metadata>, backs its XML up, makes its base
images read-only and optionally undefines it. Sealing cannot be undone, so it runs before any
change libvirt knows about; what comes after it (rename, metadata, backup, file modes,
undefine) is undone if a later step fails.

`list_templates()` reports the templates of a hypervisor, including undefined ones that only
live on as an XML backup, with their base images and the clones made from them. The backing
chain helpers here are shared with tui.core.clones (removal refuses an image others build on).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt

from tui.core import domxml, ops, procs
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor, validate_name
from tui.core.models import DiskInfo, DomainInfo, DomainState, VirtdeckMeta
from tui.core.paths import template_backup_dir
from tui.core.progress import Progress, no_progress
from tui.core.storage import (
    ImageUser,
    Owner,
    Resolver,
    StorageGraph,
    files_for,
)
from tui.core.storage.local import write_private
from tui.core.storage.qemuimg import last_line
from tui.core.units import total

#: runner(argv, on_line) -> exit status; calls on_line for every line of output (stdout+stderr).
LineRunner = Callable[[Sequence[str], Callable[[str], None]], int]


def run_streaming(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
    """Run a command (argument list, no shell), handing each output line to `on_line`."""
    proc = procs.popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        bufsize=1,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()
    finally:
        procs.finish(proc)  # an interrupt kills virt-sysprep with the operation


class Sysprep:
    """virt-sysprep with an injectable runner (a test forces its failure)."""

    def __init__(
        self,
        runner: LineRunner | None = None,
        binary: str = "virt-sysprep",
        *,
        remote: bool = False,
    ) -> None:
        self.runner = runner or run_streaming
        self.binary = binary
        self.remote = remote  # it runs on another host: this process's environment is not its
        self._operations: dict[str, bool] | None = None

    def _run(self, argv: Sequence[str], on_line: Callable[[str], None]) -> int:
        try:
            return self.runner(argv, on_line)
        except FileNotFoundError:
            raise OperationError(
                f"{self.binary} is not installed (apt-get install guestfs-tools, "
                "or libguestfs-tools on older releases); or make the template with --no-seal"
            ) from None

    def operations(self) -> dict[str, bool]:
        """Every operation this virt-sysprep knows, mapped to whether it runs by default."""
        if self._operations is None:
            lines: list[str] = []
            status = self._run([self.binary, "--list-operations"], lines.append)
            if status != 0:
                why = last_line("\n".join(lines))
                raise OperationError(f"{self.binary} --list-operations failed: {why}")
            ops: dict[str, bool] = {}
            for line in lines:
                parts = line.split()
                if parts:
                    ops[parts[0]] = len(parts) > 1 and parts[1] == "*"
            self._operations = ops
        return self._operations

    def seal(
        self,
        *,
        uri: str,
        domain: str | None,
        images: Sequence[tuple[str, str | None]],
        operations: Sequence[str] | None,
        progress: Progress = no_progress,
    ) -> None:
        """Seal a shut-off guest: `-d` by name on a qemu URI, else `-a` per image."""
        argv = [self.binary]
        if domain is not None:
            argv += ["-c", uri, "-d", domain]
        else:
            for path, fmt in images:
                if fmt:
                    argv += ["--format", fmt]
                argv += ["-a", path]
        if operations is not None:
            argv += ["--operations", ",".join(operations)]
        lines: list[str] = []

        def on_line(line: str) -> None:
            lines.append(line)
            if line.strip():
                progress(f"sysprep: {line.strip()}", None)

        status = self._run(argv, on_line)
        if (
            status != 0
            and _appliance_failed(lines)
            and (
                self.remote or "force_tcg" not in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")
            )
        ):
            # libguestfs' appliance VM cannot start under KVM on some hosts (nested
            # virtualisation, as on these CI machines). It failed before touching the image, so
            # run it again under TCG: slower (about 30 s for a small guest) but it works.
            progress(
                "sysprep: the libguestfs appliance did not start under KVM; retrying with TCG "
                "(slower)",
                None,
            )
            lines.clear()
            status = self._run([*_TCG_ENV, *argv], on_line)
        if status != 0:
            why = last_line("\n".join(lines))
            raise OperationError(f"virt-sysprep failed (exit {status}): {why}")


def sysprep_for(hv: Hypervisor, sysprep: Sysprep | None = None) -> Sysprep:
    """virt-sysprep where the images are: here, or on the hypervisor over the SSH target of
    its qemu+ssh URI (refused with the reason on a transport without SSH)."""
    if sysprep is not None:
        return sysprep
    if hv.local:
        return Sysprep()
    from tui.core.storage.remote import run_on_host

    return Sysprep(runner=run_on_host(hv), remote=True)


_TCG_ENV = ("env", "LIBGUESTFS_BACKEND=direct", "LIBGUESTFS_BACKEND_SETTINGS=force_tcg")


def _appliance_failed(lines: Sequence[str]) -> bool:
    return any("guestfs_launch failed" in line for line in lines)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# -- images and the domains that use them ---------------------------------------------------


def own_images(disks: Iterable[DiskInfo]) -> list[DiskInfo]:
    """The writable image files a domain owns (CD-ROMs, read-only and shareable disks, block
    devices and network disks are not images virtdeck copies, seals or deletes)."""
    return [d for d in disks if d.is_image]


def foreign_disks(disks: Iterable[DiskInfo]) -> list[DiskInfo]:
    """Writable disks that are not image files (block, network, pool volume, directory)."""
    return [
        d
        for d in disks
        if d.device == "disk" and not d.readonly and not d.shareable and not d.is_image
    ]


def backup_owners(backup_dir: Path | None = None, hv: Hypervisor | None = None) -> list[Owner]:
    """Templates known only from their XML backups (of `hv`), as owners of images."""
    return [
        Owner(b.name, domxml.disks(b.root), defined=False) for b in backup_templates(backup_dir, hv)
    ]


def storage_graph(
    hv: Hypervisor, backup_dir: Path | None = None, resolver: Resolver | None = None
) -> StorageGraph:
    """Every domain of `hv` and every template backup, with their chains."""
    return StorageGraph.read(
        hv,
        resolver=resolver or Resolver(hv, ssh=True),
        extra_owners=backup_owners(backup_dir, hv),
    )


def image_users(
    hv: Hypervisor,
    images: Iterable[str],
    *,
    exclude: str | None = None,
    backup_dir: Path | None = None,
) -> list[ImageUser]:
    """Every domain other than `exclude` (name) whose disks are, or build on, one of `images`."""
    images = list(images)
    if not images:
        return []
    return storage_graph(hv, backup_dir).users(images, exclude=exclude)


# -- the templates of a hypervisor -----------------------------------------------------------


@dataclass(frozen=True)
class BaseImage:
    """A template's base image; sizes and mode nobody could read are None, with the reason."""

    path: str
    format: str | None
    target: str
    virtual_bytes: int | None
    actual_bytes: int | None
    read_only: bool | None
    problem: str | None = None


@dataclass(frozen=True)
class Template:
    host: str
    name: str
    defined: bool
    xml_backup: str | None
    source: str | None  # the VM it was made from
    created: str | None
    sealed: bool
    sealed_operations: tuple[str, ...]
    base_images: tuple[BaseImage, ...]
    thin_clones: tuple[str, ...]
    full_clones: tuple[str, ...]
    incomplete_clones: tuple[str, ...] = ()  # interrupted before their disks were whole

    @property
    def virtual_bytes(self) -> int | None:
        return total(b.virtual_bytes for b in self.base_images)

    @property
    def actual_bytes(self) -> int | None:
        return total(b.actual_bytes for b in self.base_images)

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(b.problem for b in self.base_images if b.problem)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["virtual_bytes"] = self.virtual_bytes
        data["actual_bytes"] = self.actual_bytes
        data["problems"] = list(self.problems)
        data["sealed_operations"] = list(self.sealed_operations)
        data["thin_clones"] = list(self.thin_clones)
        data["full_clones"] = list(self.full_clones)
        data["incomplete_clones"] = list(self.incomplete_clones)
        return data


@dataclass(frozen=True)
class BackupTemplate:
    name: str
    path: Path
    root: Any  # ET.Element of the backed-up domain XML


def host_key(hv: Hypervisor) -> str:
    """Which hypervisor a template backup belongs to: a system daemon by its host name (so
    qemu:///system and qemu+ssh://that-host/system are one), any other by its URI."""
    found = _host_keys.get(hv.uri)
    if found is not None:
        return found
    if urlsplit(hv.uri).path.rstrip("/") != "/system":
        return hv.uri
    try:
        found = _host_keys[hv.uri] = f"system@{hv.call(hv.conn.getHostname)}"
    except VirtdeckError:
        return hv.uri  # not cached: asked again once the host answers
    return found


_host_keys: dict[str, str] = {}  # a URI's host name does not change while virtdeck runs


def backup_templates(
    backup_dir: Path | None = None, hv: Hypervisor | None = None
) -> list[BackupTemplate]:
    """The template XML backups in the backup directory (defined or not); with `hv`, only
    those of that hypervisor (a backup from before hosts were recorded belongs to the
    hypervisors of this machine)."""
    key = host_key(hv) if hv is not None else None
    directory = Path(backup_dir) if backup_dir is not None else template_backup_dir()
    out = []
    for path in sorted(directory.glob("*.xml")):
        try:
            root = domxml.parse(path.read_text())
        except (OSError, domxml.ET.ParseError):
            continue
        name = root.findtext("name")
        meta = domxml.read_meta(root)
        if not name or meta.role != "template":
            continue
        if hv is not None and (meta.host != key if meta.host else not hv.local):
            continue
        out.append(BackupTemplate(name, path, root))
    return out


def template_xml(hv: Hypervisor, name: str, backup_dir: Path | None = None) -> tuple[str, bool]:
    """(inactive XML, defined) of the template `name`: the domain, else its XML backup."""
    if hv.exists(name):
        xml = hv.xml(name, inactive=True)
        if domxml.read_meta(domxml.parse(xml)).role != "template":
            raise InvalidInputError(
                f"'{name}' is not a template; make one with 'virtdeck template create {name}'"
            )
        return xml, True
    for backup in backup_templates(backup_dir, hv):
        if backup.name == name:
            return domxml.to_string(backup.root), False
    raise NotFoundError(
        f"no template named '{name}' on {hv.uri} or in "
        f"{backup_dir or template_backup_dir()} ('virtdeck template ls' lists them)"
    )


def _base_image(disk: DiskInfo, graph: StorageGraph) -> BaseImage:
    assert disk.path is not None
    chain = graph.chain(disk.path, disk.format)
    top = chain.top
    return BaseImage(
        disk.path,
        disk.format,
        disk.target,
        top.virtual_bytes,
        top.actual_bytes,
        top.read_only,
        chain.problem,
    )


def list_templates(
    hv: Hypervisor,
    backup_dir: Path | None = None,
    *,
    include_backups: bool = True,
    domains: list[DomainInfo] | None = None,
    resolver: Resolver | None = None,
) -> list[Template]:
    """Defined templates, plus undefined ones from their XML backups, with their clones.

    A thin clone is a domain whose metadata names the template with mode "thin", or any domain
    whose backing chain reaches one of its base images (clones made by hand count too).
    """
    domains = hv.domains() if domains is None else domains
    found: list[tuple[str, bool, str | None, VirtdeckMeta, tuple[DiskInfo, ...]]] = []
    names = {d.name for d in domains}
    for d in domains:
        if d.is_template:
            found.append((d.name, True, d.meta.xml_backup, d.meta, d.disks))
    if include_backups:
        for backup in backup_templates(backup_dir, hv):
            if backup.name not in names:
                meta = domxml.read_meta(backup.root)
                found.append(
                    (backup.name, False, str(backup.path), meta, domxml.disks(backup.root))
                )
    # One graph of every domain's chains (read in-process, cached), shared by all templates.
    graph = StorageGraph(
        resolver or Resolver(hv), [Owner(d.name, d.disks) for d in domains if not d.is_template]
    )
    out = []
    for name, defined, backup_path, meta, disks in found:
        images = tuple(_base_image(disk, graph) for disk in own_images(disks))
        users = {u.name for u in graph.users([b.path for b in images]) if u.how == "backing"}
        thin, full, incomplete = [], [], []
        for d in domains:
            if d.is_template:
                continue
            if d.meta.role == "clone" and d.meta.source == name and not d.meta.complete:
                incomplete.append(d.name)
            elif d.name in users or (
                d.meta.role == "clone" and d.meta.source == name and d.meta.mode == "thin"
            ):
                thin.append(d.name)
            elif d.meta.role == "clone" and d.meta.source == name:
                full.append(d.name)
        out.append(
            Template(
                host=hv.uri,
                name=name,
                defined=defined,
                xml_backup=backup_path,
                source=meta.source,
                created=meta.created,
                sealed=meta.sealed,
                sealed_operations=meta.operations,
                base_images=images,
                thin_clones=tuple(thin),
                full_clones=tuple(full),
                incomplete_clones=tuple(incomplete),
            )
        )
    out.sort(key=lambda t: t.name)
    return out


def get_template(hv: Hypervisor, name: str, backup_dir: Path | None = None) -> Template:
    for t in list_templates(hv, backup_dir):
        if t.name == name:
            return t
    raise NotFoundError(f"no template named '{name}' ('virtdeck template ls' lists them)")


# -- making a template -----------------------------------------------------------------------


@dataclass(frozen=True)
class TemplatePlan(ops.PlanDefaults):
    host: str
    vm: str
    uuid: str
    name: str
    state: DomainState
    force: bool
    seal: bool
    operations: tuple[str, ...]  # what virt-sysprep will run (its defaults when not chosen)
    chosen_operations: bool  # False: virt-sysprep's default set
    images: tuple[tuple[str, str | None], ...]  # (path, format) of the base images
    backup_dir: str
    backup_path: str
    undefine: bool
    shutdown_timeout: float

    @property
    def needs_shutdown(self) -> bool:
        return self.state.active

    @property
    def title(self) -> str:
        return f"Make '{self.vm}' a template?"

    @property
    def confirm_label(self) -> str:
        return "Make template"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        t = execute_template(hv, self, progress)
        return f"'{t.name}' is a template" + ("" if t.defined else " (undefined)")

    def summary(self) -> list[str]:
        lines = []
        if self.state == DomainState.RUNNING:
            how = (
                "gracefully, then force it off if it ignores that"
                if self.force
                else (
                    f"gracefully (fails after {self.shutdown_timeout:g} s if the guest ignores it)"
                )
            )
            lines.append(f"shut '{self.vm}' down {how}")
        elif self.needs_shutdown:
            lines.append(f"force '{self.vm}' off (it is {self.state.value})")
        if self.seal:
            ops = ",".join(self.operations) if self.chosen_operations else "default operations"
            lines.append(f"seal with virt-sysprep: {ops}")
        else:
            lines.append("do not seal (clones will carry this VM's identity)")
        if self.name != self.vm:
            lines.append(f"rename '{self.vm}' to '{self.name}'")
        lines.append(f"back up its XML to {self.backup_path}")
        lines.extend(f"make {path} read-only" for path, _ in self.images)
        if self.undefine:
            lines.append("undefine it from libvirt (keep the XML backup and the disks)")
        return lines


def _check_writable_dir(directory: Path) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"cannot write the XML backup into {directory}: {probe} is not a writable "
            "directory (choose another with --backup-dir)"
        )


def plan_template(
    hv: Hypervisor,
    vm: str,
    *,
    name: str | None = None,
    seal: bool = True,
    operations: Sequence[str] | None = None,
    backup_dir: str | Path | None = None,
    undefine: bool = False,
    force: bool = False,
    shutdown_timeout: float = 120.0,
    sysprep: Sysprep | None = None,
) -> TemplatePlan:
    """Check everything before anything changes; the plan says what execute_template() does."""
    info = hv.domain(vm)
    if info.is_template:
        raise StateError(f"'{vm}' is already a template")
    if not info.persistent:
        raise StateError(f"'{vm}' is a transient domain; define it before making a template")
    new_name = validate_name(name or f"template-{vm}")
    if new_name != vm and hv.exists(new_name):
        raise InvalidInputError(f"a domain named '{new_name}' already exists; choose --name")
    if new_name != vm and _snapshot_count(hv, vm):
        raise StateError(
            f"'{vm}' has snapshots and libvirt cannot rename such a domain; delete them "
            f"first, or keep its name with --name {vm}"
        )
    if info.state.active and info.state != DomainState.RUNNING and not force:
        raise StateError(
            f"'{vm}' is {info.state.value}: it cannot shut down gracefully; "
            "resume it first, or force it off with --force"
        )
    for disk in foreign_disks(info.disks):
        raise InvalidInputError(
            f"disk {disk.target} of '{vm}' is a {disk.described}: virtdeck makes templates of "
            "image files only (it would seal, share and make read-only what is not its own); "
            "detach it or make the template by hand"
        )
    images = []
    resolver = Resolver(hv, ssh=True)
    for disk in own_images(info.disks):
        assert disk.path is not None
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target} of '{vm}': {chain.problem}")
        images.append((disk.path, disk.format))
    if not images:
        raise InvalidInputError(f"'{vm}' has no disk image to make a template from")
    directory = Path(backup_dir) if backup_dir is not None else template_backup_dir()
    backup_path = directory / f"{new_name}.xml"
    if backup_path.exists():
        raise InvalidInputError(
            f"{backup_path} already exists (an undefined template named '{new_name}'?); "
            "choose another --name or --backup-dir"
        )
    _check_writable_dir(directory)
    ops: tuple[str, ...] = ()
    if operations is not None and not seal:
        raise InvalidInputError("--operations only makes sense when sealing (drop --no-seal)")
    if seal:
        known = sysprep_for(hv, sysprep).operations()
        if operations is not None:
            ops = tuple(o.strip() for o in operations if o.strip())
            if not ops:
                raise InvalidInputError("--operations is empty; name at least one operation")
            unknown = [o for o in ops if o not in known]
            if unknown:
                raise InvalidInputError(
                    f"unknown virt-sysprep operation(s): {', '.join(unknown)} "
                    "('virt-sysprep --list-operations' lists them)"
                )
        else:
            ops = tuple(o for o, default in known.items() if default)
    return TemplatePlan(
        host=hv.uri,
        vm=vm,
        uuid=info.uuid,
        name=new_name,
        state=info.state,
        force=force,
        seal=seal,
        operations=ops,
        chosen_operations=operations is not None,
        images=tuple(images),
        backup_dir=str(directory),
        backup_path=str(backup_path),
        undefine=undefine,
        shutdown_timeout=shutdown_timeout,
    )


def _snapshot_count(hv: Hypervisor, vm: str) -> int:
    try:
        return int(hv.call(hv.lookup(vm).snapshotNum, 0))
    except OperationError:
        return 0  # a driver without snapshots has none to block the rename


def _shut_down(hv: Hypervisor, plan: TemplatePlan, progress: Progress) -> None:
    state = hv.domain(plan.vm).state
    if not state.active:
        return
    if state == DomainState.RUNNING:
        progress(f"shutting '{plan.vm}' down", None)
        with contextlib.suppress(StateError):
            hv.shutdown(plan.vm)
        if _wait_off(hv, plan.vm, plan.shutdown_timeout):
            return
        if not plan.force:
            raise StateError(
                f"'{plan.vm}' is still running after {plan.shutdown_timeout:g} s (the guest "
                "ignored the shutdown request); nothing was changed; try again with force off "
                "(--force, or tick Force off)"
            )
    elif not plan.force:
        raise StateError(
            f"'{plan.vm}' is {state.value}; try again with force off (--force, or tick Force off)"
        )
    progress(f"forcing '{plan.vm}' off", None)
    with contextlib.suppress(StateError):
        hv.destroy(plan.vm)
    if not _wait_off(hv, plan.vm, 30):
        raise StateError(f"'{plan.vm}' did not power off; nothing was changed")


def _wait_off(hv: Hypervisor, name: str, timeout: float) -> bool:
    """Wait for the domain to power off, a second at a time so an interrupt is heard."""
    deadline = time.monotonic() + timeout
    while True:
        ops.check_cancelled()
        left = deadline - time.monotonic()
        if hv.wait_for_state(name, [DomainState.SHUTOFF], max(0.0, min(1.0, left))):
            return True
        if left <= 1.0:
            return False


def execute_template(
    hv: Hypervisor,
    plan: TemplatePlan,
    progress: Progress = no_progress,
    *,
    sysprep: Sysprep | None = None,
) -> Template:
    """Do what the plan says, journalled (tui.core.ops): on a failure or an interrupt after
    sealing, the rename, metadata, backup, file modes and undefine are undone (the sealing
    itself cannot be, and the VM stays shut off); a crash leaves a journal `virtdeck recover`
    rolls back."""
    files = files_for(hv, "template create")
    done, progress = progress, ops.cancellable(progress)
    dom = hv.lookup(plan.vm)
    if dom.UUIDString() != plan.uuid:
        raise StateError(f"'{plan.vm}' changed since the plan was made; plan again")
    if plan.name != plan.vm and hv.exists(plan.name):
        raise InvalidInputError(f"a domain named '{plan.name}' already exists; choose --name")
    if os.path.exists(plan.backup_path):
        raise InvalidInputError(f"{plan.backup_path} already exists; choose another --name")
    modes = {path: files.mode(path) for path, _ in plan.images}  # refuses non-files up front
    secure = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    try:
        with ops.running(hv, f"making '{plan.vm}' a template") as undo:
            _shut_down(hv, plan, progress)
            if plan.seal:
                progress(f"sealing '{plan.vm}' with virt-sysprep", None)
                sysprep_for(hv, sysprep).seal(
                    uri=hv.uri,
                    # On another host virt-sysprep runs there, on the image files (-a).
                    domain=plan.vm if hv.local and hv.uri.startswith("qemu") else None,
                    images=plan.images,
                    operations=plan.operations if plan.chosen_operations else None,
                    progress=progress,
                )
            orig_xml = hv.call(dom.XMLDesc, secure, what=plan.vm)
            undo.push(f"restore the definition of '{plan.vm}'", "define", xml=orig_xml)
            if plan.name != plan.vm:
                progress(f"renaming '{plan.vm}' to '{plan.name}'", None)
                undo.push(f"rename back to '{plan.vm}'", "rename", uuid=plan.uuid, name=plan.vm)
                dom = hv.rename(dom, plan.vm, plan.name)
            meta = VirtdeckMeta(
                role="template",
                created=now_iso(),
                source=plan.vm,
                operations=plan.operations if plan.seal else (),
                sealed=plan.seal,
                xml_backup=plan.backup_path,
                host=host_key(hv),
            )
            hv.call(
                dom.setMetadata,
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                domxml.meta_xml(meta),
                domxml.PREFIX,
                domxml.NS,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
                what=f"recording template metadata on '{plan.name}'",
            )
            progress(f"backing up the XML to {plan.backup_path}", None)
            xml = hv.call(dom.XMLDesc, secure, what=plan.name)
            undo.push(f"remove {plan.backup_path}", "remove_private", path=plan.backup_path)
            try:
                # 0600: the XML is dumped with VIR_DOMAIN_XML_SECURE (VNC/SPICE passwords).
                write_private(plan.backup_path, xml)
            except OperationError as err:
                raise OperationError(f"cannot write the XML backup: {err}") from None
            for path, _ in plan.images:
                progress(f"making {path} read-only", None)
                undo.push(f"make {path} writable again", "restore_mode", path=path,
                          mode=modes[path])  # fmt: skip
                files.make_read_only(path)
            if plan.undefine:
                progress(f"undefining '{plan.name}' (XML kept in {plan.backup_path})", None)
                hv.undefine(dom, keep_nvram=True, what=f"undefining '{plan.name}'")
            undo.commit()
    finally:
        hv.invalidate(plan.uuid)
    done(f"'{plan.name}' is a template", 1.0)
    return get_template(hv, plan.name, Path(plan.backup_dir))
