"""libvirt's live migration as virtdeck runs it: progress, cancel, and the undo of each side.

tui.core.migrate plans and journals a live migration; this module runs the one long libvirt
call in it (`migrate`): managed migration driven by this client (no daemon connects to the
other), LIVE | PERSIST_DEST, and with NON_SHARED_INC when the target has an overlay made
for each disk the domain writes (QEMU's shallow mirror fills it: only the domain's own
layer crosses, over the target's copy of the base). It runs in a thread of its own while
the caller's thread polls the job's statistics on a second connection to the source (a
connection has one call in flight at a time: tui.core.connection.Gate) and reports bytes,
the dirty rate and an ETA; a cancel (Ctrl-C, SIGTERM, SIGHUP) or a failed report aborts the
job, and libvirt leaves the domain running on the source.

Undo kinds, for what an interrupt, a crash or a kill leaves:
- `live_incoming` (target): a domain with the UUID that is still being received there (not
  persistent, or paused by the migration) is destroyed. One that runs there defined is the
  migration's finished result: never touched (its files are then in use, so the journal's
  file deletions skip them too).
- `live_source` (source): before the switchover, the domain left paused by the migration
  (the client died between the end of the transfer and the switchover) runs again; after
  it (the domain runs on the target, defined), the source's shut-off copy is removed as the
  plan said (definition undefined or renamed, own files deleted): the finished result.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import libvirt

from tui.core import ops
from tui.core.errors import NotFoundError, OperationError, VirtdeckError
from tui.core.hypervisor import Hypervisor
from tui.core.progress import Progress

POLL_SECONDS = 0.5
LOOPBACK = ("", "localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Result:
    """What the finished job says (libvirt's completed job statistics on the target)."""

    downtime_ms: int | None
    seconds: float
    memory_bytes: int | None
    disk_bytes: int | None
    cancelled_too_late: bool = False

    def describe(self) -> str:
        parts = [f"{self.seconds:.1f} s"]
        if self.downtime_ms is not None:
            parts.append(f"downtime {self.downtime_ms} ms")
        if self.disk_bytes:
            parts.append(f"{_mib(self.disk_bytes)} of disk")
        if self.memory_bytes:
            parts.append(f"{_mib(self.memory_bytes)} of memory")
        return ", ".join(parts)


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def migration_host(uri: str) -> tuple[str, bool]:
    """Where the source's QEMU sends the domain: the target URI's host (the name the operator
    reaches it by), and whether that is this machine's loopback (then the target listens on
    loopback only)."""
    host = urlsplit(uri).hostname or ""
    if host in LOOPBACK:
        return "127.0.0.1", True
    return (f"[{host}]" if ":" in host else host), False


def parameters(
    target_uri: str,
    dest_xml: str,
    persist_xml: str,
    disks: list[str],
    bandwidth: int | None,
) -> tuple[dict[str, Any], int]:
    """virDomainMigrate3's parameters and flags."""
    host, loopback = migration_host(target_uri)
    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{host}",
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persist_xml,
    }
    if loopback:
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = host
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
    if disks:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = disks
        params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{host}"
    if bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth
    return params, flags


def migrate(
    source: Hypervisor,
    target: Hypervisor,
    uuid: str,
    name: str,
    params: dict[str, Any],
    flags: int,
    progress: Progress,
    *,
    max_downtime: int | None = None,
) -> Result:
    """Run the migration; returns when the domain runs on the target. An exception from
    `progress` (a cancel) aborts the job and is raised again once libvirt has given the
    domain back to the source; a cancel that comes after the switchover is too late
    (`Result.cancelled_too_late`: the domain runs on the target)."""
    dom = source.call(source.conn.lookupByUUIDString, uuid, what=f"looking up '{name}'")
    if max_downtime:
        source.call(dom.migrateSetMaxDowntime, max_downtime, 0,
                    what=f"setting the maximum downtime of '{name}'")  # fmt: skip
    watch = Hypervisor.open(source.uri)  # the job's statistics while the call runs
    dest = Hypervisor.open(target.uri)  # the migration's own connection to the target
    outcome: dict[str, BaseException] = {}
    start = time.monotonic()

    def run() -> None:
        try:
            source.call(dom.migrate3, dest.conn, params, flags,
                        what=f"migrating '{name}' to {target.uri}")  # fmt: skip
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"live migration of {name}", daemon=True)
    stopped: BaseException | None = None
    try:
        watched = watch.call(watch.conn.lookupByUUIDString, uuid, what=name)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if not worker.is_alive():
                break
            try:
                _report(watch, watched, name, start, progress)
            except BaseException as err:  # a cancel, an interrupt: abort the job
                stopped = err
                progress_abort(watch, watched, name)
                worker.join()
                break
    finally:
        watch.close()
        if not worker.is_alive():
            dest.close()
    failed = outcome.get("error")
    if failed is not None:
        if stopped is not None:
            raise stopped
        raise failed
    return _finished(target, uuid, name, time.monotonic() - start, stopped is not None)


