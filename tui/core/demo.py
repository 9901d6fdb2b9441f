"""The demo lab: real qcow2 images served through libvirt's test driver, no hypervisor needed.

`virtdeck --demo` builds it once under the user's cache directory: a sealed template base that
holds real data, two thin clones (overlays backed by it), one full clone (an independent copy)
and a standalone VM, described in a node XML file that `test:///PATH` serves. Rebuilt when
anything is missing; `--demo --reset` starts over.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from tui.core.errors import OperationError
from tui.core.models import VirtdeckMeta
from tui.core.paths import cache_dir
from tui.core.storage.qemuimg import QemuImg
from tui.core.testdriver import DiskSpec, DomainSpec, SnapshotSpec, node_xml

GIB = 1024**3
MIB = 1024**2


def lab_dir() -> Path:
    return cache_dir() / "demo"


def _write(path: Path, fmt: str, offset: int, length: int, pattern: int) -> None:
    """Write real data into an image (guest-visible bytes, so allocation really grows)."""
    argv = ["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(path)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise OperationError("qemu-io is not installed (apt-get install qemu-utils)") from None
    if proc.returncode != 0:
        raise OperationError(f"demo lab: qemu-io failed: {proc.stderr.strip()}")


def _uefi(d: Path, spec: DomainSpec) -> DomainSpec:
    """UEFI firmware with its own variables file, a serial console logging to a file, a guest
    agent socket, a VNC display and a TPM emulator: what a deployed clone must get of its own
    (the template's VNC port is fixed; its clones' are automatic)."""
    name = "web" if spec.name == "template-web" else spec.name
    vnc = "port='5901' autoport='no'" if name == "web" else "autoport='yes'"
    return replace(
        spec,
        os_xml=(
            "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>",
            f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{d}/{name}_VARS.fd</nvram>",
        ),
        devices_xml=(
            f"<serial type='pty'><log file='{d}/{name}-serial.log'/><target port='0'/></serial>",
            f"<channel type='unix'><source mode='bind' path='{d}/{name}.agent'/>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
            f"<graphics type='vnc' {vnc} listen='127.0.0.1'/>",
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
        ),
    )


def _specs(d: Path) -> list[DomainSpec]:
    base = str(d / "template-web.qcow2")
    created = "2026-11-20T09:30:00+00:00"
    ops = ("ssh-hostkeys", "udev-persistent-net", "net-hwaddr", "machine-id", "user-account")

    def clone(name: str, mode: str) -> VirtdeckMeta:
        return VirtdeckMeta(role="clone", source="template-web", mode=mode, created=created)

    specs = [
        DomainSpec(
            "template-web", "shutoff", vcpus=2, memory_mib=2048,
            disks=(DiskSpec(base),),
            macs=("52:54:00:00:0a:01",),
            meta=VirtdeckMeta(role="template", created=created, source="web", operations=ops,
                              sealed=True),
        ),
        DomainSpec(
            "web-1", "running", vcpus=2, memory_mib=2048,
            disks=(DiskSpec(str(d / "web-1.qcow2"), backing=base),),
            macs=("52:54:00:00:0b:01",), meta=clone("web-1", "thin"),
            snapshots=(
                SnapshotSpec("deployed", None, "shutoff", 1_763_634_000, "first boot after deploy"),
                SnapshotSpec("nginx-tuned", "deployed", "running", 1_763_720_400,
                             "worker_connections 4096"),
                SnapshotSpec("before-upgrade", "nginx-tuned", "running", 1_764_151_200,
                             "before apt full-upgrade", current=True),
                SnapshotSpec("php-test", "deployed", "shutoff", 1_763_806_800, "try php-fpm 8.2"),
            ),
        ),
        DomainSpec(
            "web-2", "running", vcpus=2, memory_mib=2048,
            disks=(DiskSpec(str(d / "web-2.qcow2"), backing=base),),
            macs=("52:54:00:00:0b:02",), meta=clone("web-2", "thin"),
        ),
        DomainSpec(
            "web-3", "shutoff", vcpus=2, memory_mib=2048,
            disks=(DiskSpec(str(d / "web-3.qcow2")),),
            macs=("52:54:00:00:0b:03",), meta=clone("web-3", "full"),
        ),
        DomainSpec(
            "db", "paused", vcpus=4, memory_mib=4096,
            disks=(DiskSpec(str(d / "db.raw"), format="raw"),),
            macs=("52:54:00:00:0c:01",),
            snapshots=(
                SnapshotSpec("pre-migration", None, "running", 1_764_000_000,
                             "schema v41, before migrating to v42", current=True),
            ),
        ),
    ]  # fmt: skip
    web = ("template-web", "web-1", "web-2", "web-3")
    return [_uefi(d, s) if s.name in web else s for s in specs]


def _build(d: Path) -> None:
    q = QemuImg()
    base = d / "template-web.qcow2"
    q.create(str(base), "qcow2", GIB)
    _write(base, "qcow2", 0, 48 * MIB, 0x11)  # the "installed system" every clone shares
    for name, data in (("web-1", 6), ("web-2", 14)):
        overlay = d / f"{name}.qcow2"
        q.create_overlay(str(overlay), str(base), "qcow2")
        _write(overlay, "qcow2", 256 * MIB, data * MIB, 0x22)
    q.convert(str(base), str(d / "web-3.qcow2"), src_fmt="qcow2")
    _write(d / "web-3.qcow2", "qcow2", 256 * MIB, 4 * MIB, 0x33)
    q.create(str(d / "db.raw"), "raw", 2 * GIB)
    _write(d / "db.raw", "raw", 0, 24 * MIB, 0x44)
    base.chmod(0o444)  # a template's base is read-only, as virtdeck leaves real ones
    # UEFI variables (flash-sized, erased) for the template and the clones made from it.
    for name in ("web", "web-1", "web-2", "web-3"):
        (d / f"{name}_VARS.fd").write_bytes(b"\xff" * (528 * 1024))


def ensure_lab(reset: bool = False) -> str:
    """Build the lab if needed and return its `test:///...` URI."""
    d = lab_dir()
    node = d / "lab.xml"
    specs = _specs(d)
    wanted = [disk.path for s in specs for disk in s.disks] + [str(d / "web_VARS.fd")]
    if reset or not all(Path(p).exists() for p in wanted):
        # Built in place: overlays record their base's absolute path, so no temporary dir.
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        try:
            _build(d)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
    xml = node_xml(specs)
    if not node.exists() or node.read_text() != xml:  # a newer virtdeck describes it anew
        node.write_text(xml)
    return f"test://{node}"
