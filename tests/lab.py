"""Real domains and images on qemu:///system for integration tests.

Everything a SystemLab makes is named with its unique prefix (`vdt-<pid>-<hex>`) and lives in
one directory under /var/lib/libvirt/images, so cleanup() can remove all of it even after a
failure, and sweep_stale() can remove what a killed run left behind without touching the
domains of a run still going on.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from tui.core.hypervisor import Hypervisor

IMAGES = Path("/var/lib/libvirt/images")
# Per-domain files libvirt keeps elsewhere, named after the domain (UEFI variables, swtpm log).
DOMAIN_FILES = (Path("/var/lib/libvirt/qemu/nvram"), Path("/var/log/swtpm/libvirt/qemu"))
_PREFIX_RE = re.compile(r"^vdt-(\d+)-[0-9a-f]{6}")


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def domain_xml(
    name: str,
    disks: list[tuple[str, str]],
    *,
    virt_type: str,
    macs: tuple[str, ...] = ("",),
    memory_mib: int = 128,
) -> str:
    """A small bootable-by-BIOS domain; disks are (path, format); an empty MAC lets libvirt pick."""
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, (path, fmt) in enumerate(disks)
    )
    iface_xml = "".join(
        "<interface type='user'>"
        + (f"<mac address='{mac}'/>" if mac else "")
        + "<model type='virtio'/></interface>"
        for mac in macs
    )
    return (
        f"<domain type='{virt_type}'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
        f"<devices>{disk_xml}{iface_xml}<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
        "</devices></domain>"
    )


class SystemLab:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.prefix = f"vdt-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = IMAGES / self.prefix
        self.dir.mkdir(parents=True)
        self.virt_type = hv.virt_type()

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def disk(self, filename: str, size: str = "64M", fmt: str = "qcow2") -> str:
        path = str(self.dir / filename)
        qemu_img("create", "-q", "-f", fmt, path, size)
        return path

    def define(
        self,
        suffix: str,
        disks: list[tuple[str, str]] | None = None,
        macs: tuple[str, ...] = ("",),
    ) -> str:
        """Define a domain `<prefix>-<suffix>` (with a fresh 64 MiB qcow2 disk by default)."""
        name = self.name(suffix)
        if disks is None:
            disks = [(self.disk(f"{suffix}.qcow2"), "qcow2")]
        xml = domain_xml(name, disks, virt_type=self.virt_type, macs=macs)
        self.hv.conn.defineXML(xml)
        return name

    def cleanup(self) -> None:
        remove_prefixed(self.hv.conn, self.prefix)
        remove_pools(self.hv.conn, self.dir)
        remove_tree(self.dir)
        remove_domain_files(self.prefix)


def remove_prefixed(conn: libvirt.virConnect, prefix: str) -> None:
    for dom in conn.listAllDomains(0):
        if not dom.name().startswith(prefix):
            continue
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            for snap in dom.listAllSnapshots(0):
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError:
            pass
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            )


def remove_pools(conn: libvirt.virConnect, directory: Path) -> None:
    """Storage pools virtdeck defined for a lab directory (a remote host's images)."""
    for pool in conn.listAllStoragePools(0):
        with contextlib.suppress(libvirt.libvirtError):
            path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""
            if os.path.normpath(path.strip()) != os.path.normpath(directory):
                continue
            if pool.isActive():
                pool.destroy()
            pool.undefine()


def remove_domain_files(prefix: str) -> None:
    for directory in DOMAIN_FILES:
        for path in directory.glob(f"{prefix}-*"):
            with contextlib.suppress(OSError):
                path.unlink()


def remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for root, dirs, files in os.walk(path):  # read-only template bases
        for entry in dirs + files:
            p = os.path.join(root, entry)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IXUSR * os.path.isdir(p))
    shutil.rmtree(path, ignore_errors=True)


def sweep_stale(conn: libvirt.virConnect) -> None:
    """Remove what earlier, killed test runs left (their pid is gone)."""
    prefixes = {m.group(0) for d in conn.listAllDomains(0) if (m := _PREFIX_RE.match(d.name()))}
    prefixes |= {
        m.group(0)
        for d in (IMAGES, *DOMAIN_FILES)
        for p in d.glob("vdt-*")
        if (m := _PREFIX_RE.match(p.name))
    }
    for prefix in prefixes:
        pid = int(prefix.split("-")[1])
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            remove_prefixed(conn, prefix)
            remove_pools(conn, IMAGES / prefix)
            remove_tree(IMAGES / prefix)
            remove_domain_files(prefix)
