"""Templates: seal a shut-off VM into a read-only base that clones are deployed from.

Plan, then execute. `plan_template()` checks everything it can without changing anything (the
domain, the new name, the backup file, the virt-sysprep operations) and returns a frozen
TemplatePlan the UI can show; `execute_template()` then shuts the domain down, seals it with
virt-sysprep (with what tui.core.sealing adds in the same run, so that no machine-id, random
seed or SSH host key is left for the clones to share), renames it, records virtdeck's
<metadata>, backs its XML up, makes its base images read-only and optionally undefines it.
Sealing cannot be undone, so it runs before any change libvirt knows about; what comes after
it (rename, metadata, backup, file modes, undefine) is undone if a later step fails.

`list_templates()` reports the templates of a hypervisor, including undefined ones that only
live on as an XML backup, with their base images and the clones made from them. The backing
chain helpers here are shared with tui.core.clones (removal refuses an image others build on).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from tui.core import bases, domxml, ops, procs, sealing
from tui.core.catalog import (  # noqa: F401  (re-exported: templates is the face)
    BackupTemplate,
    BaseImage,
    Template,
    backup_owners,
    backup_templates,
    foreign_disks,
    get_template,
    host_key,
    image_users,
    list_templates,
    own_images,
    storage_graph,
    template_xml,
)
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
)
from tui.core.hypervisor import Hypervisor, validate_name
from tui.core.models import DiskInfo, DomainState, VirtdeckMeta
from tui.core.paths import template_backup_dir
from tui.core.progress import Progress, no_progress
from tui.core.storage import (
    Resolver,
    files_for,
)
from tui.core.storage.local import write_private
from tui.core.storage.qemuimg import last_line

#: runner(argv, on_line) -> exit status; calls on_line for every line of output (stdout+stderr).
LineRunner = Callable[[Sequence[str], Callable[[str], None]], int]


def run_streaming(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
    """Run a command (argument list, no shell), handing each output line to `on_line`."""
    return procs.stream(argv, on_line)  # an interrupt kills virt-sysprep with the operation


class Sysprep:
    """virt-sysprep with an injectable runner (a test forces its failure)."""

    def __init__(
        self,
        runner: LineRunner | None = None,
        binary: str = "virt-sysprep",
        *,
        remote: bool = False,
        host: str = "",
    ) -> None:
        self.runner = runner or run_streaming
        self.binary = binary
        self.remote = remote  # it runs on another host: this process's environment is not its
        self.host = host  # where it runs, for the appliance probe ("" = here)
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
        additions: Sequence[str] = (),
    ) -> None:
        """Seal a shut-off guest: `-d` by name on a qemu URI, else `-a` per image; with
        virtdeck's `additions` (tui.core.sealing) in the same run."""
        argv = [self.binary]
        if domain is not None:
            argv += ["-c", uri, "-d", domain]
        else:
            for path, fmt in images:
                if fmt:
                    argv += ["--format", fmt]
                argv += ["-a", path]
        if operations is not None:
            argv += ["--operations", ",".join(sealing.sysprep_operations(operations, additions))]
        argv += sealing.customize_argv(additions)
        status, lines = run_guestfs(
            self._run,
            argv,
            progress=progress,
            label="sysprep",
            remote=self.remote,
            where=self.host,
        )
        if status != 0:
            why = last_line("\n".join(lines))
            raise OperationError(f"virt-sysprep failed (exit {status}): {why}")


def run_guestfs(
    run: LineRunner,
    argv: Sequence[str],
    *,
    progress: Progress,
    label: str,
    remote: bool = False,
    where: str = "",
) -> tuple[int, list[str]]:
    """Run a libguestfs tool (virt-sysprep, virt-customize), each output line reported as
    `label: line`; returns its exit status and its lines.

    libguestfs boots a small appliance VM under KVM. On some hosts (nested virtualisation, as
    on these CI machines) that VM fails to start, or hangs for libguestfs' 20 minute launch
    timeout with its vCPU spinning. So unless TCG is already forced (this process's
    environment, when the tool runs here), whether the appliance boots under KVM `where` the
    tool runs is probed once per process, with a deadline (appliance_boots_under_kvm), and the
    tool runs under TCG if it does not. A fast failure under KVM is still retried under TCG.
    """
    lines: list[str] = []
    held: list[str] = []  # the tool's error block: shown once it is known no retry follows

    def on_line(line: str) -> None:
        lines.append(line)
        text = line.strip()
        if not text:
            return
        if held or ": error:" in text:
            held.append(text)
        else:
            progress(f"{label}: {text}", None)

    tcg = not remote and "force_tcg" in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")
    if not tcg and not appliance_boots_under_kvm(run, where or ("remote" if remote else "")):
        progress(
            f"{label}: the libguestfs appliance did not start under KVM within "
            f"{APPLIANCE_DEADLINE} s here; using TCG (slower)",
            None,
        )
        argv = [*_TCG_ENV, *argv]
        tcg = True
    status = run(argv, on_line)
    if status != 0 and _appliance_failed(lines) and not tcg:
        # It failed before touching the image, so run it again under TCG: slower (about
        # 30 s for a small guest) but it works.
        progress(
            f"{label}: the libguestfs appliance did not start under KVM; retrying with TCG "
            "(slower)",
            None,
        )
        lines.clear()
        held.clear()  # the KVM attempt's dozen lines of advice on debugging libguestfs
        status = run([*_TCG_ENV, *argv], on_line)
    for text in held:
        progress(f"{label}: {text}", None)
    return status, lines


