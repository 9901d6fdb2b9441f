"""Invariants about images others build on: one lock per image family, and a base with
dependents never written.

`family_lock(hv, paths)` takes an exclusive `flock` on one lock file per image of the chains
of `paths` (sorted, so two operations never wait on each other in a cycle), held from an
operation's re-check to its last step: a `clone T` and an `rm T --storage` started together
serialise, and the second re-checks the dependents after it gets the lock. The lock files
live in a directory of this machine (`$VIRTDECK_LOCK_DIR`, else /run/lock/virtdeck for root,
else $XDG_RUNTIME_DIR/virtdeck/locks), keyed by the image's identity: its real path for an
image of this machine (two daemons of this machine that share a directory share the lock),
host and path for another host's. The kernel drops an flock with the last descriptor, so a
killed process never leaves a lock behind. The images of a host reached over SSH are also
locked there, in the lock files a virtdeck running on that host uses (`flock` held by a shell
of the operation's SSH session, which dies with it): two clients on two machines, and a client
and the host itself, serialise too. A host reached without SSH (TLS, TCP) has no lock API:
only this machine's processes serialise.

`template create` and `rm --storage` ask the other hosts too (`ask_others`): the connected
ones and the saved hosts of config.toml.

`refuse_base_write(hv, domain, verb, internal=...)` refuses an operation that would write the
images of a template, or images other domains (or undefined templates' backups, or overlays
lying beside them) build on, naming them: snapshot create, revert, delete and rollback call it
when planning and again, under the lock, when executing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import select
import stat
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tui.core.cancel import check_cancelled
from tui.core.errors import DependencyError, OperationError, VirtdeckError
from tui.core.hypervisor import Hypervisor

#: How long an operation waits for another one holding the same image family.
LOCK_TIMEOUT = 600.0

# key -> (fd, depth): re-entrant within a thread. Another thread opens the lock file again and
# waits like another process (an flock belongs to an open file description).
_local = threading.local()


def _held() -> dict[str, tuple[int, int]]:
    held: dict[str, tuple[int, int]] | None = getattr(_local, "held", None)
    if held is None:
        held = _local.held = {}
    return held


def lock_dir() -> Path:
    env = os.environ.get("VIRTDECK_LOCK_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/lock/virtdeck")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "virtdeck" / "locks"
    return Path(f"/tmp/virtdeck-{os.geteuid()}") / "locks"


def _private_dir(path: Path) -> Path:
    """The lock directory, made 0700; refused if a symlink, not ours, or open to others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OperationError(
            f"the lock directory {path} is not a private directory of this user; "
            "nothing was changed (remove it, or set VIRTDECK_LOCK_DIR)"
        )
    return path


def image_key(hv: Hypervisor, path: str) -> str:
    """An image's identity across the hypervisors of this machine: the real path of a file
    here; host and path of one elsewhere."""
    if hv.local:
        return "local:" + os.path.realpath(path)
    host = urlsplit(hv.uri).hostname or hv.uri
    return f"{host}:{os.path.normpath(path)}"


def family(hv: Hypervisor, paths: Iterable[str]) -> list[str]:
    """The images of the chains of `paths` (as far as they can be read), and `paths`."""
    from tui.core.storage import Resolver

    resolver = Resolver(hv, ssh=True)
    out: list[str] = []
    for p in paths:
        if not p or not p.startswith("/"):
            continue
        out.append(p)
        with contextlib.suppress(Exception):  # an unreadable chain locks what could be read
            out += [x for x in resolver.chain(p).paths if x.startswith("/")]
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def family_lock(
    hv: Hypervisor,
    paths: Iterable[str],
    *,
    timeout: float = LOCK_TIMEOUT,
    chains: bool = True,
) -> Iterator[None]:
    """Hold the locks of the images of `paths` (and, with `chains`, of their backing chains)
    for the block; waits for another process holding one, up to `timeout` seconds."""
    images = family(hv, paths) if chains else [p for p in paths if p and p.startswith("/")]
    by_key = {image_key(hv, p): p for p in images}
    keys = sorted(by_key)
    fresh = [p for p in images if image_key(hv, p) not in _held()]  # not yet held here
    taken: list[str] = []
    remote: subprocess.Popen[str] | None = None
    try:
        for key in keys:
            _acquire(key, timeout)
            taken.append(key)
        if fresh and not hv.local:
            remote = _hold_remote(hv, fresh, timeout)
        yield
    finally:
        if remote is not None:
            _let_go(remote)
        for key in reversed(taken):
            _release(key)


