"""What sealing leaves of a machine's identity, and what each clone makes of its own.

virt-sysprep's `machine-id` operation empties /etc/machine-id, and then its `customize`
operation (always last; libguestfs >= 1.46) writes a *fresh* machine-id into the image, and
new bytes into any random seed file it finds (/var/lib/systemd/random-seed on Debian 12).
Sealing a template's base that way hands every clone the same machine-id (the same DHCP DUID
from systemd-networkd, the same journal identity) and the same seed. Measured with
libguestfs 1.48 on Debian 12: virt-sysprep runs its customize options *after* setting that
machine-id, so the same run empties the file again (`--touch` then `--truncate`: an empty
file, not a missing one, is what makes systemd create a unique id at first boot and what
virt-customize's per-clone identity fills) and deletes the seeds. Those options run inside
the one virt-sysprep call, inside the journalled operation: nothing new to undo. Debian's
/var/lib/dbus/machine-id, a link to /etc/machine-id, stays that link. Seeds are deleted, not
emptied: which of them exist is not known without inspecting the guest, and truncating a
missing one would fail the run; a clone's systemd-random-seed saves its own at first boot
(measured: three clones, three seeds), and a per-clone virt-customize, finding no seed file,
says so in a harmless warning.

The `ssh-hostkeys` operation removes the host keys. Fedora/RHEL's sshd-keygen (and Arch's,
SUSE's, Alpine's init script) make missing keys before sshd starts; Debian's and Ubuntu's
openssh-server does not, and a clone's sshd fails (`sshd -t`: no host keys). Sealing installs
a small systemd unit, ordered before ssh.service/sshd.service and after sshd-keygen.target,
that runs `ssh-keygen -A` when a host key is missing. It is installed on every Linux guest
rather than detected: detecting needs an inspection of the guest (another libguestfs
appliance, ~30 s under TCG) before the plan can be shown, while the unit is a no-op wherever
keys exist (its conditions are checked by systemd without running anything; after
sshd-keygen.target, Fedora's own keys are already there). A unit, not virt-sysprep's
`--firstboot-command`: a first-boot script races sshd, whose start limit gives up before the
keys exist. Guests without systemd get the unit file but nothing runs it.

Windows guests get none of this (no /etc: `--touch` would fail the whole run); virtdeck knows
one by its libosinfo id or Hyper-V enlightenments in the domain XML (as virt-install and
virt-manager write them).

What sealing did is recorded in the template's metadata (`VirtdeckMeta.sealing`: None for a
template sealed before this was recorded) so `template ls` and the Templates pane can say
what clones regenerate at first boot and what they share.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

MACHINE_ID = "machine-id"  # /etc/machine-id emptied and random seeds removed after customize
SSH_HOST_KEYS = "ssh-host-keys"  # the host-key unit installed

UNIT = "virtdeck-ssh-hostkeys.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
_WANTS = "/etc/systemd/system/multi-user.target.wants"
_UNIT_TEXT = """\
[Unit]
Description=Create missing SSH host keys (virtdeck sealed this system's template)
After=sshd-keygen.target
Before=ssh.service sshd.service
ConditionPathExists=/usr/bin/ssh-keygen
ConditionPathExists=|!/etc/ssh/ssh_host_rsa_key
ConditionPathExists=|!/etc/ssh/ssh_host_ecdsa_key
ConditionPathExists=|!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""
#: Where libguestfs' customize step writes a random seed (the files that exist get new bytes).
RANDOM_SEEDS = (
    "/var/lib/systemd/random-seed",
    "/var/lib/urandom/random-seed",
    "/var/lib/random-seed",
)


def additions(operations: Sequence[str], *, windows: bool) -> tuple[str, ...]:
    """What virtdeck adds to a virt-sysprep run of these operations."""
    if windows:
        return ()
    out = []
    if "machine-id" in operations:
        out.append(MACHINE_ID)
    if "ssh-hostkeys" in operations:
        out.append(SSH_HOST_KEYS)
    return tuple(out)


def sysprep_operations(operations: Sequence[str], added: Sequence[str]) -> tuple[str, ...]:
    """The operations to run: virtdeck's additions are customize options, which virt-sysprep
    only carries out in its `customize` operation."""
    if added and "customize" not in operations:
        return (*operations, "customize")
    return tuple(operations)


def customize_argv(added: Sequence[str]) -> list[str]:
    """virt-sysprep's customize options for virtdeck's additions (run after its own customize
    step has written a machine-id and seeds: measured with libguestfs 1.48)."""
    argv: list[str] = []
    if MACHINE_ID in added:
        argv += ["--touch", "/etc/machine-id", "--truncate", "/etc/machine-id"]
        for seed in RANDOM_SEEDS:
            argv += ["--delete", seed]
    if SSH_HOST_KEYS in added:
        argv += [
            "--mkdir", _WANTS,
            "--write", f"{UNIT_PATH}:{_UNIT_TEXT}",
            "--link", f"{UNIT_PATH}:{_WANTS}/{UNIT}",
        ]  # fmt: skip
    return argv


def plan_lines(operations: Sequence[str], added: Sequence[str], windows: bool) -> list[str]:
    """The plan's words on what sealing leaves of the machine's identity."""
    lines = []
    if MACHINE_ID in added:
        lines.append(
            "then empty /etc/machine-id and delete the random seed that virt-sysprep's "
            "customize step writes: each clone makes its own at first boot"
        )
    elif "machine-id" not in operations:
        lines.append("keep the machine-id (no machine-id operation): every clone shares it")
    if SSH_HOST_KEYS in added:
        lines.append(
            f"install {UNIT}: a clone creates its SSH host keys at first boot (ssh-keygen -A "
            "before sshd; Debian/Ubuntu's sshd does not make them)"
        )
    elif "ssh-hostkeys" not in operations:
        lines.append("keep the SSH host keys (no ssh-hostkeys operation): every clone shares them")
    if windows:
        lines.append("a Windows guest: nothing added to virt-sysprep's own operations")
    return lines


#: What a clone regenerates at first boot, by the tag `template ls` shows.
REGENERATED = {
    "machine-id": "machine-id (systemd makes one: /etc/machine-id is empty)",
    "random-seed": "random seed (systemd-random-seed saves a new one)",
    "ssh-host-keys": f"SSH host keys ({UNIT}: ssh-keygen -A before sshd)",
    "ssh-host-keys?": "SSH host keys only if the guest's sshd makes them (Fedora/RHEL do, "
    "Debian/Ubuntu do not)",
}


@dataclass(frozen=True)
class FirstBoot:
    """What each clone of a template makes of its own at first boot, and what they share."""

    regenerates: tuple[str, ...]  # tags of REGENERATED
    shared: tuple[str, ...]  # per-machine state in the base (one line each, with why)

    def lines(self) -> list[str]:
        return [REGENERATED[tag] for tag in self.regenerates]

    def to_json(self) -> dict[str, list[str]]:
        return {"regenerates": list(self.regenerates), "shared": list(self.shared)}


def first_boot(sealed: bool, operations: Sequence[str], sealing: Sequence[str] | None) -> FirstBoot:
    """From a template's metadata (`sealing` None: sealed before virtdeck recorded it)."""
    if not sealed:
        return FirstBoot((), ("everything: the template was not sealed",))
    regen: list[str] = []
    shared: list[str] = []
    if "machine-id" in operations:
        if sealing is not None and MACHINE_ID in sealing:
            regen += ["machine-id", "random-seed"]
        elif sealing is None and "customize" in operations:
            shared.append(
                "the machine-id: sealed before virtdeck emptied it after virt-sysprep's "
                "customize step (libguestfs >= 1.46 writes one into the base)"
            )
        elif sealing is None:
            regen.append("machine-id")
    else:
        shared.append("the machine-id: no machine-id operation when it was sealed")
    if "ssh-hostkeys" in operations:
        if sealing is not None and SSH_HOST_KEYS in sealing:
            regen.append("ssh-host-keys")
        else:
            regen.append("ssh-host-keys?")
    else:
        shared.append("the SSH host keys: no ssh-hostkeys operation when it was sealed")
    return FirstBoot(tuple(regen), tuple(shared))


def is_windows(root: ET.Element) -> bool:
    """A Windows guest by its domain XML: a libosinfo id (virt-install, virt-manager) or
    Hyper-V enlightenments."""
    for elem in root.iter():
        if elem.tag.endswith("}os") and "microsoft.com/win" in (elem.get("id") or ""):
            return True
    return root.find("./features/hyperv") is not None
