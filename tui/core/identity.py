"""Clones with their own identity: a hostname, SSH keys and first-boot commands per clone.

`Identity` is what the operator asked for (a hostname template such as `{name}`, the SSH
public keys read and checked when it is made, first-boot commands); `plan_clone` turns it
into one `Customisation` per clone (the hostname filled in, the clone's own disk images) and
`customise_all` runs them with virt-customize, one child per clone, in parallel (twice the
cores, as many as the available memory holds: `default_workers`).

virt-customize writes only to the images it is given: the clone's own overlay or copy. The
template's base is opened read-only by qemu through the overlay's backing chain, so its
bytes never change. It runs on this machine (`LIBGUESTFS_BACKEND=direct`, retried under TCG
when the appliance does not start under KVM, as virt-sysprep is): a clone on another host,
or with a disk that is not an image file, is refused when planning.

The default (`hostname_by_default`, what `virtdeck clone` and the deploy form start from):
each clone's hostname becomes its domain name when the template was sealed and its first
disk shows an operating system (a partition table or a filesystem in its first 4 KiB, read
read-only with qemu-io). A template without an OS (a blank disk) keeps its hostname, since
virt-customize refuses a disk where it finds no OS; SSH keys and first-boot commands are
only ever written when asked for.

Under TCG (these machines) one customisation of a small Debian guest takes 35-50 s; three
on 2 cores take about 76 s all at once, 110 s two at a time, 150 s one after another
(benchmarks/bench_identity.py).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui.core import cancel, private, procs
from tui.core.cancel import Interrupted, cancelled, check_cancelled
from tui.core.errors import InvalidInputError, OperationError
from tui.core.progress import Progress
from tui.core.storage.qemuimg import last_line, read_head
from tui.core.templates import LineRunner, run_guestfs

DEFAULT_HOSTNAME = "{name}"
BINARY = "virt-customize"
VIRT_CUSTOMIZE, CLOUD_INIT, AUTO = "virt-customize", "cloud-init", "auto"
METHODS = (VIRT_CUSTOMIZE, CLOUD_INIT)  # what an operator names; AUTO: the template's own


class IdentityError(InvalidInputError):
    """A bad identity option (a key file, a hostname template, a host that cannot take it):
    a usage error, which the CLI reports with exit status 2."""


# -- what the operator asks for --------------------------------------------------------------

_KEY_TYPES = {
    "ssh-ed25519": "ed25519",
    "ssh-rsa": "rsa",
    "ecdsa-sha2-nistp256": "ecdsa",
    "ecdsa-sha2-nistp384": "ecdsa",
    "ecdsa-sha2-nistp521": "ecdsa",
    "sk-ssh-ed25519@openssh.com": "ed25519-sk",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ecdsa-sk",
}
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class SshKey:
    user: str
    key: str  # one authorized_keys line: "ssh-ed25519 AAAA... comment"
    source: str  # the file it was read from

    @property
    def kind(self) -> str:
        return _KEY_TYPES.get(self.key.split()[0], self.key.split()[0])

    @property
    def comment(self) -> str:
        parts = self.key.split(None, 2)
        return parts[2] if len(parts) > 2 else ""

    def line(self) -> str:
        tail = self.comment or "…" + self.key.split()[1][-8:]
        return f"ssh key for {self.user} ({self.kind} {tail})"


#: A public key file is a few hundred bytes; an authorized_keys list of many keys stays far
#: below this. Anything bigger is refused before it is read.
MAX_KEY_FILE_BYTES = 1 << 20


def read_ssh_keys(path: str | Path, user: str = "root") -> tuple[SshKey, ...]:
    """Every public key in an OpenSSH public key file (`id_ed25519.pub` or an
    authorized_keys-style list), checked; one IdentityError line names what is wrong."""
    if not _USER.match(user):
        raise IdentityError(f"--ssh-user {user!r} is not a valid user name")
    try:
        text = private.read_bounded(path, MAX_KEY_FILE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise IdentityError(f"--ssh-key {path}: no such file") from None
    except IsADirectoryError:
        raise IdentityError(f"--ssh-key {path}: is a directory, not a key file") from None
    except UnicodeDecodeError:
        raise IdentityError(f"--ssh-key {path}: not a text file (give the .pub file)") from None
    except ValueError as err:
        raise IdentityError(f"--ssh-key {path}: {err}; give the .pub file") from None
    except OSError as err:
        raise IdentityError(f"--ssh-key {path}: cannot read it: {err.strerror}") from None
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "PRIVATE KEY" in line:
            raise IdentityError(f"--ssh-key {path} is a private key: give the .pub file")
        parts = line.split(None, 2)
        if len(parts) < 2 or parts[0] not in _KEY_TYPES:
            raise IdentityError(
                f"--ssh-key {path}, line {number}: not an OpenSSH public key "
                f"(expected e.g. 'ssh-ed25519 AAAA... comment')"
            )
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            blob = b""
        # The key's own wire format starts with its type name (RFC 4253, 6.6).
        name = parts[0].encode()
        if blob[:4] != len(name).to_bytes(4, "big") or blob[4 : 4 + len(name)] != name:
            raise IdentityError(
                f"--ssh-key {path}, line {number}: the {parts[0]} key data is damaged"
            )
        keys.append(SshKey(user, " ".join(parts), str(path)))
    if not keys:
        raise IdentityError(f"--ssh-key {path}: the file holds no public key")
    return tuple(keys)


def check_hostname_template(template: str) -> str:
    """A hostname template's placeholders are {name} (the clone's name) and {n} (its number)."""
    try:
        template.format(name="x", n=1)
    except (KeyError, IndexError, ValueError) as err:
        raise IdentityError(
            f"--hostname-template {template!r}: only {{name}} and {{n}} can be filled in "
            f"({type(err).__name__}: {err})"
        ) from None
    if not template.strip():
        raise IdentityError("--hostname-template is empty (use --keep-hostname to keep it)")
    return template


def check_hostname(hostname: str, clone: str) -> str:
    labels = hostname.split(".")
    if len(hostname) > 253 or not all(_LABEL.match(label) for label in labels):
        raise IdentityError(
            f"hostname {hostname!r} for '{clone}' is not a valid host name (letters, digits "
            "and inner hyphens, dot-separated, 63 per label); choose --hostname-template or "
            "--keep-hostname"
        )
    return hostname


def check_first_boot(command: str) -> str:
    if not command.strip():
        raise IdentityError("--first-boot is empty: give the command to run")
    if "\n" in command or "\r" in command:
        raise IdentityError("--first-boot takes one line: repeat the option for more commands")
    return command


@dataclass(frozen=True)
class Identity:
    """What clones get of their own: nothing unless asked (the Python default)."""

    hostname: str | None = None  # a template ({name}, {n}); None: see hostname_by_default
    hostname_by_default: bool = False  # hostname None: {name} when the template has an OS
    ssh_keys: tuple[SshKey, ...] = ()
    first_boot: tuple[str, ...] = ()
    # How it is given: written into the disk (virt-customize), or a cloud-init NoCloud seed
    # per clone (tui.core.cloudinit: milliseconds, any host); the options below need a seed.
    method: str = VIRT_CUSTOMIZE
    ip: str | None = None  # --ip 10.0.0.10/24 (one clone) or 10.0.0.10/24+ (consecutive)
    gateway: str | None = None
    dns: tuple[str, ...] = ()
    user_data: str | None = None  # the operator's own user-data, read and checked

    @classmethod
    def from_options(
        cls,
        *,
        hostname_template: str | None = None,
        keep_hostname: bool = False,
        ssh_key_files: Sequence[str | Path] = (),
        ssh_user: str = "root",
        first_boot: Sequence[str] = (),
        method: str | None = "virt-customize",
        ip: str | None = None,
        gateway: str | None = None,
        dns: Sequence[str] = (),
        user_data: str | None = None,
    ) -> Identity:
        """The identity the CLI options (or the deploy form) ask for, checked now: a key
        file is read here, so a bad one stops the plan before anything is looked up."""
        if keep_hostname and hostname_template is not None:
            raise IdentityError(
                "--keep-hostname and --hostname-template contradict each other; choose one"
            )
        keys = tuple(k for f in ssh_key_files for k in read_ssh_keys(f, ssh_user))
        if ssh_user != "root" and not ssh_key_files:
            raise IdentityError("--ssh-user needs --ssh-key (the key to give that user)")
        if method is None:
            method = AUTO  # the template says (an imported cloud image: cloud-init)
        elif method not in METHODS:
            raise IdentityError(f"--identity {method!r}: choose {' or '.join(METHODS)}")
        seed_only = [o for o, v in (("--ip", ip), ("--gateway", gateway), ("--dns", dns),
                                    ("--user-data", user_data)) if v]  # fmt: skip
        if seed_only and method == VIRT_CUSTOMIZE:
            raise IdentityError(
                f"{', '.join(seed_only)} go in a cloud-init seed: add --identity cloud-init"
            )
        if (gateway or dns) and not ip:  # (with AUTO, plan_clone checks the template's way)
            raise IdentityError("--gateway and --dns go with a static address: add --ip")
        return cls(
            hostname=None
            if hostname_template is None
            else check_hostname_template(hostname_template),
            hostname_by_default=not keep_hostname and hostname_template is None,
            ssh_keys=keys,
            first_boot=tuple(check_first_boot(c) for c in first_boot),
            method=method,
            ip=ip,
            gateway=gateway,
            dns=tuple(dns),
            user_data=user_data,
        )

    @property
    def explicit(self) -> bool:
        """Something is asked for that must be done (or refused), not just a default."""
        return self.hostname is not None or bool(self.ssh_keys or self.first_boot)


@dataclass(frozen=True)
class Customisation:
    """What virt-customize writes into one clone's own disk images."""

    images: tuple[tuple[str, str], ...]  # (path, format) of the clone's own images
    hostname: str | None
    ssh_keys: tuple[SshKey, ...] = ()
    first_boot: tuple[str, ...] = ()
    hostname_why: str = ""  # said once in the plan: where a default hostname comes from

    def line(self) -> str:
        parts = []
        if self.hostname is not None:
            parts.append(f"hostname {self.hostname}")
        parts.extend(k.line() for k in self.ssh_keys)
        parts.extend(f"first boot: {c}" for c in self.first_boot)
        return "; ".join(parts)

    def argv(self, key_dir: str) -> list[str]:
        """virt-customize's arguments; keys are handed over as files in `key_dir`."""
        argv = ["env", "LIBGUESTFS_BACKEND=direct", BINARY]
        for path, fmt in self.images:
            argv += ["--format", fmt, "-a", path]
        if self.hostname is not None:
            argv += ["--hostname", self.hostname]
        for i, key in enumerate(self.ssh_keys):
            argv += ["--ssh-inject", f"{key.user}:file:{os.path.join(key_dir, f'key{i}.pub')}"]
        for command in self.first_boot:
            argv += ["--firstboot-command", command]
        return argv

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [list(i) for i in self.images],
            "hostname": self.hostname,
            "ssh_keys": [{"user": k.user, "key": k.key, "source": k.source} for k in self.ssh_keys],
            "first_boot": list(self.first_boot),
        }


