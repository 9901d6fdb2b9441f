"""A small real Debian guest for the tests that need an OS that boots (addresses, console).

Built once per machine with mmdebstrap (bookworm, systemd, openssh-server, qemu-guest-agent,
DHCP on the first NIC by systemd-networkd) into an ext4 filesystem image made without a loop
device (`mkfs.ext4 -d`), compressed to qcow2, with the image's own kernel and initrd copied
out for a direct kernel boot (no bootloader). About 2.5 min and ~220 MB; cached under
/var/cache/virtdeck-test/guest-<RECIPE>/ (built in a temporary directory beside it and renamed
when complete, so an interrupted build is never taken for a cached one; a new RECIPE builds
beside the old cache, which runs of older branches go on using).

It is what an operator's installed and booted Debian 12 holds, nothing more: SSH host keys
from openssh-server's postinst, a machine-id (MACHINE_ID) with /var/lib/dbus/machine-id linked
to it, a systemd random seed. No unit of its own recreates removed host keys (Debian's sshd
does not; Fedora's sshd-keygen does): a sealed clone's sshd starts only thanks to what
virtdeck's sealing installs, so the tests see what operators see.

Tests never write to the cached image: each domain gets a qcow2 overlay in its lab directory.
The domain is TCG (`type='qemu'`, a Linux kernel does not boot under this machine's nested
/dev/kvm), user-mode networking (the guest gets 10.0.2.15 from QEMU's own DHCP; no packet
leaves QEMU), a serial console on ttyS0 and the guest agent channel.

    python -m tests.guest            # build the cached image now (no-op when it is there)
    python -m tests.guest cloud      # the same for the cloud image (cloud-init, boots alone)
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE = 2  # bump when the image changes: a new cache directory, the old one stays usable
CACHE = Path(os.environ.get("VIRTDECK_GUEST_CACHE", f"/var/cache/virtdeck-test/guest-{RECIPE}"))
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "openssh-server",
    "qemu-guest-agent",
    "linux-image-amd64",
    "udev",
    "dbus",
)
HOSTNAME = "vdguest"
MACHINE_ID = "5eed0ddba11c0ffee0ddf00d1dea5000"  # the installed system's (systemd wrote it)
DISK_SIZE = "2G"
# Every test kernel's arguments after root=. no_timer_check: early in boot Linux checks that the
# timer interrupt ticks (check_timer: a few busy-waited jiffies); a TCG vCPU starved of host CPU
# can miss them, and the kernel panics ("IO-APIC + timer doesn't work!") and spins there, the
# agent never answering. Seen in a loaded whole run: one of three sealed clones booting at once,
# found in its memory dump. The known cure for TCG guests (cirros, lima, nova): trust the timer.
KERNEL_ARGS = "rw console=ttyS0 net.ifnames=0 quiet no_timer_check"

_NETWORK = """[Match]
Name=eth0 en*

