#!/usr/bin/env bash
# A second libvirt for the system tests: the daemon of the *other* Debian release (trixie's
# libvirt 11 / QEMU 10 on a bookworm host, bookworm's libvirt 9 / QEMU 7.2 on a trixie host),
# so the system tier runs against both generations whatever the host is.
#
# The other release's root filesystem is built once per machine with mmdebstrap from the
# mirror the host's apt already uses, and cached outside the repository ($VIRTDECK_TEST_CACHE,
# default /var/cache/virtdeck-test/<release>-root). Its virtlogd and libvirtd run chrooted, in
# a private network namespace, with their own tmpfs /run (the host's /run/libvirt is never
# touched); the host reaches them as qemu:///system?socket=ROOT/run/libvirt/libvirt-sock.
# Image directories are bind-mounted at the same path inside, so a path names the same file
# for the client's qemu-img and for the daemon's QEMU. Lab settings (qemu.conf): QEMU as root,
# no security driver, no cgroup controllers, no namespaces.
#
#   other-libvirt.sh build    build the root unless it is cached (idempotent)
#   other-libvirt.sh start    build, mount, start the daemons (idempotent); prints the version
#   other-libvirt.sh stop     stop the daemons this script started (PID files), unmount
#   other-libvirt.sh status   running or not, and the daemon's versions; exit 1 when down
#   other-libvirt.sh uri      the URI to connect to (no root needed)
#   other-libvirt.sh release  the other release's code name
#
# $VIRTDECK_OTHER_RELEASE overrides the choice of release (e.g. to try a third one);
# $VIRTDECK_OTHER_BINDS adds colon-separated directories to bind-mount beside the images.
set -euo pipefail

PKGS=libvirt-daemon-system,qemu-system-x86,qemu-utils
CACHE=${VIRTDECK_TEST_CACHE:-/var/cache/virtdeck-test}
BINDS=(/var/lib/libvirt/images)
if [ -n "${VIRTDECK_OTHER_BINDS:-}" ]; then
  IFS=: read -r -a extra <<<"$VIRTDECK_OTHER_BINDS"
  BINDS+=("${extra[@]}")
fi
# Written into the root when it is complete; a different stamp (other packages or settings)
# means the cached root is rebuilt.
STAMP="virtdeck other-libvirt root v1: $PKGS"

die() { echo "other-libvirt: $*" >&2; exit 1; }
say() { echo "other-libvirt: $*"; }

host_release() { (. /etc/os-release && echo "${VERSION_CODENAME:-}"); }

other_release() {
  if [ -n "${VIRTDECK_OTHER_RELEASE:-}" ]; then echo "$VIRTDECK_OTHER_RELEASE"; return; fi
  local host
  host=$(host_release)
  case "$host" in
    bookworm) echo trixie ;;
    trixie) echo bookworm ;;
    *) die "no other Debian release known for this host ('${host:-no VERSION_CODENAME}' in \
/etc/os-release); set VIRTDECK_OTHER_RELEASE" ;;
  esac
}

RELEASE=$(other_release)
ROOT=$CACHE/$RELEASE-root
URI="qemu:///system?socket=$ROOT/run/libvirt/libvirt-sock"

# The mirrors the host's apt names (deb822 .sources or one-line lists): the archive that
# carries the host's release and the one that carries its security suite.
mirrors() {
  python3 - "$(host_release)" <<'EOF'
import glob, sys
host = sys.argv[1]
entries = []  # (uris, suites)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for para in open(path, encoding="utf-8").read().split("\n\n"):
        fields, key = {}, None
        for line in para.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            else:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            entries.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = line.split("#")[0].split()
        if len(words) >= 3 and words[0] == "deb":
            words = [w for w in words if not w.startswith("[")]  # [signed-by=...] options
            if len(words) >= 3:
                entries.append(([words[1]], [words[2]]))

def first(suite, default):
    for uris, suites in entries:
        if suite in suites and uris:
            return uris[0].rstrip("/")
    return default

archive = first(host, "http://deb.debian.org/debian")
print(archive)
print(first(f"{host}-security", archive + "-security"))
EOF
}

mounted() { mountpoint -q "$1"; }

# Every mount under $1, deepest first.
mounts_under() {
  awk -v p="$1" '$2 == p || index($2, p "/") == 1 {print $2}' /proc/self/mounts | sort -r
}

# Remove a directory only when nothing is mounted under it (an interrupted mmdebstrap can leave
# /dev or /proc mounted in its build directory).
remove_root() {
  local dir=$1 m
  for m in $(mounts_under "$dir"); do umount "$m" || umount -l "$m" || true; done
  [ -z "$(mounts_under "$dir")" ] || die "$dir still has mounts; not removing it"
  rm -rf --one-file-system "$dir"
}