# -- at plan time ------------------------------------------------------------------------------

#: Where a partition table or a filesystem says "there is an OS here" in the first 4 KiB.
_SIGNATURES = (
    (510, b"\x55\xaa"),  # MBR (and the protective MBR of GPT)
    (512, b"EFI PART"),  # GPT
    (1080, b"\x53\xef"),  # ext2/3/4 superblock magic
    (0, b"XFSB"),  # XFS
    (536, b"LVM2 001"),  # an LVM physical volume
)


def looks_like_os(head: bytes) -> bool:
    return any(head[at : at + len(magic)] == magic for at, magic in _SIGNATURES)


def disk_has_os(path: str, fmt: str) -> bool:
    """Whether a disk shows a partition table or a filesystem; a blank disk has no OS."""
    try:
        return looks_like_os(read_head(path, fmt))
    except OperationError:
        return False


def hostname_default(
    sealed: bool, first_disk: tuple[str, str] | None, local: bool
) -> tuple[bool, str]:
    """Whether the default hostname ({name}) applies, and the plan's word on it."""
    if not sealed or first_disk is None:
        return False, ""  # an unsealed template's clones share its identity (a warning says)
    if not local:
        return False, "hostname kept: renaming needs the clones' image files on this machine"
    if not disk_has_os(*first_disk):
        return False, "hostname kept: the template's disk shows no OS for virt-customize"
    return True, "the template is sealed and has an OS; --keep-hostname keeps its own"