# On the host itself: the same lock files a virtdeck running there uses for its local images
# (its lock directory as root, keyed by "local:" and the real path), so a client over SSH and
# one on the host serialise too. `flock` holds them while `cat` reads the SSH session's input:
# closing it, or the session dying with this process, releases them.
_REMOTE_LOCK = r"""
d=/run/lock/virtdeck
[ "$(id -u)" = 0 ] || d="${XDG_RUNTIME_DIR:-/tmp}/virtdeck-$(id -u)-locks"
command -v flock >/dev/null 2>&1 || { echo "flock(1) is not installed there" >&2; exit 4; }
mkdir -p -m 700 "$d" || exit 3
w=$1; shift
ks=$(for p in "$@"; do
  printf 'local:%s' "$(realpath -m -- "$p")" | sha256sum | cut -c1-32
done | sort -u)
i=3
for k in $ks; do
  eval "exec $i>>\"\$d/$k.lock\"" || exit 3
  flock -x -w "$w" "$i" || exit 1
  i=$((i+1))
done
echo locked
exec cat >/dev/null
"""
#: A POSIX shell has descriptors 3-9 for them: the deepest images of a family are locked.
REMOTE_MAX = 7


def _hold_remote(hv: Hypervisor, paths: list[str], timeout: float) -> subprocess.Popen[str] | None:
    """Hold the locks of `paths` on the host of `hv` over SSH (a child of this operation)."""
    from tui.core import procs
    from tui.core.storage.remote import ssh_target

    target = ssh_target(hv.uri)
    if target is None:
        # No SSH (TLS, TCP): libvirt has no lock API, so only the processes of this machine
        # serialise (README, "What virtdeck guarantees").
        return None
    paths = list(dict.fromkeys(reversed(paths)))[:REMOTE_MAX]  # bases first
    argv = target.argv(["sh", "-c", _REMOTE_LOCK, "sh", str(max(1, int(timeout))), *paths])
    proc = procs.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout + 30
    while True:
        try:
            check_cancelled()
        except BaseException:
            _let_go(proc)
            raise
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline().strip()
            if line == "locked":
                return proc
            break
        if time.monotonic() > deadline:
            break
    _let_go(proc)
    err = (proc.stderr.read() or "").strip().splitlines()
    where = f"{', '.join(sorted(paths))} on {target.host}"
    if proc.returncode == 1:  # flock -w timed out
        raise OperationError(
            f"another virtdeck operation has held {where} for more than {timeout:g} s; "
            "nothing was changed (try again when it has finished)"
        )
    raise OperationError(
        f"cannot lock {where} over SSH ({err[-1] if err else f'exit {proc.returncode}'}); "
        "nothing was changed"
    )


def _let_go(proc: subprocess.Popen[str]) -> None:
    from tui.core import procs

    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    procs.finish(proc)


def _acquire(key: str, timeout: float) -> None:
    held = _held()
    if key in held:
        fd, depth = held[key]
        held[key] = (fd, depth + 1)
        return
    directory = _private_dir(lock_dir())
    name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(directory / name, flags, 0o600)
    except OSError as err:
        raise OperationError(f"cannot open the lock of {key.split(':', 1)[1]}: {err}") from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OperationError(f"cannot lock {key.split(':', 1)[1]}: {err}") from None
            check_cancelled()
            if time.monotonic() > deadline:
                raise OperationError(
                    f"another virtdeck operation has held {key.split(':', 1)[1]} for more than "
                    f"{timeout:g} s; nothing was changed (try again when it has finished)"
                )
            time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
    held[key] = (fd, 1)


def _release(key: str) -> None:
    held = _held()
    fd, depth = held[key]
    if depth > 1:
        held[key] = (fd, depth - 1)
        return
    del held[key]
    os.close(fd)  # drops the flock


# -- a base with dependents is immutable -----------------------------------------------------


#: A graph read for a planner's check serves the next plans this long (a group plans each
#: member: one read, not one per member). Executors never use it.
PLAN_GRAPH_TTL = 2.0
_plan_graphs: dict[str, tuple[float, Any]] = {}


def _plan_graph(hv: Hypervisor) -> Any:
    from tui.core.snapshots import common

    now = time.monotonic()
    cached = _plan_graphs.get(hv.uri)
    if cached is not None and now - cached[0] < PLAN_GRAPH_TTL:
        return cached[1]
    g = common.graph(hv)
    _plan_graphs[hv.uri] = (now, g)
    return g


