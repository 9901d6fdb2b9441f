#!/usr/bin/env bash
# Make this Debian/Ubuntu machine a small KVM hypervisor virtdeck can drive: system packages,
# libvirt daemons started without systemd when there is none, /dev/kvm usable by QEMU.
# Safe to run again. Needs root.
set -euo pipefail

PKGS=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev python3-venv
      qemu-system-x86 qemu-utils libguestfs-tools linux-image-amd64
      openssh-server openssh-client  # ssh: the fleet test rig (tests/rigs.py) and qemu+ssh
      ovmf swtpm swtpm-tools  # UEFI firmware and the TPM emulator clones may use
      mmdebstrap e2fsprogs tmux  # the real test guest; console/ssh keys
      syslinux mtools dosfstools fdisk  # the cloud test guest: a disk that boots alone
      iproute2)  # scripts/other-libvirt.sh: the other release's libvirt

if [ "$(id -u)" -ne 0 ]; then
  echo "virtdeck setup: run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "virtdeck setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libguestfs' appliance (virt-sysprep) reads the host kernel.
chmod 0644 /boot/vmlinuz-* 2>/dev/null || true

# QEMU opens /dev/ptmx for every serial console. Twice on these machines it had become a
# symlink to a devpts instance with ptmxmode=000 ("Failed to create PTY: Permission denied");
# a character device again, as on any Debian machine.
if [ ! -c /dev/ptmx ]; then
  echo "virtdeck setup: /dev/ptmx is not the pty multiplexer; making it one again" >&2
  rm -f /dev/ptmx && mknod -m 666 /dev/ptmx c 5 2
fi

# QEMU runs as libvirt-qemu (group kvm): let it open /dev/kvm.
if [ -e /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 660 /dev/kvm; fi

# swtpm's local CA: libvirt runs swtpm_setup as tss when that user existed when the daemon
# started, as root otherwise; a daemon started before swtpm-tools made tss leaves the CA's files
# (and its lock) owned by root, and every later TPM start as tss fails ("Need read/write rights
# on /var/lib/swtpm-localca/.lock.swtpm-localca for user tss"). root reads them either way.
if [ -d /var/lib/swtpm-localca ] && getent passwd tss >/dev/null; then
  chown -R tss:root /var/lib/swtpm-localca
fi

mkdir -p /var/log/libvirt /var/lib/libvirt/images /run/libvirt
daemon_up() { virsh -c qemu:///system version >/dev/null 2>&1; }
if ! daemon_up; then
  if [ -d /run/systemd/system ]; then
    systemctl start libvirtd 2>/dev/null || systemctl start virtqemud virtstoraged 2>/dev/null || true
  else
    pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d
    if [ -x /usr/sbin/libvirtd ]; then
      pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d
    else  # modular daemons only
      for d in virtqemud virtstoraged virtnetworkd virtnodedevd virtsecretd; do
        if [ -x /usr/sbin/$d ] && ! pgrep -x $d >/dev/null; then /usr/sbin/$d -d; fi
      done
    fi
  fi
  for _ in $(seq 50); do daemon_up && break; sleep 0.2; done
fi
if daemon_up; then
  virsh -c qemu:///system version | sed -n 's/^Using library: /virtdeck setup: /p'
else
  echo "virtdeck setup: the libvirt daemon did not come up" >&2
  exit 1
fi