def require_tool() -> None:
    if shutil.which(BINARY) is None:
        raise OperationError(
            f"{BINARY} is not installed (apt-get install guestfs-tools, or libguestfs-tools "
            "on older releases); clone without --ssh-key/--first-boot/--hostname-template"
        )


# -- running ---------------------------------------------------------------------------------


@dataclass
class _Children:
    """The children of one parallel run, so a failure in one ends the others."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, proc: subprocess.Popen[str]) -> None:
        with self.lock:
            self.procs.append(proc)
            if self.stopped.is_set():
                cancel.kill_child(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
            for proc in self.procs:
                cancel.kill_child(proc)


class Customiser:
    """virt-customize with an injectable runner (a test forces its failure)."""

    def __init__(self, runner: LineRunner | None = None) -> None:
        self.runner = runner

    def customise(
        self, clone: str, c: Customisation, progress: Progress, children: _Children | None = None
    ) -> float:
        """Customise one clone's images; returns the seconds it took."""
        group = children or _Children()

        def run(argv: Sequence[str], on_line: Callable[[str], None]) -> int:
            if group.stopped.is_set():
                raise _Stopped
            if self.runner is not None:
                return self.runner(argv, on_line)
            # (virt-customize's presence is checked when planning: require_tool)
            return procs.stream(argv, on_line, on_start=group.add)

        started = time.monotonic()
        key_dir = _key_dir(c)
        try:
            argv = c.argv(key_dir)
            status, lines = run_guestfs(run, argv, progress=progress, label=f"{clone}: customise")
        finally:
            _remove_key_dir(key_dir)
        if status != 0:
            if group.stopped.is_set():
                raise _Stopped
            raise OperationError(
                f"customising '{clone}' failed (virt-customize exit {status}): "
                f"{last_line(chr(10).join(lines))}"
            )
        return time.monotonic() - started