def dependents(
    hv: Hypervisor, domain: str, *, current: bool = False, planning: bool = False
) -> list[str]:
    """Other domains, undefined templates' backups and loose overlays whose chains hold an
    image of `domain`: its disks, and (unless `current`) the images and overlays its
    snapshots name."""
    from tui.core.snapshots import common
    from tui.core.snapshots.tree import snapshot_tree

    try:
        tree = snapshot_tree(hv, domain)
    except OperationError:
        return []  # a driver without snapshots has nothing to write into a base
    paths = common.own_image_paths(hv, domain)
    if not current:
        paths += [x for n in tree.nodes for d in n.disks for x in (d.image, d.overlay) if x]
    g = _plan_graph(hv) if planning else None
    return common.used_elsewhere(hv, domain, tree, paths, g)


def is_template(hv: Hypervisor, domain: str) -> bool:
    """Read now from the definition (not an inventory): a template made a moment ago counts."""
    from tui.core import domxml

    if not hv.exists(domain):
        return False
    return domxml.read_meta(domxml.parse(hv.xml(domain, inactive=True))).role == "template"


@contextlib.contextmanager
def snapshot_guard(hv: Hypervisor, domain: str, verb: str, *, internal: bool) -> Iterator[None]:
    """For a snapshot operation's execution: hold the locks of the domain's image families for
    the block, and refuse `verb` again under them if it would write a base others read (a
    clone or a template made since the plan counts)."""
    from tui.core.snapshots import common

    with family_lock(hv, common.own_image_paths(hv, domain)):
        refuse_base_write(hv, domain, verb, internal=internal, executing=True)
        yield


def refuse_base_write(
    hv: Hypervisor, domain: str, verb: str, *, internal: bool, executing: bool = False
) -> None:
    """Refuse `verb`, a snapshot operation, that would write a base others read.

    A template's images are read-only bases: every snapshot operation of a template is
    refused (an internal one writes the base; an external one would leave the template on a
    writable overlay that later clones build on; reverting or deleting one replaces or merges
    the files its clones read). Of any other domain, an `internal` operation writes its disks
    in place: refused when other domains or overlays build on them. (External snapshots of
    such a domain leave the files others read as they are; their revert and delete keep what
    others need, tui.core.snapshots.common.used_elsewhere.)

    `executing` (the executor's re-check, under the lock): whether the domain is a template is
    read again; its other dependents are not: virtdeck makes dependents only of templates
    (`clone`), so what the plan saw stands (another tool takes no lock anyway).
    """
    if is_template(hv, domain):
        users = dependents(hv, domain)
        clones = f"its clones read them: {', '.join(users)}" if users else "clones build on them"
        raise DependencyError(
            f"{verb} of '{domain}' refused: it is a template, its images are read-only bases "
            f"and {clones}; nothing was changed (to change a template, make a new one from a "
            "full clone of it)"
        )
    if not internal or executing:
        return
    users = dependents(hv, domain, current=True, planning=True)
    if not users:  # on shared storage, a domain of another host may build on its disks
        from tui.core.snapshots import common

        own = common.own_image_paths(hv, domain)
        users = list(ask_others(hv, own, other_hosts(hv), domain=domain).users)
    if users:
        raise DependencyError(
            f"{verb} of '{domain}' refused: {', '.join(users)} build on its disks, which an "
            "internal snapshot writes in place; nothing was changed (take an --external one)"
        )


def image_users(hv: Hypervisor, domain: str, images: Iterable[str]) -> list[str]:
    """Other domains (and undefined templates' backups) of `hv` that use one of `images` as
    their disk or build on it, described."""
    from tui.core.catalog import storage_graph

    images = [p for p in images if p]
    if not images:
        return []
    graph = storage_graph(hv)
    out = []
    for u in graph.users(images, exclude=domain):
        how = "uses it as its disk" if u.how == "disk" else "builds on it"
        out.append(f"{u} ({how}: {u.image})")
    return sorted(dict.fromkeys(out))


def refuse_shared_template(hv: Hypervisor, vm: str, images: Iterable[str]) -> None:
    """`template create` makes the VM's images read-only bases (and seals them): refuse a VM
    with snapshots (reverting or deleting one writes the base) or whose images another
    domain uses."""
    from tui.core.snapshots.tree import snapshot_tree

    try:
        names = sorted(snapshot_tree(hv, vm).names)
    except OperationError:
        names = []  # a driver without snapshots
    if names:
        raise DependencyError(
            f"'{vm}' has snapshots ({', '.join(names)}): a template's base must never change "
            "under its clones, and reverting or deleting a snapshot writes it; delete them "
            f"first ('virtdeck snapshot delete {vm} NAME'); nothing was changed"
        )
    images = list(images)
    users = image_users(hv, vm, images)
    users += list(ask_others(hv, images, other_hosts(hv), domain=vm).users)
    if users:
        raise DependencyError(
            f"'{vm}' cannot become a template: its images would become read-only (and be "
            f"sealed) under other domains: {'; '.join(users)}; nothing was changed"
        )


