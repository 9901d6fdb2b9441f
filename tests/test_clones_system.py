"""Clones that are independent domains, on the real libvirtd (qemu:///system).

A template whose XML has a serial console logging to a file, a unix channel socket with an
explicit path, UEFI firmware (Debian's `ovmf`) with an NVRAM file holding a marker, a VNC
display on a fixed port and a TPM emulator (`swtpm`): three thin and two full clones, all
started, must run at the same time, each with its own log file, socket, NVRAM copy, VNC port
and TPM state, and the template's files must stay as they were.

The domains run under TCG (type 'qemu'): OVMF stops at an emulation failure under this host's
nested PVM KVM (QEMU pauses the vCPU), while TCG runs the firmware for real. 128 MiB each.
Everything is named with the lab prefix and removed by the `lab` fixture, even on failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.lab import SystemLab
from tui.cli import main
from tui.core import domxml
from tui.core.clones import execute_clone, plan_clone
from tui.core.errors import OperationError
from tui.core.storage.qemuimg import QemuImg, run_subprocess
from tui.core.templates import execute_template, plan_template

pytestmark = pytest.mark.system

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")
MARKER = b"virtdeck template boot entry marker"
VNC_PORT = 5977


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def uefi_template(lab: SystemLab) -> tuple[str, dict[str, Path]]:
    """A UEFI VM with a log file, a socket, NVRAM (marker written in), fixed VNC port and a TPM
    emulator, made into an unsealed template; (its name, its files by role)."""
    for tool in (OVMF_CODE, OVMF_VARS, shutil.which("swtpm") or "/usr/bin/swtpm"):
        assert os.path.exists(tool), f"{tool} is missing: run scripts/host-setup.sh"
    vm = lab.name("uefi")
    files = {
        "disk": Path(lab.disk("uefi.qcow2")),
        "nvram": NVRAM_DIR / f"{vm}_VARS.fd",
        "log": lab.dir / "logs" / f"{vm}-serial.log",
        "socket": lab.dir / "run" / f"{vm}.agent",
    }
    files["log"].parent.mkdir()
    files["socket"].parent.mkdir()
    files["log"].write_text("the template's own console log\n")
    vars_ = bytearray(Path(OVMF_VARS).read_bytes())
    vars_[-len(MARKER) :] = MARKER  # in the flash's spare area, past the variable store
    files["nvram"].write_bytes(bytes(vars_))
    os.chmod(files["nvram"], 0o600)
    xml = f"""
    <domain type='qemu'>
      <name>{vm}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os>
        <type arch='x86_64' machine='q35'>hvm</type>
        <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
        <nvram template='{OVMF_VARS}'>{files["nvram"]}</nvram>
      </os>
      <features><acpi/></features>
      <devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='{files["disk"]}'/><target dev='vda' bus='virtio'/></disk>
        <interface type='user'><model type='virtio'/></interface>
        <serial type='pty'><log file='{files["log"]}' append='on'/><target port='0'/></serial>
        <console type='pty'><target type='serial' port='0'/></console>
        <channel type='unix'><source mode='bind' path='{files["socket"]}'/>
          <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        <graphics type='vnc' port='{VNC_PORT}' autoport='no' listen='127.0.0.1'/>
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
      </devices>
    </domain>"""
    lab.hv.conn.defineXML(xml)
    plan = plan_template(
        lab.hv, vm, name=lab.name("tuefi"), seal=False, backup_dir=lab.dir / "backups"
    )
    return execute_template(lab.hv, plan).name, files


def swtpm_logs(lab: SystemLab) -> str:
    """The clones' swtpm logs (the lab's clean-up removes them): why a TPM did not start."""
    logs = sorted(Path("/var/log/swtpm/libvirt/qemu").glob(f"{lab.prefix}-*-swtpm.log"))
    return "\n".join(f"{p}:\n{p.read_text(errors='replace')}" for p in logs)


def live(lab: SystemLab, name: str) -> object:
    return domxml.parse(lab.hv.conn.lookupByName(name).XMLDesc(0))


@pytest.fixture
def lab(host_lab: SystemLab) -> SystemLab:
    """The host's daemon only: UEFI firmware, NVRAM files and swtpm state live in the daemon's
    own /usr/share and /var/lib/libvirt, which the chrooted daemon does not share with the host
    (it shares only the image directories)."""
    return host_lab


def test_thin_and_full_uefi_clones_run_together_with_their_own_resources(
    lab: SystemLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    tname, tfiles = uefi_template(lab)
    template_uuid = lab.hv.conn.lookupByName(tname).UUIDString()
    before = {role: sha256(p) for role, p in tfiles.items() if role != "socket"}
    template_nvram = tfiles["nvram"].read_bytes()
    assert MARKER in template_nvram

    # The firmware of a started clone writes its own variables (that is the point of a
    # copy), so the copies are read the moment the first clone is about to start.
    at_start: dict[str, bytes] = {}
    from tui.cli import stderr_progress

    def progress(message: str, fraction: float | None) -> None:
        if message.startswith("starting '") and not at_start.get(message):
            for path in NVRAM_DIR.glob(f"{lab.prefix}-c*_VARS.fd"):
                at_start.setdefault(path.name, path.read_bytes())
        stderr_progress(message, fraction)

    monkeypatch.setattr("tui.cli.templates.stderr_progress", progress)
    common = ["-c", lab.hv.uri, "clone", tname]
    rc = main([*common, lab.name("cthin"), "--count", "3", "--start", "--allow-unsealed"])
    assert rc == 0, swtpm_logs(lab)
    rc = main([*common, lab.name("cfull"), "--full", "--count", "2", "--start", "--allow-unsealed"])
    assert rc == 0, swtpm_logs(lab)
    clones = [lab.name(f"cthin-{i}") for i in (1, 2, 3)] + [lab.name(f"cfull-{i}") for i in (1, 2)]

    # All five run at the same time.
    states = {n: lab.hv.conn.lookupByName(n).state()[0] for n in clones}
    assert set(states.values()) == {1}, states  # VIR_DOMAIN_RUNNING
    logs, sockets, nvrams, ports, uuids = [], [], [], [], []
    for name in clones:
        root = live(lab, name)
        log = root.find("devices/serial/log").get("file")
        sock = root.find("devices/channel/source").get("path")
        nvram = root.findtext("os/nvram")
        port = int(root.find("devices/graphics").get("port"))
        uuid = root.findtext("uuid")
        assert log == str(lab.dir / "logs" / f"{name}-serial.log") and os.path.isfile(log)
        assert sock == str(lab.dir / "run" / f"{name}.agent")
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert nvram == str(NVRAM_DIR / f"{name}_VARS.fd") and os.path.isfile(nvram)
        assert at_start[f"{name}_VARS.fd"] == template_nvram  # a copy of the template's
        assert (SWTPM_DIR / uuid).is_dir()  # its own, fresh TPM state
        logs.append(log), sockets.append(sock), nvrams.append(nvram)
        ports.append(port), uuids.append(uuid)
    for values in (logs, sockets, nvrams, ports, uuids):
        assert len(set(values)) == len(clones), values
    assert VNC_PORT not in ports or ports.count(VNC_PORT) == 1  # a free port, chosen once
    assert not (SWTPM_DIR / template_uuid).exists()  # the template's TPM was never touched

    # The template's files are as they were; its socket was never made.
    assert {role: sha256(p) for role, p in tfiles.items() if role != "socket"} == before
    assert not tfiles["socket"].exists()


def test_failure_half_way_removes_the_nvram_copies(lab: SystemLab) -> None:
    tname, tfiles = uefi_template(lab)
    before = sha256(tfiles["nvram"])
    calls = 0

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        nonlocal calls
        if "create" in argv:
            calls += 1
            if calls == 2:
                return subprocess.CompletedProcess(list(argv), 1, "", "I/O error")
        return run_subprocess(argv)

    plan = plan_clone(lab.hv, tname, lab.name("half"), count=3, allow_unsealed=True)
    assert len(plan.copies) == 3
    with pytest.raises(OperationError, match="I/O error"):
        execute_clone(lab.hv, plan, qemu=QemuImg(runner=run))
    assert not [c.destination for c in plan.copies if os.path.lexists(c.destination)]
    assert not [n for n in plan.names if lab.hv.exists(n)]
    assert sha256(tfiles["nvram"]) == before and lab.hv.exists(tname)
