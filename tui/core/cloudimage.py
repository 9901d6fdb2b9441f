"""Templates imported from the distributions' cloud images (`virtdeck template import`).

Plan (`plan_import`, nothing written): the name is free (no domain, no file), the source is a
regular file on this machine or an http(s) URL, the checksum (`sha256:HEX`) is well formed,
the target directory is the host's pool (or `--dir`) with room for the image.

Execute (`execute_import`), journalled: the image is copied (or downloaded) into place as a
new file, hashed as it passes; on another host it is uploaded as a pool volume through
libvirt (from a private copy staged here, which is what is checked). Then, before anything uses
it: the checksum must match, and the image must be qcow2 or raw with no backing file and no
external data file (an image from the internet never makes QEMU open another file). Its
format is probed once, here, and pinned in the definition. The VM is defined (virtio disk,
user-mode network unless `--network`, serial console, guest agent channel, 127.0.0.1 VNC)
and made a template as `template create --no-seal` makes one (XML backup, base read-only,
base identity), recorded as sealed: a cloud image is generic, and its clones get their
identity from cloud-init (`identity` in the metadata makes `clone` give seeds by default).
Any failure or interrupt removes the file and the definition.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tui.core import ops, transfer
from tui.core.errors import InvalidInputError, OperationError, UsageError, VirtdeckError
from tui.core.hypervisor import Hypervisor, validate_name
from tui.core.progress import Progress, no_progress
from tui.core.storage import files_for
from tui.core.storage.qemuimg import QemuImg
from tui.core.storage.remote import RemoteFiles

CHUNK = 1 << 20
CLOUD_INIT = "cloud-init"
_SHA256 = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class ImportPlan(ops.PlanDefaults):
    host: str
    name: str
    uuid: str
    source: str  # a file on this machine, or an http(s) URL
    checksum: str | None  # "sha256:<hex>", lower case
    path: str  # where the image goes on the host
    size: int | None  # bytes to copy (None: a URL that did not say)
    bytes_free: int | None
    virt_type: str
    memory_mib: int
    vcpus: int
    network: str | None  # a libvirt network name; None: user-mode networking
    backup_dir: str | None
    notes: tuple[str, ...] = ()

    @property
    def is_url(self) -> bool:
        return _is_url(self.source)

    @property
    def title(self) -> str:
        return f"Import '{self.name}' from {os.path.basename(self.source) or self.source}?"

    @property
    def confirm_label(self) -> str:
        return "Import"

    def run(self, hv: Hypervisor, progress: Progress) -> str:
        execute_import(hv, self, progress)
        return f"imported '{self.name}' from {self.source}"

    def summary(self) -> list[str]:
        size = "size unknown until it is read" if self.size is None else _mib(self.size)
        lines = [
            f"{'download' if self.is_url else 'copy'} {self.source} ({size}) to {self.path} "
            f"on {self.host}",
            f"check its sha256 against {self.checksum}"
            if self.checksum
            else "no --checksum: its sha256 is recorded, not checked",
            "refuse it unless it is qcow2 or raw with no backing file and no external data file",
            f"define '{self.name}' ({self.virt_type}, {self.memory_mib} MiB, {self.vcpus} vCPU, "
            + (f"network '{self.network}'" if self.network else "user-mode network")
            + ", serial console, guest agent channel)",
            "make it a template: its image read-only, its XML backed up; clones get their "
            "identity as cloud-init seeds",
        ]
        if self.bytes_free is not None:
            lines.append(f"free space there: {_mib(self.bytes_free)}")
        lines.extend(self.notes)
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "name": self.name,
            "source": self.source,
            "checksum": self.checksum,
            "path": self.path,
            "size": self.size,
            "bytes_free": self.bytes_free,
            "virt_type": self.virt_type,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "network": self.network,
            "notes": list(self.notes),
        }


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def check_directory(directory: str) -> None:
    """`--dir` is a path on the host: absolute, since there is no working directory there."""
    if not directory.startswith("/"):
        raise UsageError(f"--dir '{directory}' is not an absolute path")


def check_checksum(text: str | None) -> str | None:
    if text is None:
        return None
    m = _SHA256.match(text.strip())
    if not m:
        raise UsageError(f"--checksum {text!r}: give sha256:<64 hex digits>")
    return "sha256:" + m.group(1).lower()


def _url_size(url: str) -> int | None:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (http(s) only)
            length = answer.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except urllib.error.HTTPError as err:
        raise InvalidInputError(f"{url}: the server answered {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise InvalidInputError(f"{url}: cannot reach it ({reason})") from None


def plan_import(
    hv: Hypervisor,
    source: str,
    name: str,
    *,
    directory: str | None = None,
    checksum: str | None = None,
    memory_mib: int = 1024,
    vcpus: int = 1,
    network: str | None = None,
    virt_type: str | None = None,
    backup_dir: str | Path | None = None,
) -> ImportPlan:
    """Check everything; nothing is written."""
    validate_name(name)
    digest = check_checksum(checksum)
    if not 64 <= memory_mib <= 1024 * 1024:
        raise UsageError(f"--memory {memory_mib}: give MiB from 64 to 1048576")
    if not 1 <= vcpus <= 512:
        raise UsageError(f"--vcpus {vcpus}: give 1 to 512")
    if virt_type not in (None, "kvm", "qemu"):
        raise UsageError(f"--virt-type {virt_type!r}: kvm or qemu")
    if hv.exists(name):
        raise InvalidInputError(f"a domain named '{name}' already exists on {hv.uri}")
    if _is_url(source):
        size = _url_size(source)
    elif "://" in source:
        raise UsageError(f"{source}: only a file or an http(s):// URL can be imported")
    else:
        source = os.path.abspath(source)
        if not os.path.isfile(source):
            raise UsageError(f"{source}: no such file")
        size = os.path.getsize(source)
    if network is not None:
        try:
            hv.call(hv.conn.networkLookupByName, network, what=f"network '{network}'")
        except VirtdeckError as err:
            raise InvalidInputError(f"--network {network}: {err}") from None
    files = files_for(hv, "template import")
    if directory is not None:
        check_directory(directory)
        where = os.path.normpath(directory)
        if not files.is_dir(where):
            raise InvalidInputError(f"--dir {where} is not a directory on {hv.uri}")
    else:
        where, _pool = transfer._pool_dir(RemoteFiles(hv, "template import"), None)
    path = os.path.join(where, f"{name}.qcow2")
    if files.lexists(path):
        raise InvalidInputError(f"{path} already exists; choose another --name or --dir")
    free = None
    with contextlib.suppress(VirtdeckError):  # (unknown: said as such in the plan)
        free = files.free_bytes(where)
    if free is not None and size is not None and size > free:
        raise InvalidInputError(
            f"not enough space in {where}: the image is {_mib(size)}, {_mib(free)} is free"
        )
    notes = list(files.pool_notes([path]))
    if virt_type is None:
        virt_type = hv.virt_type()
    return ImportPlan(
        host=hv.uri,
        name=name,
        uuid=str(uuidlib.uuid4()),
        source=source,
        checksum=digest,
        path=path,
        size=size,
        bytes_free=free,
        virt_type=virt_type,
        memory_mib=memory_mib,
        vcpus=vcpus,
        network=network,
        backup_dir=None if backup_dir is None else str(backup_dir),
        notes=tuple(notes),
    )


# -- executing ------------------------------------------------------------------------------


def _chunks(source: str, progress: Progress, size: int | None) -> Iterator[bytes]:
    """The source's bytes, a chunk at a time (a progress report, and so a chance to be
    cancelled, between chunks)."""
    label = f"{'downloading' if _is_url(source) else 'copying'} {os.path.basename(source)}"
    done = 0
    if _is_url(source):
        try:
            answer = urllib.request.urlopen(source, timeout=60)  # noqa: S310 (http(s) only)
        except (urllib.error.URLError, OSError) as err:
            raise OperationError(f"{source}: {getattr(err, 'reason', err)}") from None
        size = size or _int(answer.headers.get("Content-Length"))
        reader: Callable[[int], bytes] = answer.read
        closer = answer.close
    else:
        fh = open(source, "rb")  # noqa: SIM115 (closed below)
        reader, closer = fh.read, fh.close
    try:
        while True:
            try:
                block = reader(CHUNK)
            except OSError as err:
                raise OperationError(f"reading {source}: {err}") from None
            if not block:
                break
            done += len(block)
            progress(label, done / size if size else None)
            yield block
    finally:
        closer()
    if size is not None and done != size:
        raise OperationError(f"{source}: {done} bytes arrived of {size}; nothing was kept")


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _probe(path: str) -> str:
    """The format of the image file `path` of this machine, read once (qemu-img, here: the
    placed file on this host, the staged copy for another host, so the check never depends
    on what a remote host can report); an image that would make QEMU open another file (a
    backing file, an external data file) or is neither qcow2 nor raw is refused."""
    info = QemuImg().info(path)
    fmt = str(info.get("format"))
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    data_file = ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
    if backing:
        raise OperationError(
            f"the image names a backing file ({backing}): refused (an imported image must "
            "stand alone); nothing was kept"
        )
    if data_file:
        raise OperationError(
            f"the image names an external data file ({data_file}): refused; nothing was kept"
        )
    if fmt not in ("qcow2", "raw"):
        raise OperationError(f"the image is {fmt}, not qcow2 or raw: refused; nothing was kept")
    return fmt


def _check(plan: ImportPlan, got: str, path: str) -> str:
    """The checksum, then the image itself: its format."""
    if plan.checksum and got != plan.checksum:
        raise OperationError(
            f"{plan.source}: its sha256 is {got}, not {plan.checksum}; nothing was kept"
        )
    return _probe(path)


def domain_xml(plan: ImportPlan, fmt: str) -> str:
    net = (
        f"<interface type='network'><source network={quoteattr(plan.network)}/>"
        if plan.network
        else "<interface type='user'>"
    )
    return (
        f"<domain type='{plan.virt_type}'><name>{plan.name}</name><uuid>{plan.uuid}</uuid>"
        f"<memory unit='MiB'>{plan.memory_mib}</memory><vcpu>{plan.vcpus}</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
        "<features><acpi/><apic/></features>"
        "<devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file={quoteattr(plan.path)}/><target dev='vda' bus='virtio'/></disk>"
        f"{net}<model type='virtio'/></interface>"
        "<serial type='pty'><target port='0'/></serial>"
        "<console type='pty'><target type='serial' port='0'/></console>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
        "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
        "</devices></domain>"
    )


def execute_import(hv: Hypervisor, plan: ImportPlan, progress: Progress = no_progress) -> str:
    from tui.core import templates

    progress = ops.cancellable(progress)
    files = files_for(hv, "template import")
    if hv.exists(plan.name):
        raise InvalidInputError(f"'{plan.name}' exists on {hv.uri} now; plan again")
    if files.lexists(plan.path):
        raise InvalidInputError(f"{plan.path} appeared meanwhile; plan again")
    title = f"importing '{plan.name}' from {plan.source}"
    sha = hashlib.sha256()
    with ops.running(hv, title, domains=[plan.name], dirs={os.path.dirname(plan.path)}) as undo:
        with undo.step(f"remove {plan.path}", "delete_file", path=plan.path):
            if hv.local:
                _write_local(plan, sha, progress)
                fmt = _check(plan, "sha256:" + sha.hexdigest(), plan.path)
            else:
                fmt = _upload(hv, plan, sha, progress)
        got = "sha256:" + sha.hexdigest()
        undo.push(f"undefine '{plan.name}'", "undefine", uuid=plan.uuid, name=plan.name)
        hv.define(domain_xml(plan, fmt), what=f"defining '{plan.name}'")
        tplan = templates.plan_template(
            hv, plan.name, name=plan.name, seal=False, backup_dir=plan.backup_dir
        )
        templates.execute_template(hv, tplan, progress)
        hv.update_meta(plan.name, f"recording where '{plan.name}' came from", sealed=True,
                       source=plan.source, identity=CLOUD_INIT, imported=got)  # fmt: skip
        undo.commit()
    hv.invalidate()
    progress(f"'{plan.name}' is a template ({got})", 1.0)
    return got


def _write_local(plan: ImportPlan, sha: Any, progress: Progress) -> None:
    fd = os.open(plan.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        for block in _chunks(plan.source, progress, plan.size):
            sha.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def _upload(hv: Hypervisor, plan: ImportPlan, sha: Any, progress: Progress) -> str:
    """Another host: a private copy is staged here (hashed as it is made), checked, and that
    very copy is uploaded as a volume: what was checked is what arrives. Its format."""
    remote = RemoteFiles(hv, "template import")
    with tempfile.TemporaryDirectory(prefix="virtdeck-import-", dir="/var/tmp") as tmp:
        staged = os.path.join(tmp, "image")
        with open(staged, "wb") as out:
            for block in _chunks(plan.source, progress, plan.size):
                sha.update(block)
                out.write(block)
        fmt = _check(plan, "sha256:" + sha.hexdigest(), staged)
        remote.upload(staged, plan.path, progress)
    return fmt
