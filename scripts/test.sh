#!/usr/bin/env bash
# The whole test suite, as CI runs it: host set-up (packages, libvirtd, /dev/kvm), a venv with
# the dev extras, ruff, mypy, the import contracts (pyproject.toml), then every test — fast ones on
# libvirt's test driver and the system ones against two real daemons: the host's qemu:///system and the other Debian
# release's (scripts/other-libvirt.sh, started here and stopped again if this run started it).
# VIRTDECK_SYSTEM_DAEMONS=host runs the system tier against the host's daemon only.
# Arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

times=()
step() {  # step LABEL COMMAND...: run it, remember how long it took
  local label=$1 t0=$SECONDS rc=0
  shift
  "$@" || rc=$?
  times+=("$(printf '%-22s %4d s' "$label" $((SECONDS - t0)))")
  return "$rc"
}
report_times() {
  echo "== times"
  printf '%s\n' "${times[@]}"
}

step "host set-up" bash scripts/host-setup.sh
step "venv" bash scripts/venv.sh dev
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
echo "== ruff"
step "ruff" bash -c '.venv/bin/ruff check tui tests benchmarks &&
  .venv/bin/ruff format --check tui tests benchmarks'
echo "== mypy"
step "mypy" .venv/bin/mypy
echo "== import contracts"
step "lint-imports" .venv/bin/lint-imports

stop_other=0
cleanup() {
  if [ "$stop_other" = 1 ]; then bash scripts/other-libvirt.sh stop || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [[ ",${VIRTDECK_SYSTEM_DAEMONS:-host,other}," == *",other,"* ]]; then
  echo "== the other release's libvirt"
  t0=$SECONDS
  out=$(bash scripts/other-libvirt.sh start)
  echo "$out"
  if grep -q "other-libvirt: started" <<<"$out"; then stop_other=1; fi
  times+=("$(printf '%-22s %4d s' "other libvirt start" $((SECONDS - t0)))")
  VIRTDECK_OTHER_URI=$(bash scripts/other-libvirt.sh uri)
  export VIRTDECK_OTHER_URI
fi

echo "== pytest"
status=0
step "pytest" .venv/bin/python -m pytest "$@" || status=$?
report_times
exit "$status"