#: seconds the probe gives libguestfs' appliance to boot under KVM (a few on a healthy host,
#: building the appliance the first time included)
APPLIANCE_DEADLINE = 60
_PROBE = ("timeout", "-k", "5", str(APPLIANCE_DEADLINE), "guestfish", "-a", "/dev/null", "run")
_kvm_boots: dict[str, bool] = {}
_kvm_lock = threading.Lock()


def appliance_boots_under_kvm(run: LineRunner, where: str) -> bool:
    """Whether libguestfs' appliance boots (`guestfish -a /dev/null run`, no image involved)
    within APPLIANCE_DEADLINE seconds where `run` runs; asked once per `where` (a host) per
    process. A probe that cannot run (no guestfish, no timeout) says yes: the tool then runs
    as before, with its retry after a fast failure."""
    with _kvm_lock:  # clones customised in parallel wait for one probe
        if where not in _kvm_boots:
            try:
                status = run(_PROBE, lambda _line: None)
            except (FileNotFoundError, OperationError):
                status = 0
            _kvm_boots[where] = status not in (124, 137) and (status == 0 or status >= 126)
        return _kvm_boots[where]


def sysprep_for(hv: Hypervisor, sysprep: Sysprep | None = None) -> Sysprep:
    """virt-sysprep where the images are: here, or on the hypervisor over the SSH target of
    its qemu+ssh URI (refused with the reason on a transport without SSH)."""
    if sysprep is not None:
        return sysprep
    if hv.local:
        return Sysprep()
    from tui.core.storage.remote import run_on_host

    return Sysprep(runner=run_on_host(hv), remote=True, host=hv.uri)


_TCG_ENV = ("env", "LIBGUESTFS_BACKEND=direct", "LIBGUESTFS_BACKEND_SETTINGS=force_tcg")


def _appliance_failed(lines: Sequence[str]) -> bool:
    return any("guestfs_launch failed" in line for line in lines)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


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
    additions: tuple[str, ...] = ()  # what virtdeck adds to virt-sysprep (tui.core.sealing)
    windows: bool = False  # the domain XML says Windows: nothing is added
    family: str | None = None  # a new version of that template (tui.core.versions)
    version: int | None = None
    identity: str | None = None  # how its clones get their identity by default (recorded)

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
            lines.extend(sealing.plan_lines(self.operations, self.additions, self.windows))
        else:
            lines.append("do not seal (clones will carry this VM's identity)")
        if self.name != self.vm:
            lines.append(f"rename '{self.vm}' to '{self.name}'")
        lines.append(
            "record its base's identity (a sha256 of each layer, read once) for other hosts"
        )
        if self.identity == "cloud-init":
            lines.append("record that its clones get their identity from a cloud-init seed each")
        elif self.identity is not None:
            lines.append(f"record that its clones get their identity with {self.identity}")
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
    identity: str | None = None,
) -> TemplatePlan:
    """Check everything before anything changes; the plan says what execute_template() does.
    `identity` ("cloud-init" or "virt-customize") is how its clones get their identity by
    default, recorded in the metadata (the operator knows whether the guest runs cloud-init;
    reading the guest to find out would cost another libguestfs appliance)."""
    if identity not in (None, "cloud-init", "virt-customize"):
        raise InvalidInputError(f"identity '{identity}': it is 'cloud-init' or 'virt-customize'")
    info = hv.domain(vm)
    if info.is_template:
        raise StateError(f"'{vm}' is already a template")
    if not info.persistent:
        raise StateError(f"'{vm}' is a transient domain; define it before making a template")
    new_name = validate_name(name or f"template-{vm}")
    if new_name != vm and hv.exists(new_name):
        raise InvalidInputError(f"a domain named '{new_name}' already exists; choose --name")
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
    images = _whole_images(hv, vm, info.disks)
    if not images:
        raise InvalidInputError(f"'{vm}' has no disk image to make a template from")
    bases.refuse_shared_template(hv, vm, [p for p, _ in images])
    directory = Path(backup_dir) if backup_dir is not None else template_backup_dir()
    backup_path = directory / f"{new_name}.xml"
    if backup_path.exists():
        raise InvalidInputError(
            f"{backup_path} already exists (an undefined template named '{new_name}'?); "
            "choose another --name or --backup-dir"
        )
    _check_writable_dir(directory)
    if operations is not None and not seal:
        raise InvalidInputError("--operations only makes sense when sealing (drop --no-seal)")
    ops = _sysprep_operations(hv, sysprep, operations) if seal else ()
    windows = seal and sealing.is_windows(domxml.parse(hv.xml(vm, inactive=True)))
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
        identity=identity,
        additions=sealing.additions(ops, windows=windows) if seal else (),
        windows=windows,
    )


