#!/usr/bin/env bash
# Create .venv beside the repository and install virtdeck into it (editable), with extras "$@".
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
if [ ! -x "$repo/.venv/bin/python" ]; then
  "$py" -m venv "$repo/.venv"
fi
extras=""
if [ $# -gt 0 ]; then extras="[$(IFS=,; echo "$*")]"; fi
# editable_mode=compat: a plain path in a .pth instead of setuptools' import hook, which
# costs every start of the `virtdeck` script ~10 ms (benchmarks/bench_start.py).
"$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check \
  --config-settings editable_mode=compat -e "$repo$extras"
