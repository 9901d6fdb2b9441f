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
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

from tui.core import domxml
from tui.core.errors import (
    InvalidInputError,
    NotFoundError,
    OperationError,
    StateError,
    VirtdeckError,
)
from tui.core.hypervisor import Hypervisor, libvirt_message, validate_name
from tui.core.models import DiskInfo, DomainInfo, DomainState, VirtdeckMeta
from tui.core.paths import template_backup_dir
from tui.core.progress import Progress, no_progress
from tui.core.qemuimg import QemuImg, last_line

#: runner(argv, on_line) -> exit status; calls on_line for every line of output (stdout+stderr).
LineRunner = Callable[[Sequence[str], Callable[[str], None]], int]

READ_ONLY = 0o444


def run_streaming(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
    """Run a command (argument list, no shell), handing each output line to `on_line`."""
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


class Sysprep:
    """virt-sysprep with an injectable runner (a test forces its failure)."""

    def __init__(self, runner: LineRunner | None = None, binary: str = "virt-sysprep") -> None:
        self.runner = runner or run_streaming
        self.binary = binary
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
            and "force_tcg" not in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")
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


_TCG_ENV = ("env", "LIBGUESTFS_BACKEND=direct", "LIBGUESTFS_BACKEND_SETTINGS=force_tcg")


def _appliance_failed(lines: Sequence[str]) -> bool:
    return any("guestfs_launch failed" in line for line in lines)


def require_local(hv: Hypervisor) -> None:
    """virtdeck reads, writes and chmods the image files itself: the hypervisor must be here."""
    if not hv.local:
        raise InvalidInputError(
            f"templates and clones need the images on this machine; {hv.uri} is remote "
            "(run virtdeck on that host)"
        )


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# -- images and backing chains --------------------------------------------------------------


def own_images(disks: Iterable[DiskInfo]) -> list[DiskInfo]:
    """The writable disk images a domain owns (CD-ROMs and read-only disks are shared media)."""
    return [d for d in disks if d.device == "disk" and d.path and not d.readonly]


def backing_files(path: str, qemu: QemuImg, xml_backing: str | None = None) -> tuple[str, ...]:
    """Real paths of the files under `path` in its backing chain, nearest first.

    Read from the image itself (qemu-img info --backing-chain); when it cannot be read (missing
    file, missing backing file) fall back to the first level, then to libvirt's <backingStore>.
    """
    try:
        chain = qemu.info(path, backing_chain=True)
        return tuple(os.path.realpath(layer["filename"]) for layer in chain[1:])
    except (VirtdeckError, ValueError, KeyError, TypeError):
        pass
    try:
        info = qemu.info(path)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing:
            return (os.path.realpath(backing),)
    except (VirtdeckError, ValueError):
        pass
    return (os.path.realpath(xml_backing),) if xml_backing else ()


@dataclass(frozen=True)
class ImageUser:
    """A domain (or an undefined template's backup) that reads an image."""

    name: str
    image: str  # the image it reads (real path)
    how: str  # "backing" (a thin clone of it) or "disk" (uses the very file)
    defined: bool = True

    def __str__(self) -> str:
        return self.name if self.defined else f"{self.name} (undefined template)"


def image_users(
    hv: Hypervisor,
    images: Iterable[str],
    *,
    exclude: str | None = None,
    backup_dir: Path | None = None,
    qemu: QemuImg | None = None,
) -> list[ImageUser]:
    """Every domain other than `exclude` (name) whose disks are, or build on, one of `images`."""
    qemu = qemu or QemuImg()
    wanted = {os.path.realpath(p) for p in images}
    if not wanted:
        return []
    users: list[ImageUser] = []
    seen: set[tuple[str, str]] = set()
    # Fresh XML, not the inventory cache: a clone defined a moment ago by another client
    # must count.
    candidates: list[tuple[str, bool, tuple[DiskInfo, ...]]] = []
    try:
        for dom in hv.conn.listAllDomains(0):
            name = dom.name()
            if name == exclude:
                continue
            try:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined since the list call
                raise
            candidates.append((name, True, domxml.disks(domxml.parse(xml))))
    except libvirt.libvirtError as err:
        raise OperationError(f"listing domains: {libvirt_message(err)}") from None
    defined_names = {name for name, _, _ in candidates} | ({exclude} if exclude else set())
    for backup in backup_templates(backup_dir):
        if backup.name not in defined_names:
            candidates.append((backup.name, False, domxml.disks(backup.root)))
    for name, defined, disks in candidates:
        for disk in disks:
            if disk.device != "disk" or not disk.path:
                continue
            top = os.path.realpath(disk.path)
            hits = []
            if top in wanted:
                hits.append((top, "disk"))
            for base in backing_files(disk.path, qemu, disk.backing_path):
                if base in wanted:
                    hits.append((base, "backing"))
            for image, how in hits:
                if (name, image) not in seen:
                    seen.add((name, image))
                    users.append(ImageUser(name, image, how, defined))
    return users


# -- the templates of a hypervisor -----------------------------------------------------------


@dataclass(frozen=True)
class BaseImage:
    path: str
    format: str | None
    target: str
    virtual_bytes: int | None
    actual_bytes: int | None
    read_only: bool


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

    @property
    def virtual_bytes(self) -> int:
        return sum(b.virtual_bytes or 0 for b in self.base_images)

    @property
    def actual_bytes(self) -> int:
        return sum(b.actual_bytes or 0 for b in self.base_images)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sealed_operations"] = list(self.sealed_operations)
        data["thin_clones"] = list(self.thin_clones)
        data["full_clones"] = list(self.full_clones)
        return data


@dataclass(frozen=True)
class BackupTemplate:
    name: str
    path: Path
    root: Any  # ET.Element of the backed-up domain XML


def backup_templates(backup_dir: Path | None = None) -> list[BackupTemplate]:
    """The template XML backups in the backup directory (defined or not)."""
    directory = Path(backup_dir) if backup_dir is not None else template_backup_dir()
    out = []
    for path in sorted(directory.glob("*.xml")):
        try:
            root = domxml.parse(path.read_text())
        except (OSError, domxml.ET.ParseError):
            continue
        name = root.findtext("name")
        if name and domxml.read_meta(root).role == "template":
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
    for backup in backup_templates(backup_dir):
        if backup.name == name:
            return domxml.to_string(backup.root), False
    raise NotFoundError(
        f"no template named '{name}' on {hv.uri} or in "
        f"{backup_dir or template_backup_dir()} ('virtdeck template ls' lists them)"
    )


def _base_image(disk: DiskInfo, qemu: QemuImg) -> BaseImage:
    assert disk.path is not None
    virtual = actual = None
    try:
        info = qemu.info(disk.path)
        virtual = info.get("virtual-size")
        actual = info.get("actual-size")
    except (VirtdeckError, ValueError):
        pass
    try:
        read_only = not os.stat(disk.path).st_mode & 0o222
    except OSError:
        read_only = False
    return BaseImage(disk.path, disk.format, disk.target, virtual, actual, read_only)


def list_templates(
    hv: Hypervisor,
    backup_dir: Path | None = None,
    *,
    include_backups: bool = True,
    qemu: QemuImg | None = None,
    domains: list[DomainInfo] | None = None,
) -> list[Template]:
    """Defined templates, plus undefined ones from their XML backups, with their clones.

    A thin clone is a domain whose metadata names the template with mode "thin", or any domain
    whose backing chain reaches one of its base images (clones made by hand count too).
    """
    qemu = qemu or QemuImg()
    domains = hv.domains() if domains is None else domains
    found: list[tuple[str, bool, str | None, VirtdeckMeta, tuple[DiskInfo, ...]]] = []
    names = {d.name for d in domains}
    for d in domains:
        if d.is_template:
            found.append((d.name, True, d.meta.xml_backup, d.meta, d.disks))
    if include_backups:
        for backup in backup_templates(backup_dir):
            if backup.name not in names:
                meta = domxml.read_meta(backup.root)
                found.append(
                    (backup.name, False, str(backup.path), meta, domxml.disks(backup.root))
                )
    # One backing-chain read per disk of every other domain, shared by all templates.
    chains: dict[str, set[str]] = {}
    for d in domains:
        if d.is_template:
            continue
        bases: set[str] = set()
        for disk in own_images(d.disks):
            assert disk.path is not None
            bases.update(backing_files(disk.path, qemu, disk.backing_path))
        chains[d.name] = bases
    out = []
    for name, defined, backup_path, meta, disks in found:
        images = tuple(_base_image(disk, qemu) for disk in own_images(disks))
        paths = {os.path.realpath(b.path) for b in images}
        thin, full = [], []
        for d in domains:
            if d.is_template:
                continue
            if chains.get(d.name, set()) & paths or (
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
            )
        )
    out.sort(key=lambda t: t.name)
    return out