def progress_abort(watch: Hypervisor, dom: Any, name: str) -> None:
    """Abort the job (libvirt resumes the domain on the source)."""
    with contextlib.suppress(VirtdeckError):
        watch.call(dom.abortJob, what=f"cancelling the migration of '{name}'")


def _report(watch: Hypervisor, dom: Any, name: str, start: float, progress: Progress) -> None:
    try:
        stats = watch.call(dom.jobStats, 0, what=f"reading the migration of '{name}'")
    except VirtdeckError:
        stats = {}
    total = int(stats.get("data_total") or 0)
    done = int(stats.get("data_processed") or 0)
    left = int(stats.get("data_remaining") or 0)
    rate = int(stats.get("memory_bps") or stats.get("disk_bps") or 0)
    dirty = int(stats.get("memory_dirty_rate") or 0) * int(stats.get("memory_page_size") or 4096)
    if not total:
        progress(f"migrating '{name}' live: starting", None)
        return
    eta = f", about {left / rate:.0f} s left" if rate and left else ""
    progress(
        f"migrating '{name}' live: {_mib(done)} sent, {_mib(left)} left"
        + (f", dirtying {_mib(dirty)}/s" if dirty else "")
        + eta,
        min(done / (done + left), 0.99) if done + left else None,
    )


def _finished(target: Hypervisor, uuid: str, name: str, seconds: float, late: bool) -> Result:
    """The domain runs on the target; its completed job statistics."""
    dom = target.call(target.conn.lookupByUUIDString, uuid, what=f"looking up '{name}' there")
    state = target.call(dom.state, 0, what=name)[0]
    if state != libvirt.VIR_DOMAIN_RUNNING:
        raise OperationError(
            f"'{name}' reached {target.uri} but is not running there (state {state}); "
            "look at it with 'virtdeck show'"
        )
    stats: dict[str, Any] = {}
    with contextlib.suppress(VirtdeckError):
        stats = target.call(dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED, what=name)

    def num(key: str) -> int | None:
        value = stats.get(key)
        return int(value) if value is not None else None

    return Result(num("downtime"), seconds, num("memory_processed"), num("disk_processed"),
                  cancelled_too_late=late)  # fmt: skip


# -- undo kinds --------------------------------------------------------------------------------


def _receiving(hv: Hypervisor, uuid: str) -> Any | None:
    """The domain with `uuid` on `hv` if it is still being received (not persistent, or
    paused by an incoming migration), else None."""
    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return None
    if not hv.call(dom.isActive):
        return None
    state, reason = hv.call(dom.state, 0)
    incoming = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION
    if incoming or not hv.call(dom.isPersistent):
        return dom
    return None


def _check_incoming(
    hv: Hypervisor, action: ops.UndoAction, live: bool, owned: frozenset[str]
) -> str:
    uuid = action.args["uuid"]
    try:
        hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        return ""
    if _receiving(hv, uuid) is None:
        return "the migration had finished: the domain runs there, defined (kept)"
    return ""


@ops.undo_kind("live_incoming", check=_check_incoming)
def _stop_incoming(hv: Hypervisor, uuid: str, name: str) -> None:
    dom = _receiving(hv, uuid)
    if dom is not None:
        hv.call(dom.destroy, what=f"stopping the incoming '{name}'")
        hv.invalidate()


@ops.undo_kind("live_source")
def _live_source(
    hv: Hypervisor, uuid: str, name: str, target: str, files: list[str], keep: str | None = None
) -> None:
    """The source side of an interrupted live migration, whichever side of the switchover
    the interrupt fell on: before it, the domain runs here (resumed if the migration left it
    paused); after it, the domain runs on `target`, and the source's copy (its shut-off
    definition, its own `files`) is removed as the plan said, or renamed to `keep`."""
    try:
        dom = hv.call(hv.conn.lookupByUUIDString, uuid)
    except NotFoundError:
        dom = None
    if dom is not None and hv.call(dom.isActive):
        state, reason = hv.call(dom.state, 0)
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
            hv.call(dom.resume, what=f"resuming '{name}'")
            hv.invalidate()
        return
    if not _runs_on(target, uuid):
        return  # it never left (or was stopped here since): nothing of the migration to finish
    if dom is not None and hv.call(dom.name) == name:
        if keep:
            hv.rename(dom, name, keep)
        else:
            hv.undefine_all(dom, what=f"undefining '{name}' (it runs on {target})")
    hv.invalidate()
    if keep:
        return
    from tui.core.storage import files_for

    store = files_for(hv, "migrate", define_pools=False)
    for path in files:
        if store.lexists(path) and not ops.users_of(hv, path, frozenset()):
            store.delete(path)


def _runs_on(uri: str, uuid: str) -> bool:
    """Whether the domain with `uuid` runs on `uri`, defined there (the migration's finished
    result). A host that does not answer raises (recover tries again later)."""
    other = Hypervisor.open(uri)
    try:
        dom = other.call(other.conn.lookupByUUIDString, uuid)
        return bool(other.call(dom.isActive)) and _receiving(other, uuid) is None
    except NotFoundError:
        return False
    finally:
        other.close()
