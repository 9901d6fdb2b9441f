"""Addresses, console and ssh against a real booted guest on qemu:///system.

One Debian guest (tests/guest.py: built once per machine and cached) boots for the whole
module on a qcow2 overlay in the lab directory: TCG, user-mode networking (10.0.2.15 from
QEMU's own DHCP; nothing leaves QEMU and nothing here connects to it), serial console, guest
agent. The dashboard runs in tmux on a private server socket, driven by send-keys and read
with capture-pane; every wait is for something on the screen or on disk, with a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import guest
from tests.lab import SystemLab, qemu_img
from tui import cli
from tui.core.details import AGENT, ARP, LEASE, read_details
from tui.core.hypervisor import Hypervisor

# the booted fixture's TCG boot counts in the first test's time
pytestmark = [pytest.mark.system, pytest.mark.timeout(guest.BOOT_DEADLINE + 300)]

REPO = Path(__file__).resolve().parents[1]
USER_NET_ADDRESS = "10.0.2.15"  # QEMU's user-mode DHCP hands out this one first


@dataclass(frozen=True)
class Guest:
    hv: Hypervisor
    name: str
    mac: str


@pytest.fixture(scope="module")
def booted(host_hv: Hypervisor) -> Iterator[Guest]:
    # The host's daemon only: the cached guest image (tests/guest.py) lives outside the image
    # directories the chrooted daemon sees, and one boot under TCG (~30 s) is enough here.
    image = guest.build()  # a few minutes the first time on a machine, then cached
    lab = SystemLab(host_hv)
    try:
        name = lab.name("guest")
        overlay = lab.dir / "root.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), str(overlay))
        mac = "52:54:00:" + ":".join(secrets.token_hex(1) for _ in range(3))
        dom = host_hv.define(guest.domain_xml(name, image, str(overlay), mac=mac))
        dom.create()
        deadline = time.monotonic() + guest.BOOT_DEADLINE
        while True:
            d = read_details(host_hv, name)
            if any(a.address == USER_NET_ADDRESS and a.source == AGENT for a in d.addresses):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the test guest gave no agent address within {guest.BOOT_DEADLINE:g} s: "
                    + "; ".join(f"{s.source}: {s.reason or 'ok'}" for s in d.sources)
                )
            time.sleep(1)
        yield Guest(host_hv, name, mac)
    finally:
        lab.cleanup()


def test_addresses_come_from_the_guest_agent(booted: Guest) -> None:
    d = read_details(booted.hv, booted.name)
    (nic,) = d.interfaces
    assert nic.mac == booted.mac and nic.type == "user" and nic.model == "virtio"
    assert nic.guest_name == "eth0"  # the name inside the guest, from the agent
    agent = [a for a in nic.addresses if a.source == AGENT]
    assert any(a.address == USER_NET_ADDRESS and a.prefix == 24 for a in agent)
    assert d.first_address is not None and d.first_address.address == USER_NET_ADDRESS
    status = {s.source: s for s in d.sources}
    assert status[AGENT].ok
    # user-mode networking: no libvirt network leases, and no layer 2 the host sees (slirp
    # answers inside qemu), so the host's ARP table cannot hold the guest's MAC: the source
    # says so, or libvirt's own error reading it (some hosts: 'wrong nlmsg len'), never "ok"
    assert not status[LEASE].ok and "libvirt network" in status[LEASE].reason
    assert not status[ARP].ok and status[ARP].reason.strip()
    assert d.console_refusal() is None and d.console is not None
    (vnc,) = d.graphics
    assert vnc.port is not None and vnc.port >= 5900  # autoport: the live XML's port
    assert vnc.tunnel is not None and f"{vnc.port}:127.0.0.1:{vnc.port}" in vnc.tunnel


def test_ls_json_carries_the_agent_address(
    booted: Guest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-c", booted.hv.uri, "ls", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows[booted.name]
    assert {"address": USER_NET_ADDRESS, "prefix": 24, "family": "ipv4", "source": "agent"} in row[
        "addresses"
    ]
    assert "lease" in row["address_errors"] and "agent" not in row["address_errors"]


# -- the dashboard in tmux ------------------------------------------------------------------


class Tmux:
    """virtdeck on a real terminal: a tmux session on a private server socket."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str]) -> None:
        self.socket = label
        self.session = label
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # COLUMNS/LINES (set by some test runners) would pin the app to their size
        cmd = f"env -u COLUMNS -u LINES {exports} {shlex.join(argv)}; echo EXITED $?; sleep 600"
        self._tmux("new-session", "-d", "-s", self.session, "-x", "140", "-y", "45", cmd)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, cwd=REPO
        )
        if done.returncode:
            raise AssertionError(f"tmux {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def text(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, "-l", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session)

    def wait(self, what: str, ok: Callable[[str], bool], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if ok(screen):
                return screen
            if time.monotonic() > deadline:
                size = self._tmux(
                    "display", "-p", "-t", self.session, "#{pane_width}x#{pane_height}"
                )
                raise AssertionError(
                    f"waited {timeout:g} s for {what}; the screen ({size.strip()}):\n{screen}"
                )
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def dashboard(booted: Guest, tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Tmux]]:
    started: list[Tmux] = []

    def start(env: dict[str, str]) -> Tmux:
        # a label of its own: the server an earlier test killed may still be exiting on
        # its socket, and a new session there fails ("server exited unexpectedly")
        label = f"{booted.name}-{uuid.uuid4().hex[:8]}"
        base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": "xterm-256color"}
        t = Tmux(label, [sys.executable, "-m", "tui", "-c", booted.hv.uri], base | env)
        started.append(t)
        t.wait("the dashboard", lambda s: booted.name in s and "Details" in s)
        # only our guest's row: the machine may have other domains
        t.keys("/")
        t.wait("the filter box", lambda s: "filter: name" in s)
        t.text(booted.name)
        t.wait("the filter text", lambda s: s.count(booted.name) >= 2 and "filter:" not in s)
        t.keys("Enter")
        # the table's keys in the footer again (the filter box shows only its own)
        t.wait("the table focused again", lambda s: "i Details" in s and "/ Filter" not in s)
        return t

    try:
        yield start
    finally:
        for t in started:
            t.kill()


def _intact(name: str) -> Callable[[str], bool]:
    """The dashboard is drawn again: header, our row, the footer keys."""
    return lambda s: "virtdeck" in s and name in s and "i Details" in s and "^p palette" in s


def test_console_attaches_and_ctrl_bracket_returns(
    booted: Guest, dashboard: Callable[[dict[str, str]], Tmux]
) -> None:
    t = dashboard({})
    t.keys("C")
    t.wait("virsh console", lambda s: "Escape character is ^]" in s)
    t.keys("Enter")  # getty prints its prompt again
    screen = t.wait("the guest's login prompt", lambda s: "login:" in s)
    assert f"Connected to domain '{booted.name}'" in screen
    t.keys("C-]")
    screen = t.wait("the dashboard after Ctrl-]", _intact(booted.name))
    assert "login:" not in screen
    t.keys("i")  # and it still takes keys
    t.wait("the details view", lambda s: USER_NET_ADDRESS in s and "agent" in s)
    t.keys("Escape")
    t.wait("the dashboard after the details", _intact(booted.name))
    t.keys("q")  # not in the same send as Escape: ESC q would read as Alt+q
    t.wait("virtdeck to quit", lambda s: "EXITED 0" in s)


def test_ssh_key_runs_ssh_with_the_guest_address(
    booted: Guest, dashboard: Callable[[dict[str, str]], Tmux], tmp_path: Path
) -> None:
    # A recording ssh first on PATH: nothing connects to the guest's private address.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "ssh-argv"
    fake = bindir / "ssh"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(record))}\n")
    fake.chmod(0o755)
    t = dashboard({"PATH": f"{bindir}:{os.environ['PATH']}"})
    t.keys("S")
    deadline = time.monotonic() + 30
    while not record.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"ssh was not run within 30 s; the screen:\n{t.screen()}")
        time.sleep(0.2)
    assert record.read_text().split() == [f"root@{USER_NET_ADDRESS}"]
    t.wait("the dashboard after ssh", _intact(booted.name))
    t.keys("q")
    t.wait("virtdeck to quit", lambda s: "EXITED 0" in s)