def get_template(
    hv: Hypervisor, name: str, backup_dir: Path | None = None, qemu: QemuImg | None = None
) -> Template:
    for t in list_templates(hv, backup_dir, qemu=qemu):
        if t.name == name:
            return t
    raise NotFoundError(f"no template named '{name}' ('virtdeck template ls' lists them)")


# -- making a template -----------------------------------------------------------------------


@dataclass(frozen=True)
class TemplatePlan:
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
    require_local(hv)
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
    images = []
    for disk in own_images(info.disks):
        assert disk.path is not None
        if not os.path.isfile(disk.path):
            raise NotFoundError(
                f"disk {disk.target} of '{vm}' is not a file virtdeck can read: {disk.path}"
            )
        images.append((disk.path, disk.format))
    for disk in info.disks:
        if disk.device == "disk" and not disk.path:
            raise InvalidInputError(
                f"disk {disk.target} of '{vm}' is not a local file; virtdeck templates need "
                "file-backed disks"
            )
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
        known = (sysprep or Sysprep()).operations()
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
        return int(hv.lookup(vm).snapshotNum(0))
    except libvirt.libvirtError:
        return 0  # a driver without snapshots has none to block the rename


def _shut_down(hv: Hypervisor, plan: TemplatePlan, progress: Progress) -> None:
    state = hv.domain(plan.vm).state
    if not state.active:
        return
    if state == DomainState.RUNNING:
        progress(f"shutting '{plan.vm}' down", None)
        with contextlib.suppress(StateError):
            hv.shutdown(plan.vm)
        if hv.wait_for_state(plan.vm, [DomainState.SHUTOFF], plan.shutdown_timeout):
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
    if not hv.wait_for_state(plan.vm, [DomainState.SHUTOFF], 30):
        raise StateError(f"'{plan.vm}' did not power off; nothing was changed")