class _Stopped(Exception):
    """Another clone's customisation failed first: this one was ended."""


def _key_dir(c: Customisation) -> str:
    directory = tempfile.mkdtemp(prefix="virtdeck-keys-")
    for i, key in enumerate(c.ssh_keys):
        fd = os.open(os.path.join(directory, f"key{i}.pub"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)  # fmt: skip
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(key.key + "\n")
    return directory


def _remove_key_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


APPLIANCE_BYTES = 1280 * 1024**2  # libguestfs' appliance VM memory (its default memsize)


def default_workers() -> int:
    """How many customisations run at once: twice the cores (an appliance under TCG waits on
    I/O as much as it computes: measured, 3 clones on 2 cores took 76 s all at once, 110 s two
    at a time), and no more appliances than the available memory holds."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError):
        return cores
    return max(1, min(2 * cores, avail // APPLIANCE_BYTES))


def customise_all(
    work: Sequence[tuple[str, Customisation]],
    progress: Progress,
    *,
    customiser: Customiser | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """Customise every clone, `default_workers()` at once. The first failure ends the others and is
    raised; an interrupt (cancel()) kills every child and raises Interrupted. Returns the
    seconds each took."""
    customiser = customiser or Customiser()
    limit = max(1, min(workers or default_workers(), len(work)))
    children = _Children()
    took: dict[str, float] = {}

    def one(name: str, c: Customisation) -> None:
        progress(f"{name}: customising ({c.line()})", None)
        took[name] = customiser.customise(name, c, progress, children)
        progress(f"{name}: customised in {took[name]:.0f} s", None)

    with concurrent.futures.ThreadPoolExecutor(limit, thread_name_prefix="customise") as pool:
        futures = [pool.submit(one, name, c) for name, c in work]
        pending: set[concurrent.futures.Future[None]] = set(futures)
        stopping = False
        while pending:
            _, pending = concurrent.futures.wait(
                pending, timeout=0.5, return_when=concurrent.futures.FIRST_EXCEPTION
            )
            failed = any(f.done() and not f.cancelled() and f.exception() for f in futures)
            if not stopping and (failed or cancelled()):
                stopping = True  # the clones are undone anyway: end the others now
                children.stop()
                for f in pending:
                    f.cancel()
    if cancelled():
        check_cancelled()
    errors = [f.exception() for f in futures if not f.cancelled()]
    real = [e for e in errors if e is not None and not isinstance(e, _Stopped)]
    if real:
        raise next((e for e in real if isinstance(e, Interrupted)), real[0])
    return took
