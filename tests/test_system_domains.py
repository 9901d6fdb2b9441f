"""Issue 2 on the real libvirt daemons: a qcow2-backed domain under KVM (or TCG where /dev/kvm is
missing, as probed), driven through the CLI and the TUI, and an event from virsh reaching the TUI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.lab import SystemLab
from tui.app import VirtdeckApp
from tui.core.hypervisor import Hypervisor
from tui.core.models import DomainState
from tui.modals.confirm import ConfirmScreen
from tui.widgets.domains import DomainsTable

pytestmark = pytest.mark.system


def virtdeck(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui", "-c", uri, *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", uri, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_cli_lists_starts_and_stops_a_real_domain(lab: SystemLab) -> None:
    uri = lab.hv.uri
    name = lab.define("cli")
    listed = json.loads(virtdeck(uri, "ls", "--json").stdout)
    row = next(d for d in listed if d["name"] == name)
    assert row["host"] == uri
    assert row["state"] == "shut off"
    assert row["disks"][0]["format"] == "qcow2"
    assert row["disks"][0]["path"] == str(lab.dir / "cli.qcow2")
    assert len(row["uuid"]) == 36 and row["memory_bytes"] == 128 * 1024**2

    assert virtdeck(uri, "start", name).returncode == 0
    assert virsh(uri, "domstate", name) == "running"
    again = virtdeck(uri, "start", name)
    assert again.returncode == 1
    assert again.stderr.strip() == f"virtdeck: '{name}' is already running"

    # No OS in the guest: ACPI is ignored, the CLI says so and exits 1 after its timeout.
    slow = virtdeck(uri, "shutdown", name, "--timeout", "1")
    assert slow.returncode == 1
    assert f"virtdeck destroy {name}" in slow.stderr
    assert virtdeck(uri, "destroy", name).returncode == 0
    assert virsh(uri, "domstate", name) == "shut off"


def test_cli_unknown_domain_and_unreachable_uri(system_hv: Hypervisor) -> None:
    missing = virtdeck(system_hv.uri, "start", "vdt-no-such-domain")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "no domain named" in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "tui", "-c", "qemu+unix:///system?socket=/nope", "ls"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.startswith("virtdeck: cannot connect to qemu+unix:///system?socket=/nope")
    assert "Traceback" not in bad.stderr


def test_bulk_stats_give_cpu_and_disk_for_a_running_domain(
    lab: SystemLab, system_hv: Hypervisor
) -> None:
    name = lab.define("stats")
    system_hv.start(name)
    system_hv.domains()
    time.sleep(0.5)
    info = next(d for d in system_hv.domains() if d.name == name)
    assert info.state is DomainState.RUNNING
    assert info.cpu_percent is not None and info.cpu_percent >= 0
    assert info.disks[0].capacity_bytes == 64 * 1024**2
    assert info.disk_allocation_bytes and info.disk_allocation_bytes > 0


async def _wait_for(app: VirtdeckApp, pilot: object, name: str, state: DomainState) -> bool:
    for _ in range(100):
        await pilot.pause(0.05)  # type: ignore[attr-defined]
        rows = app.screen.query_one(DomainsTable).domains.values()
        if any(d.name == name and d.state is state for d in rows):
            return True
    return False


async def test_tui_starts_and_stops_with_keys(lab: SystemLab, system_hv: Hypervisor) -> None:
    uri = system_hv.uri
    name = lab.define("tui")
    app = VirtdeckApp([system_hv], shutdown_timeout=1.0)
    async with app.run_test(size=(140, 45)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen.query_one(DomainsTable).select_name(name)
        await pilot.pause()
        await pilot.press("s")
        assert await _wait_for(app, pilot, name, DomainState.RUNNING)
        assert virsh(uri, "domstate", name) == "running"
        await pilot.press("d")  # the BIOS-only guest ignores ACPI: virtdeck offers force off
        for _ in range(100):
            await pilot.pause(0.05)
            if isinstance(app.screen, ConfirmScreen):
                break
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        assert await _wait_for(app, pilot, name, DomainState.SHUTOFF)
        assert virsh(uri, "domstate", name) == "shut off"


async def test_event_from_virsh_reaches_the_tui(lab: SystemLab, system_hv: Hypervisor) -> None:
    uri = system_hv.uri
    name = lab.define("event")
    app = VirtdeckApp([system_hv], poll_interval=3600)  # only an event can update the row
    async with app.run_test(size=(140, 45)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert await _wait_for(app, pilot, name, DomainState.SHUTOFF)
        virsh(uri, "start", name)
        assert await _wait_for(app, pilot, name, DomainState.RUNNING)
        virsh(uri, "destroy", name)
        assert await _wait_for(app, pilot, name, DomainState.SHUTOFF)