def _libvirt(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except libvirt.libvirtError as err:
        raise OperationError(f"{what}: {libvirt_message(err)}") from None


def undefine_domain(dom: Any, *, keep_nvram: bool) -> None:
    """Undefine, keeping (template) or removing (clone) its NVRAM and TPM state.

    The flags are newer than the call: KEEP_TPM needs libvirt 8.9, and some drivers reject the
    NVRAM flags, so each rejected set falls back to a smaller one (a domain without NVRAM or
    TPM never needs them).
    """
    managed = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    if keep_nvram:
        flags = [libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | managed]
        keep_tpm = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0)
        if keep_tpm:
            flags.insert(0, flags[0] | keep_tpm)
    else:
        flags = [libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | managed]
    rejected = (
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    )
    for flag in flags:
        try:
            dom.undefineFlags(flag)
            return
        except libvirt.libvirtError as err:
            if err.get_error_code() not in rejected:
                raise
    dom.undefine()


def _rename(hv: Hypervisor, dom: Any, old: str, new: str) -> Any:
    """Rename a shut-off domain; returns the (possibly new) virDomain handle.

    virDomainRename exists since libvirt 1.2.19, but not every driver implements it; the
    fallback undefines the old definition and defines the same XML (same UUID) under the new
    name, restoring the old one if that define fails.
    """
    try:
        dom.rename(new, 0)
        return hv.conn.lookupByName(new)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise OperationError(f"renaming '{old}' to '{new}': {libvirt_message(err)}") from None
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    root = domxml.parse(xml)
    name_elem = root.find("name")
    assert name_elem is not None
    name_elem.text = new
    _libvirt(f"renaming '{old}'", lambda: undefine_domain(dom, keep_nvram=True))
    try:
        return _libvirt(f"renaming '{old}' to '{new}'", hv.conn.defineXML, domxml.to_string(root))
    except BaseException:
        hv.conn.defineXML(xml)
        raise