[Network]
DHCP=yes
"""


@dataclass(frozen=True)
class GuestImage:
    """The cached image: a compressed qcow2 root filesystem, its kernel and its initrd."""

    disk: Path
    kernel: Path
    initrd: Path

    @classmethod
    def at(cls, root: Path) -> GuestImage:
        return cls(root / "root.qcow2", root / "vmlinuz", root / "initrd.img")

    def complete(self) -> bool:
        return all(
            p.is_file() and p.stat().st_size > 0 for p in (self.disk, self.kernel, self.initrd)
        )


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(
            f"building the test guest failed: {args[0]} exited {done.returncode} "
            f"(log {log}): {' | '.join(tail)}"
        )


def _customize(rootfs: Path) -> None:
    (rootfs / "etc/hostname").write_text(HOSTNAME + "\n")
    (rootfs / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    net = rootfs / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "20-dhcp.network").write_text(_NETWORK)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "systemd-networkd.service"
    if not link.exists():
        link.symlink_to("/lib/systemd/system/systemd-networkd.service")
    # What a booted system has: a machine-id (mmdebstrap leaves the file empty), dbus's link
    # to it (Debian's dbus postinst makes one), a random seed systemd-random-seed saved.
    (rootfs / "etc/machine-id").write_text(MACHINE_ID + "\n")
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    if not dbus_id.is_symlink():
        dbus_id.unlink(missing_ok=True)
        dbus_id.symlink_to("/etc/machine-id")
    seed = rootfs / "var/lib/systemd/random-seed"
    seed.parent.mkdir(parents=True, exist_ok=True)
    seed.write_bytes(os.urandom(512))
    seed.chmod(0o600)
    # Root logs in on the serial console without a password (sshd refuses empty ones).
    shadow = rootfs / "etc/shadow"
    lines = shadow.read_text().splitlines()
    shadow.write_text(
        "\n".join(
            "root::" + line.split(":", 2)[2] if line.startswith("root:") else line for line in lines
        )
        + "\n"
    )


def build(dest: Path = CACHE, log: Path | None = None) -> GuestImage:
    """Build the image into a temporary directory beside `dest`, then rename it into place."""
    image = GuestImage.at(dest)
    if image.complete():
        return image
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = (dest.parent / f".{dest.name}.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it right now
    try:
        if image.complete():
            return image
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-build-", dir=dest.parent))
        try:
            log = log or work / "build.log"
            rootfs = work / "rootfs"
            _run(
                [
                    "mmdebstrap",
                    "--variant=apt",
                    '--aptopt=APT::Install-Recommends "false"',
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "--include=" + ",".join(PACKAGES),
                    SUITE,
                    str(rootfs),
                ],
                log,
            )
            _customize(rootfs)
            boot = rootfs / "boot"
            kernel = max(boot.glob("vmlinuz-*"))
            initrd = max(boot.glob("initrd.img-*"))
            out = GuestImage.at(work)
            shutil.copyfile(kernel, out.kernel)
            shutil.copyfile(initrd, out.initrd)
            raw = work / "root.raw"
            _run(["mkfs.ext4", "-q", "-L", "root", "-d", str(rootfs), str(raw), DISK_SIZE], log)
            _run(
                ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(out.disk)],
                log,
            )
            raw.unlink()
            shutil.rmtree(rootfs)
            for p in (out.disk, out.kernel, out.initrd):
                p.chmod(0o444)  # QEMU (libvirt-qemu) reads them; nobody writes them
            work.chmod(0o755)
            if dest.exists():
                shutil.rmtree(dest)  # an incomplete leftover
            work.rename(dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return GuestImage.at(dest)


# -- a cloud image: cloud-init and a disk that boots on its own --------------------------------
#
# What the distributions publish as "genericcloud" images, in small: cloud-init (NoCloud first,
# so first boot does not probe for metadata servers under TCG), qemu-guest-agent, an empty
# machine-id and no SSH host keys (cloud-init makes both per instance), and a disk a BIOS boots
# without a <kernel>: an MBR (syslinux's), a FAT partition with the kernel, the initrd and
# syslinux, and the ext4 root. `virtdeck template import` takes it as an operator takes
# Debian's genericcloud qcow2. Cached beside the plain guest in guest-cloud-<CLOUD_RECIPE>/.

CLOUD_RECIPE = 4  # 4: no_timer_check on the kernel's command line
CLOUD_CACHE = Path(
    os.environ.get(
        "VIRTDECK_CLOUD_GUEST_CACHE", f"/var/cache/virtdeck-test/guest-cloud-{CLOUD_RECIPE}"
    )
)
CLOUD_PACKAGES = (*PACKAGES, "cloud-init", "e2fsprogs")  # e2fsprogs: resizefs at first boot
_MBR = Path("/usr/lib/SYSLINUX/mbr.bin")
_BOOT_START, _BOOT_SECTORS = 2048, 262144  # 1 MiB, 128 MiB
_ROOT_START = _BOOT_START + _BOOT_SECTORS
_SYSLINUX_CFG = f"""DEFAULT linux
TIMEOUT 0
LABEL linux
  LINUX vmlinuz
  INITRD initrd.img
  APPEND root=/dev/vda2 {KERNEL_ARGS}