# -- dependents on other hosts (shared storage) ----------------------------------------------

#: File systems other machines may see too (a file there may have users on other hosts).
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "ceph", "fuse.cephfs", "glusterfs", "fuse.glusterfs",
     "ocfs2", "gfs2", "lustre", "beegfs", "fuse.sshfs", "9p", "virtiofs"}
)  # fmt: skip

_peers: dict[str, Hypervisor] = {}  # saved hosts connected for these checks, by URI
# Hosts an operation was given (the CLI's -c, the dashboard's): its execution, and later
# plans in the same process, ask them too while they are connected.
_given: weakref.WeakValueDictionary[str, Hypervisor] = weakref.WeakValueDictionary()
_why: dict[str, str] = {}  # why a saved host could not be connected, by URI
_tried: dict[str, float] = {}  # when a saved host last failed to connect (monotonic)


@dataclass(frozen=True)
class Others:
    """What the other hosts say about some images: who reads them, which hosts see the same
    storage, and which hosts could not be asked (with the reason)."""

    users: tuple[str, ...] = ()  # "domain (on URI)"
    shared: tuple[str, ...] = ()  # URIs of hosts that see the same files
    unasked: tuple[tuple[str, str], ...] = ()  # (URI, why) of hosts that may see them

    def notes(self, force: bool) -> list[str]:
        out = []
        if self.shared:
            out.append(f"shared storage: also seen by {', '.join(self.shared)}")
        for uri, why in self.unasked:
            if force:
                out.append(f"--force: not asked whether {uri} reads these files ({why})")
            else:
                out.append(f"not asked: {uri} ({why})")
        return out


def _local_uri(hv: Hypervisor) -> bool:
    """A host of this machine: proved over its connection, or (not connected) by its URI."""
    if hv.alive:
        return bool(hv.local)
    parts = urlsplit(hv.uri)
    return not parts.hostname and "+" not in parts.scheme


def network_fs(path: str) -> str | None:
    """The type of the network file system `path` of this machine is on, if it is on one."""
    try:
        real = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, fields[2]
        return kind if kind in NETWORK_FS else None
    except OSError:
        return None


def ask_too(hvs: Iterable[Hypervisor]) -> None:
    """Hosts this process is connected to (the CLI's -c): asked too, while connected."""
    _given.update({h.uri: h for h in hvs})


def other_hosts(hv: Hypervisor, connected: Iterable[Hypervisor] = ()) -> list[Hypervisor]:
    """Every host to ask besides `hv`: the connected ones, and the saved hosts of
    config.toml (connected now, within the connect deadline; kept for the next question)."""
    from tui.core.fleet import connect_all
    from tui.core.settings import load_settings

    connected = list(connected)
    _given.update({h.uri: h for h in connected})
    out = {h.uri: h for h in list(_given.values()) if h.uri != hv.uri and h.alive}
    out.update({h.uri: h for h in connected if h.uri != hv.uri})
    try:
        settings = load_settings()
    except Exception:  # noqa: BLE001 - a broken config is reported where it is loaded
        settings = None
    if settings is not None:
        wanted = [h.uri for h in settings.hosts if h.uri != hv.uri and h.uri not in out]
        now = time.monotonic()
        new = [
            u
            for u in wanted
            if (u not in _peers or not _peers[u].alive) and now - _tried.get(u, -1e9) > 60
        ]
        if new:  # a host that did not answer is tried again a minute later, not every time
            hvs, failures = connect_all(new, timeout=settings.connect_timeout)
            _peers.update({h.uri: h for h in hvs})
            _why.update(failures)
            _tried.update({u: now for u in failures})
        out.update({u: _peers[u] for u in wanted})
    return list(out.values())