build() {
  if [ -f "$ROOT/.virtdeck-root" ] && [ "$(cat "$ROOT/.virtdeck-root")" = "$STAMP" ]; then
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "building the $RELEASE root needs root"
  if ! command -v mmdebstrap >/dev/null; then
    say "installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends mmdebstrap >/dev/null
  fi
  mkdir -p "$CACHE"
  local d pid
  for d in "$CACHE"/."$RELEASE"-root.build.*; do  # what an interrupted build left
    [ -e "$d" ] || continue
    pid=${d##*.}
    [ -d "/proc/$pid" ] || remove_root "$d"
  done
  local archive security tmp start
  { read -r archive; read -r security; } < <(mirrors)
  tmp=$CACHE/.$RELEASE-root.build.$$
  say "building the $RELEASE root ($PKGS) from $archive, once per machine"
  start=$SECONDS
  if ! mmdebstrap --quiet --variant=apt --include="$PKGS" "$RELEASE" "$tmp" \
      "deb $archive $RELEASE main" "deb $archive $RELEASE-updates main" \
      "deb $security $RELEASE-security main" >"$CACHE/$RELEASE-build.log" 2>&1; then
    tail -n 20 "$CACHE/$RELEASE-build.log" >&2
    remove_root "$tmp"
    die "mmdebstrap failed (log: $CACHE/$RELEASE-build.log)"
  fi
  configure "$tmp"
  echo "$STAMP" >"$tmp/.virtdeck-root"
  if [ -e "$ROOT" ]; then remove_root "$ROOT"; fi  # a root with another stamp
  mv "$tmp" "$ROOT"
  say "built $ROOT in $((SECONDS - start)) s ($(du -sh "$ROOT" | cut -f1))"
}

# Lab settings; a test machine, not a production hypervisor.
configure() {
  local root=$1
  cat >>"$root/etc/libvirt/qemu.conf" <<'EOF'

# virtdeck test daemon (scripts/other-libvirt.sh): QEMU as root, no confinement.
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
  cat >>"$root/etc/libvirt/libvirtd.conf" <<'EOF'

# virtdeck test daemon (scripts/other-libvirt.sh)
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  # The default network would want dnsmasq and a bridge; the tests use user networking.
  rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"
}

pid_alive() {  # pid file $1 names a live process whose root is $ROOT
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$ROOT" ]
}

running() { pid_alive "$ROOT/run/libvirtd.pid"; }

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

version() {
  local out
  out=$(virsh -c "$URI" version --daemon 2>/dev/null) || return 0
  echo "libvirt $(sed -n 's/^Running against daemon: //p' <<<"$out")," \
    "$(sed -n 's/^Running hypervisor: //p' <<<"$out")"

}

mount_all() {
  local b
  mounted "$ROOT/run" || mount -t tmpfs -o mode=0755,size=64m virtdeck-run "$ROOT/run"
  mounted "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mounted "$ROOT/sys" || mount --bind /sys "$ROOT/sys"
  mounted "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
  mounted "$ROOT/dev/pts" || mount --bind /dev/pts "$ROOT/dev/pts"
  for b in "${BINDS[@]}"; do
    mkdir -p "$b" "$ROOT$b"
    mounted "$ROOT$b" || mount --bind "$b" "$ROOT$b"
  done
}

unmount_all() {
  local i b
  for ((i = ${#BINDS[@]} - 1; i >= 0; i--)); do
    b=${BINDS[i]}
    if mounted "$ROOT$b"; then umount "$ROOT$b"; fi
  done
  for b in dev/pts dev sys proc run; do  # dev/pts before dev
    if mounted "$ROOT/$b"; then umount "$ROOT/$b"; fi
  done
}

start() {
  [ "$(id -u)" -eq 0 ] || die "starting the $RELEASE daemon needs root"
  build
  if running && answers; then
    say "already running: $(version)"
    return
  fi
  local t0=$SECONDS
  mount_all
  mkdir -p "$ROOT/run/libvirt"
  # A private network namespace with loopback up (VNC listens on 127.0.0.1), then the
  # daemons chrooted; they daemonise and write their PID files into the private /run. They
  # must not inherit the lock (fd 9).
  unshare --net -- sh -c 'ip link set lo up && exec chroot "$1" /bin/sh -c \
    "/usr/sbin/virtlogd --daemon && /usr/sbin/libvirtd --daemon"' sh "$ROOT" 9>&-
  local _
  for _ in $(seq 300); do  # the first start probes QEMU's capabilities (~10 s)
    answers && break
    sleep 0.2
  done
  answers || {
    tail -n 5 "$ROOT/var/log/libvirt/libvirtd.log" >&2 2>/dev/null || true
    die "the $RELEASE libvirtd did not answer on $URI"
  }
  say "started in $((SECONDS - t0)) s: $(version)"
}

# What the chrooted daemons left running (QEMU, a daemon that ignored SIGTERM), by PID: only
# processes whose root is ours and whose program is the root's QEMU or daemons.
chroot_pids() {
  local p exe
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] || continue
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$exe" in
      "$ROOT"/usr/bin/qemu-system-* | "$ROOT"/usr/sbin/libvirtd | "$ROOT"/usr/sbin/virtlogd)
        echo "${p#/proc/}" ;;
    esac
  done
  return 0
}

stop() {
  [ "$(id -u)" -eq 0 ] || die "stopping the $RELEASE daemon needs root"
  if running && answers; then  # domains left running would keep the mounts busy
    local dom
    for dom in $(virsh -c "$URI" list --name 2>/dev/null); do
      virsh -c "$URI" destroy "$dom" >/dev/null 2>&1 || true
    done
  fi
  local f pid
  for f in "$ROOT/run/libvirtd.pid" "$ROOT/run/virtlogd.pid"; do
    if pid_alive "$f"; then
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null
    fi
  done
  for pid in $(chroot_pids); do kill -9 "$pid" 2>/dev/null || true; done
  unmount_all
  say "stopped"
}

status() {
  if running && answers; then
    say "$RELEASE daemon running: $(version)"
    echo "uri: $URI"
  else
    say "$RELEASE daemon not running (root $ROOT $([ -f "$ROOT/.virtdeck-root" ] &&
      echo cached || echo 'not built'))"
    return 1
  fi
}

cmd=${1:-status}
case "$cmd" in
  uri) echo "$URI" ;;
  release) echo "$RELEASE" ;;
  build | start | stop)
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.$RELEASE.lock"
    flock 9  # one start or stop at a time (several test runs may share the daemon)
    "$cmd"
    ;;
  status) status ;;
  *) die "usage: other-libvirt.sh build|start|stop|status|uri|release" ;;
esac
