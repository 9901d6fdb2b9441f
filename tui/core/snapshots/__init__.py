"""Snapshot trees and quick rollback: internal and external snapshots, create, revert, delete.

The core builds the tree (frozen SnapshotNode values, `tree`) and every change is a plan first
(`plan_create`, `plan_revert`, `plan_rollback`, `plan_delete`: pure reads, validated, with the
lines a confirmation should show), then an execution that reports progress and undoes what it
did when it fails (`create`, `revert`, `delete`). Who does the work, libvirt or virtdeck, is
decided from libvirt's capabilities at run time (see `revert` and `delete`); files are only
ever changed through tui.core.storage.
"""

from tui.core.snapshots import common
from tui.core.snapshots.common import validate_snapshot_name
from tui.core.snapshots.create import CreatePlan, create, new_token, plan_create
from tui.core.snapshots.delete import DeletePlan, delete, plan_delete
from tui.core.snapshots.revert import DiskSwitch, RevertPlan, plan_revert, plan_rollback, revert
from tui.core.snapshots.tree import (
    DISK_ONLY,
    EXTERNAL,
    INTERNAL,
    SnapshotDisk,
    SnapshotFile,
    SnapshotNode,
    SnapshotTree,
    build_tree,
    libvirt_handles_external,
    parse_snapshot_xml,
    snapshot_mark,
    snapshot_names,
    snapshot_tree,
)

__all__ = [
    "DISK_ONLY",
    "EXTERNAL",
    "INTERNAL",
    "CreatePlan",
    "DeletePlan",
    "DiskSwitch",
    "RevertPlan",
    "SnapshotDisk",
    "SnapshotFile",
    "SnapshotNode",
    "SnapshotTree",
    "build_tree",
    "common",
    "create",
    "new_token",
    "delete",
    "libvirt_handles_external",
    "parse_snapshot_xml",
    "plan_create",
    "plan_delete",
    "plan_revert",
    "plan_rollback",
    "revert",
    "snapshot_mark",
    "snapshot_names",
    "snapshot_tree",
    "validate_snapshot_name",
]