def _whole_images(
    hv: Hypervisor, vm: str, disks: Sequence[DiskInfo]
) -> list[tuple[str, str | None]]:
    """(path, format) of each image the VM owns, each chain read whole."""
    images = []
    resolver = Resolver(hv, ssh=True)
    for disk in own_images(disks):
        assert disk.path is not None
        chain = resolver.chain(disk.path, disk.format)
        if not chain.complete:
            raise NotFoundError(f"disk {disk.target} of '{vm}': {chain.problem}")
        images.append((disk.path, disk.format))
    return images


def _sysprep_operations(
    hv: Hypervisor, sysprep: Sysprep | None, operations: Sequence[str] | None
) -> tuple[str, ...]:
    """The virt-sysprep operations asked for (each one it knows), else its defaults."""
    known = sysprep_for(hv, sysprep).operations()
    if operations is None:
        return tuple(o for o, default in known.items() if default)
    ops = tuple(o.strip() for o in operations if o.strip())
    if not ops:
        raise InvalidInputError("--operations is empty; name at least one operation")
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown virt-sysprep operation(s): {', '.join(unknown)} "
            "('virt-sysprep --list-operations' lists them)"
        )
    return ops


def _mark_template(hv: Hypervisor, dom: Any, plan: TemplatePlan, progress: Progress) -> None:
    """Its metadata says it is a template, with its base's identity (digested once, here:
    the base is final)."""
    from tui.core import baseid

    identity = baseid.compute(
        hv, hv.call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE, what=plan.name), progress
    )
    meta = VirtdeckMeta(
        role="template",
        created=now_iso(),
        source=plan.vm,
        operations=plan.operations if plan.seal else (),
        sealed=plan.seal,
        xml_backup=plan.backup_path,
        host=host_key(hv),
        sealing=plan.additions if plan.seal else None,
        family=plan.family,
        version=plan.version,
        base_identity=identity,
        identity=plan.identity,
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
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(bases.family_lock(hv, [path for path, _ in plan.images]))
        # Under the lock: a clone or a snapshot made since the plan counts.
        bases.refuse_shared_template(hv, plan.vm, [path for path, _ in plan.images])
        title = f"making '{plan.vm}' a template"
        dirs = {os.path.dirname(path) for path, _ in plan.images}
        dirs.add(os.path.dirname(plan.backup_path))
        with ops.running(hv, title, domains=[plan.vm, plan.name], dirs=dirs) as undo:
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
                    additions=plan.additions,
                )
            orig_xml = hv.call(dom.XMLDesc, secure, what=plan.vm)
            undo.push(f"restore the definition of '{plan.vm}'", "define", xml=orig_xml)
            if plan.name != plan.vm:
                progress(f"renaming '{plan.vm}' to '{plan.name}'", None)
                undo.push(f"rename back to '{plan.vm}'", "rename", uuid=plan.uuid, name=plan.vm)
                dom = hv.rename(dom, plan.vm, plan.name)
                undo.domain_left(plan.uuid)
            _mark_template(hv, dom, plan, progress)
            undo.domain_left(plan.uuid)
            progress(f"backing up the XML to {plan.backup_path}", None)
            xml = hv.call(dom.XMLDesc, secure, what=plan.name)
            try:
                with undo.step(f"remove {plan.backup_path}", "remove_private",
                               path=plan.backup_path):  # fmt: skip
                    # 0600: the XML is dumped with VIR_DOMAIN_XML_SECURE (VNC/SPICE passwords).
                    write_private(plan.backup_path, xml)
            except OperationError as err:
                raise OperationError(f"cannot write the XML backup: {err}") from None
            for path, _ in plan.images:
                progress(f"making {path} read-only", None)
                with undo.step(f"make {path} writable again", "restore_mode", path=path,
                               mode=modes[path]):  # fmt: skip
                    files.make_read_only(path)
                undo.steps.append(f"made {path} read-only")  # (the audit record names it)
            if plan.undefine:
                progress(f"undefining '{plan.name}' (XML kept in {plan.backup_path})", None)
                hv.undefine(dom, keep_nvram=True, what=f"undefining '{plan.name}'")
            undo.commit()
    finally:
        lock.close()
        hv.invalidate(plan.uuid)
    done(f"'{plan.name}' is a template", 1.0)
    return get_template(hv, plan.name, Path(plan.backup_dir))
