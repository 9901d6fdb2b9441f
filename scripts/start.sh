#!/usr/bin/env bash
# Install what is missing, then start virtdeck: on this hypervisor when qemu:///system answers,
# otherwise on the demo lab. Arguments are passed to virtdeck.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if ! bash "$repo/scripts/host-setup.sh"; then
  echo "virtdeck: no local hypervisor; starting the demo lab" >&2
fi
bash "$repo/scripts/venv.sh"
if [ $# -eq 0 ] && ! virsh -c qemu:///system version >/dev/null 2>&1; then
  exec "$repo/.venv/bin/virtdeck" --demo
fi
exec "$repo/.venv/bin/virtdeck" "$@"