def execute_template(
    hv: Hypervisor,
    plan: TemplatePlan,
    progress: Progress = no_progress,
    *,
    sysprep: Sysprep | None = None,
    qemu: QemuImg | None = None,
) -> Template:
    """Do what the plan says; on a failure after sealing, undo the rename, metadata, backup,
    file modes and undefine (the sealing itself cannot be undone, and the VM stays shut off)."""
    dom = hv.lookup(plan.vm)
    if dom.UUIDString() != plan.uuid:
        raise StateError(f"'{plan.vm}' changed since the plan was made; plan again")
    if plan.name != plan.vm and hv.exists(plan.name):
        raise InvalidInputError(f"a domain named '{plan.name}' already exists; choose --name")
    if os.path.exists(plan.backup_path):
        raise InvalidInputError(f"{plan.backup_path} already exists; choose another --name")
    _shut_down(hv, plan, progress)
    if plan.seal:
        progress(f"sealing '{plan.vm}' with virt-sysprep", None)
        (sysprep or Sysprep()).seal(
            uri=hv.uri,
            domain=plan.vm if hv.uri.startswith("qemu") else None,
            images=plan.images,
            operations=plan.operations if plan.chosen_operations else None,
            progress=progress,
        )
    orig_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    modes = {path: os.stat(path).st_mode for path, _ in plan.images}
    renamed = wrote_backup = undefined = False
    chmodded: list[str] = []
    try:
        if plan.name != plan.vm:
            progress(f"renaming '{plan.vm}' to '{plan.name}'", None)
            dom = _rename(hv, dom, plan.vm, plan.name)
            renamed = True
        meta = VirtdeckMeta(
            role="template",
            created=now_iso(),
            source=plan.vm,
            operations=plan.operations if plan.seal else (),
            sealed=plan.seal,
            xml_backup=plan.backup_path,
        )
        _libvirt(
            f"recording template metadata on '{plan.name}'",
            dom.setMetadata,
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            domxml.meta_xml(meta),
            domxml.PREFIX,
            domxml.NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
        progress(f"backing up the XML to {plan.backup_path}", None)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        try:
            os.makedirs(plan.backup_dir, exist_ok=True)
            # 0600: the XML is dumped with VIR_DOMAIN_XML_SECURE (VNC/SPICE passwords).
            fd = os.open(plan.backup_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            wrote_backup = True
            with os.fdopen(fd, "w") as fh:
                fh.write(xml)
        except OSError as err:
            raise OperationError(
                f"cannot write the XML backup {plan.backup_path}: {err.strerror}"
            ) from None
        for path, _ in plan.images:
            chmodded.append(path)
            os.chmod(path, READ_ONLY)
        if plan.undefine:
            progress(f"undefining '{plan.name}' (XML kept in {plan.backup_path})", None)
            _libvirt(f"undefining '{plan.name}'", lambda: undefine_domain(dom, keep_nvram=True))
            undefined = True
    except BaseException:
        _undo_template(hv, plan, orig_xml, modes, chmodded, renamed, wrote_backup, undefined)
        raise
    finally:
        hv.invalidate(plan.uuid)
    progress(f"'{plan.name}' is a template", 1.0)
    return get_template(hv, plan.name, Path(plan.backup_dir), qemu)


def _undo_template(
    hv: Hypervisor,
    plan: TemplatePlan,
    orig_xml: str,
    modes: dict[str, int],
    chmodded: list[str],
    renamed: bool,
    wrote_backup: bool,
    undefined: bool,
) -> None:
    conn = hv.conn
    with contextlib.suppress(libvirt.libvirtError, VirtdeckError):
        if renamed and not undefined:
            _rename(hv, conn.lookupByName(plan.name), plan.name, plan.vm)
    with contextlib.suppress(libvirt.libvirtError, VirtdeckError):
        conn.defineXML(orig_xml)  # original name, no virtdeck metadata
    for path in chmodded:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(modes[path]))
    if wrote_backup:
        with contextlib.suppress(OSError):
            os.unlink(plan.backup_path)
