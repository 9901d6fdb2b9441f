"""The image family lock (tui.core.bases): exclusive between threads and processes,
re-entrant in one thread, gone with a killed process, refused in a directory others can write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tui.core import bases
from tui.core.errors import OperationError
from tui.core.hypervisor import Hypervisor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "locks"
    monkeypatch.setenv("VIRTDECK_LOCK_DIR", str(d))
    return d


def test_another_thread_waits_and_the_same_thread_reenters(
    test_hv: Hypervisor, lock_dir: Path
) -> None:
    image = "/var/tmp/vd-web.qcow2"
    held, release, outcome = threading.Event(), threading.Event(), []

    def holder() -> None:
        with (
            bases.family_lock(test_hv, [image], chains=False),
            bases.family_lock(test_hv, [image], chains=False),  # re-entrant
        ):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    with (
        pytest.raises(OperationError, match="another virtdeck operation has held"),
        bases.family_lock(test_hv, [image], chains=False, timeout=0.2),
    ):
        outcome.append("entered while held")
    release.set()
    t.join(10)
    with bases.family_lock(test_hv, [image], chains=False, timeout=2):
        outcome.append("entered after release")
    assert outcome == ["entered after release"]
    assert oct(lock_dir.stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in lock_dir.iterdir())


def test_a_killed_holder_leaves_no_lock(test_hv: Hypervisor, lock_dir: Path) -> None:
    key = bases.image_key(test_hv, "/var/tmp/vd-web.qcow2")
    code = (
        "import sys, time; from tui.core import bases; "
        f"bases._acquire({key!r}, 5); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ})  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with (
            pytest.raises(OperationError, match="has held"),
            bases.family_lock(test_hv, ["/var/tmp/vd-web.qcow2"], chains=False, timeout=0.2),
        ):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with bases.family_lock(test_hv, ["/var/tmp/vd-web.qcow2"], chains=False, timeout=2):
        pass


def test_a_lock_directory_others_can_write_is_refused(test_hv: Hypervisor, lock_dir: Path) -> None:
    lock_dir.mkdir(mode=0o777)
    os.chmod(lock_dir, 0o777)
    with (
        pytest.raises(OperationError, match="not a private directory"),
        bases.family_lock(test_hv, ["/var/tmp/vd-web.qcow2"], chains=False),
    ):
        pass


def test_a_rollback_of_a_template_without_snapshots_does_not_advise_taking_one(
    test_hv: Hypervisor,
) -> None:
    """It said "take one with 'virtdeck snapshot create template-web NAME'", which is refused."""
    from tui.core import snapshots
    from tui.core.errors import DependencyError

    with pytest.raises(DependencyError, match="a rollback of 'template-web' refused: it is a"):
        snapshots.plan_rollback(test_hv, "template-web")


def test_snapshots_of_a_template_are_refused_by_the_planners(test_hv: Hypervisor) -> None:
    """The core refuses, not only the CLI: every snapshot planner, for a template."""
    from tui.core import snapshots
    from tui.core.errors import DependencyError

    dom = test_hv.conn.lookupByName("template-web")
    dom.snapshotCreateXML("<domainsnapshot><name>old</name></domainsnapshot>", 0)
    test_hv.invalidate()
    for plan in (
        lambda: snapshots.plan_create(test_hv, "template-web", "s1"),
        lambda: snapshots.plan_create(test_hv, "template-web", "s1", external=True),
        lambda: snapshots.plan_revert(test_hv, "template-web", "old"),
        lambda: snapshots.plan_rollback(test_hv, "template-web"),
        lambda: snapshots.plan_delete(test_hv, "template-web", "old"),
    ):
        with pytest.raises(DependencyError, match="'template-web' refused: it is a template"):
            plan()