def ask_others(
    hv: Hypervisor, images: Iterable[str], others: Iterable[Hypervisor], *, domain: str = ""
) -> Others:
    """Ask every other host whether a domain (or a template backup) there reads one of
    `images` of `hv`, by the image's identity: on a host of this machine its real path (the
    same file, proven), elsewhere its path (on shared storage the same path is the same
    file; a host whose storage is not shared never has a user of it, so nothing is lost by
    asking). `domain` (of `hv`) is not its own user where another URI reaches the same daemon:
    a domain there with its UUID is the same domain."""
    from tui.core.catalog import storage_graph

    images = [p for p in images if p and p.startswith("/")]
    if not images:
        return Others()
    here_local = _local_uri(hv)
    netfs = next((fs for p in images if here_local and (fs := network_fs(p))), None)
    users: list[str] = []
    shared: list[str] = []
    unasked: list[tuple[str, str]] = []
    for other in others:
        same_machine = here_local and _local_uri(other)
        may_share = same_machine or netfs is not None
        if not other.alive:
            if may_share:
                unasked.append((other.uri, _why.get(other.uri, "not connected")))
            continue
        try:
            graph = storage_graph(other)
        except Exception as err:  # noqa: BLE001 - any failure means: could not be asked
            if may_share:
                unasked.append((other.uri, str(err)))
            continue
        if graph.problems and not graph.resolver.reads_host and may_share:
            unasked.append((other.uri, graph.problems[0]))
            continue
        found = graph.users(images)
        if domain and found and _same_daemon(hv, other):
            uuid = _uuid(hv, domain)
            found = [u for u in found if not (u.defined and uuid and _uuid(other, u.name) == uuid)]
        users += [f"{u} (on {other.uri})" for u in found]
        if same_machine or found:
            shared.append(other.uri)
    return Others(tuple(dict.fromkeys(users)), tuple(shared), tuple(unasked))


def _same_daemon(hv: Hypervisor, other: Hypervisor) -> bool:
    """Two URIs of one daemon: the same host name and the very same domains (by UUID). Two
    daemons of one machine (or two hosts with copied definitions) differ in their domains."""

    def facts(h: Hypervisor) -> tuple[str, set[str]]:
        name = str(h.call(h.conn.getHostname, what="host name"))
        doms = h.call(h.conn.listAllDomains, 0, what="listing domains")
        return name, {str(d.UUIDString()) for d in doms}

    try:
        (name, mine), (their_name, theirs) = facts(hv), facts(other)
    except VirtdeckError:
        return False
    # Domains defined or undefined between the two reads (another client at work) are
    # tolerated; two daemons, even of one machine, differ in most of their domains.
    return name == their_name and len(mine ^ theirs) * 10 <= len(mine | theirs)


def _uuid(hv: Hypervisor, name: str) -> str | None:
    try:
        return str(hv.call(hv.lookup(name).UUIDString, what=name))
    except VirtdeckError:
        return None


def refuse_other_users(what: str, others: Others, *, force: bool) -> None:
    """Refuse when a domain on another host reads the images, or (without `force`) when a
    host that may see them could not be asked."""
    if others.users:
        raise DependencyError(
            f"{what}: {len(others.users)} domain(s) on other hosts depend on its image(s) "
            f"(shared storage): {', '.join(others.users)}; nothing was changed"
        )
    if others.unasked and not force:
        uri, why = others.unasked[0]
        raise DependencyError(
            f"{what}: its image(s) are on storage {uri} may share, and it could not be asked "
            f"whether a domain there reads them ({why}); nothing was changed (--force to "
            "delete anyway)"
        )


def shared_storage(
    hvs: Iterable[Hypervisor], images: dict[str, Iterable[str]]
) -> dict[str, dict[str, tuple[str, ...]]]:
    """For `usage`: host URI -> {image path -> why it is on shared storage}, for the images
    (`images`: host URI -> paths) that another of `hvs` also uses (the same file on this
    machine, the same path elsewhere), or that lie on a network file system here."""
    hosts = {h.uri: h for h in hvs}
    keys: dict[str, dict[str, str]] = {}
    for uri, paths in images.items():
        hv = hosts.get(uri)
        if hv is None:
            continue
        local = _local_uri(hv)
        keys[uri] = {
            p: ("local:" + os.path.realpath(p)) if local else os.path.normpath(p)
            for p in paths
            if p.startswith("/")
        }
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for uri, by_path in keys.items():
        found: dict[str, tuple[str, ...]] = {}
        for path, key in by_path.items():
            why = [f"also used on {o}" for o, theirs in keys.items() if o != uri and key in
                   theirs.values()]  # fmt: skip
            fs = network_fs(path) if key.startswith("local:") else None
            if fs:
                why.append(f"on {fs}")
            if why:
                found[path] = tuple(why)
        if found:
            out[uri] = found
    return out


def recover(hv: Hypervisor, item: Any, skipped: list[str] | None = None) -> list[str]:
    """`ops.recover` under the locks of the image families its journal names (the files it
    would delete or give their mode back), like the operation it rolls back."""
    from tui.core import ops

    paths = [str(a.args["path"]) for a in item.undo if isinstance(a.args.get("path"), str)]
    with family_lock(hv, paths):
        return ops.recover(hv, item, skipped)