"""
_CLOUD_CFG = """datasource_list: [NoCloud, None]
"""


def cloud_disk(root: Path = CLOUD_CACHE) -> Path:
    return root / "cloud.qcow2"


def _customize_cloud(rootfs: Path) -> None:
    _customize(rootfs)
    (rootfs / "etc/fstab").write_text("/dev/vda2 / ext4 defaults,errors=remount-ro 0 1\n")
    (rootfs / "etc/machine-id").write_text("")  # systemd makes one per instance
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init makes them per instance
    (rootfs / "etc/cloud/cloud.cfg.d/90-virtdeck-test.cfg").write_text(_CLOUD_CFG)
    for old in ("var/lib/cloud",):
        shutil.rmtree(rootfs / old, ignore_errors=True)


def build_cloud(dest: Path = CLOUD_CACHE) -> Path:
    """Build the cloud image (`cloud_disk(dest)`) in a temporary directory beside `dest`,
    then rename it into place; a no-op when it is there."""
    disk = cloud_disk(dest)
    if disk.is_file() and disk.stat().st_size > 0:
        return disk
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = (dest.parent / f".{dest.name}.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if disk.is_file() and disk.stat().st_size > 0:
            return disk
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-build-", dir=dest.parent))
        try:
            log = work / "build.log"
            rootfs = work / "rootfs"
            _run(
                [
                    "mmdebstrap",
                    "--variant=apt",
                    '--aptopt=APT::Install-Recommends "false"',
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "--include=" + ",".join(CLOUD_PACKAGES),
                    SUITE,
                    str(rootfs),
                ],
                log,
            )
            _customize_cloud(rootfs)
            boot = work / "boot.fat"
            _run(["mkfs.vfat", "-C", "-n", "BOOT", str(boot), str(_BOOT_SECTORS // 2)], log)
            (work / "syslinux.cfg").write_text(_SYSLINUX_CFG)
            shutil.copyfile(max((rootfs / "boot").glob("vmlinuz-*")), work / "vmlinuz")
            shutil.copyfile(max((rootfs / "boot").glob("initrd.img-*")), work / "initrd.img")
            for name in ("vmlinuz", "initrd.img", "syslinux.cfg"):
                _run(["mcopy", "-i", str(boot), str(work / name), f"::{name}"], log)
            _run(["syslinux", "--install", str(boot)], log)
            raw = work / "disk.raw"
            with raw.open("wb") as f:
                f.truncate(2 * 1024**3)
            table = f"start={_BOOT_START}, size={_BOOT_SECTORS}, type=6, bootable\n"
            table += f"start={_ROOT_START}, type=83\n"
            with log.open("a") as out:
                subprocess.run(
                    ["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)],
                    input=table.encode(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=True,
                )
            root_bytes = 2 * 1024**3 - _ROOT_START * 512
            ext4 = work / "root.ext4"
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-L",
                    "root",
                    "-d",
                    str(rootfs),
                    str(ext4),
                    f"{root_bytes // 1024}k",
                ],
                log,
            )
            with raw.open("r+b") as f:
                f.write(_MBR.read_bytes()[:440])
                f.seek(_BOOT_START * 512)
                f.write(boot.read_bytes())
            _run(
                [
                    "dd", f"if={ext4}", f"of={raw}", "bs=1M", "conv=notrunc,sparse",
                    f"seek={_ROOT_START * 512}", "oflag=seek_bytes", "status=none",
                ],
                log,
            )  # fmt: skip
            out_disk = cloud_disk(work)
            _run(
                ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(out_disk)],
                log,
            )
            for leftover in (raw, ext4, boot, work / "vmlinuz", work / "initrd.img"):
                leftover.unlink()
            (work / "syslinux.cfg").unlink()
            shutil.rmtree(rootfs)
            out_disk.chmod(0o444)
            work.chmod(0o755)
            if dest.exists():
                shutil.rmtree(dest)
            work.rename(dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return cloud_disk(dest)


def domain_xml(
    name: str,
    image: GuestImage,
    overlay: str,
    *,
    mac: str = "52:54:00:d1:5c:01",
    memory_mib: int = 512,
) -> str:
    """A TCG domain booting the guest's kernel directly, on a qcow2 overlay of the image."""
    return (
        f"<domain type='qemu'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{image.kernel}</kernel><initrd>{image.initrd}</initrd>"
        f"<cmdline>root=/dev/vda {KERNEL_ARGS}</cmdline></os>"
        "<features><acpi/></features>"
        "<devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{overlay}'/><target dev='vda' bus='virtio'/></disk>"
        f"<interface type='user'><mac address='{mac}'/><model type='virtio'/>"
        "</interface>"
        "<serial type='pty'><target port='0'/></serial>"
        "<console type='pty'><target type='serial' port='0'/></console>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
        "</devices></domain>"
    )


