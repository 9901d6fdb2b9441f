#!/bin/bash
# Issue 19's reproductions, 20 runs each (as root; ~20 min): the full clone whose daemon is
# SIGSTOPped mid-copy and SIGCONTed 25 s later (the CLI must say so in one line within
# keepalive's deadline, then undo its work itself), and the snapshot whose daemon takes it
# after the connection was lost (recover deletes it by its mark). Prints the pass counts.
set -u
cd "$(dirname "$0")/.."
runs=${1:-20}
export VIRTDECK_SYSTEM_DAEMONS=host VIRTDECK_REPRO_RUNS=$runs VIRTDECK_REPRO_STOP=${VIRTDECK_REPRO_STOP:-25}
.venv/bin/python -m pytest -m system tests/test_faults_system.py -q -s -rf \
    -k "undoes_itself or recovered_by_its_mark" 2>&1 | tee /tmp/virtdeck-repro.log |
    grep -E "after SIGSTOP|landed|passed|failed|FAILED"
