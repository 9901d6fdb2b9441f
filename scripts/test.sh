#!/usr/bin/env bash
# The whole test suite, as CI runs it: host set-up (packages, libvirtd, /dev/kvm), a venv with
# the dev extras, ruff, mypy, then every test — fast ones on libvirt's test driver and the
# system ones on the real qemu:///system. Arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/host-setup.sh
bash scripts/venv.sh dev
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
echo "== ruff"
.venv/bin/ruff check tui tests benchmarks
.venv/bin/ruff format --check tui tests benchmarks
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"