def cloud_domain_xml(
    name: str,
    overlay: str,
    *,
    seed: str | None = None,
    mac: str = "52:54:00:d1:5c:02",
    memory_mib: int = 512,
) -> str:
    """A TCG domain booting the cloud image from its own disk (BIOS, syslinux), with a
    NoCloud seed as a read-only IDE CD-ROM when given."""
    cdrom = (
        ""
        if seed is None
        else "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
        f"<source file='{seed}'/><target dev='hdc' bus='ide'/><readonly/></disk>"
    )
    return (
        f"<domain type='qemu'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
        "<features><acpi/></features>"
        "<devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{overlay}'/><target dev='vda' bus='virtio'/></disk>{cdrom}"
        f"<interface type='user'><mac address='{mac}'/><model type='virtio'/>"
        "</interface>"
        "<serial type='pty'><target port='0'/></serial>"
        "<console type='pty'><target type='serial' port='0'/></console>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        "</devices></domain>"
    )


# How long a TCG boot may take before a test gives up on it: a failure detector, not a speed
# check. The guest reaches its agent in ~25 s on an idle machine; beside six busy loops each in
# a session of its own it took 120 s (the scheduler's autogroups give every session an equal
# share, so QEMU gets a seventh of the two cores), and guests booting together share even that.
BOOT_DEADLINE = 900.0


def agent_run(dom: Any, command: str, *, timeout: float = 120.0) -> tuple[int, str]:
    """Run a shell command in the booted guest through its agent (guest-exec, then
    guest-exec-status until it exits); (exit status, stdout). Waits for the agent to answer
    first; fails loudly after `timeout` seconds."""
    import libvirt
    import libvirt_qemu

    deadline = time.monotonic() + timeout

    def agent(cmd: dict[str, Any]) -> Any:
        while True:
            try:
                reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 10, 0)
                return json.loads(reply)["return"]
            except libvirt.libvirtError as err:
                if time.monotonic() > deadline:
                    raise AssertionError(f"guest agent of {dom.name()}: {err}") from None
                time.sleep(1)  # not connected yet (booting)

    started = agent(
        {
            "execute": "guest-exec",
            "arguments": {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True},
        }
    )
    while True:
        status = agent({"execute": "guest-exec-status", "arguments": {"pid": started["pid"]}})
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            return status.get("exitcode", -1), out
        if time.monotonic() > deadline:
            raise AssertionError(f"{command!r} in {dom.name()} still runs after {timeout:g} s")
        time.sleep(0.5)


if __name__ == "__main__":
    if sys.argv[1:] == ["cloud"]:
        print(build_cloud(), file=sys.stdout)
    else:
        img = build()
        print(img.disk, img.kernel, img.initrd, file=sys.stdout)
