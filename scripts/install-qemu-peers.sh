#!/usr/bin/env bash
# Install the two real QEMU builds that livemig's interoperability tests run against:
#
#   QEMU 7.2   Debian 12 (bookworm) main, installed normally:
#                qemu-system-x86_64 --version                    -> 7.2.x
#   QEMU 10.0  bookworm-backports, *unpacked* (not installed, so it cannot replace 7.2)
#              under $QEMU10_PREFIX (default /opt/qemu-10.0) and started through a wrapper:
#                /opt/qemu-10.0/bin/qemu-system-x86_64 --version -> 10.0.x
#
# Needs root and network access to the Debian archive. Safe to run again: each part is
# skipped when the binary already reports the right version. Any failure stops the script
# with a message saying what went wrong; it ends by printing both versions.
set -Eeuo pipefail

PREFIX="${QEMU10_PREFIX:-/opt/qemu-10.0}"
WRAPPER="$PREFIX/bin/qemu-system-x86_64"
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

die() {
  echo "install-qemu-peers: ERROR: $*" >&2
  exit 1
}
trap 'die "command failed (exit status $?) at line $LINENO: $BASH_COMMAND"' ERR

log() { echo "install-qemu-peers: $*" >&2; }

# Run a command quietly; show its whole output if it fails.
quiet() {
  local out
  out="$(mktemp)"
  if ! "$@" >"$out" 2>&1; then
    cat "$out" >&2
    rm -f "$out"
    die "failed: $*"
  fi
  rm -f "$out"
}

# "7.2" for a binary printing "QEMU emulator version 7.2.22 (...)"; empty if it cannot run.
qemu_version() {
  { "$1" --version 2>/dev/null || true; } \
    | sed -n '1s/^QEMU emulator version \([0-9]*\.[0-9]*\).*/\1/p'
}

APT_UPDATED=0
apt_update() {
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    quiet apt-get update
    APT_UPDATED=1
  fi
}

apt_install() {
  apt_update
  log "apt-get install $*"
  quiet apt-get install -y --no-install-recommends "$@"
}

is_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# --- preconditions ---------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
  || die "needs a Debian system (apt-get and dpkg-deb not found)"
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[ "$codename" = bookworm ] \
  || die "expects Debian 12 (bookworm); this system is '${codename:-unknown}'"

# --- QEMU 7.2 from bookworm main ---------------------------------------------------------------
v72="$(qemu_version qemu-system-x86_64)"
if [ -z "$v72" ]; then
  # Backports are pinned low by default, so this takes the bookworm main package.
  apt_install qemu-system-x86 qemu-utils
  hash -r
  v72="$(qemu_version qemu-system-x86_64)"
fi
[ "$v72" = 7.2 ] || die "qemu-system-x86_64 on PATH ($(command -v qemu-system-x86_64 || echo none)) \
reports version '${v72:-none}', expected 7.2.x from Debian 12 main"

# --- QEMU 10.0 from bookworm-backports, unpacked under $PREFIX ---------------------------------
install_qemu10() {
  local work mirror keyring ver deb missing lib
  work="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"

  apt_update   # the system's lists name the archive mirror this machine uses
  mirror="$(apt-cache policy | awk '$2 ~ /^https?:\/\// && $3 == "bookworm/main" {print $2; exit}')"
  mirror="${mirror:-http://deb.debian.org/debian}"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$keyring" ] || apt_install debian-archive-keyring
  cat >"$work/sources/backports.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: $keyring
EOF
  # A private apt configuration: its own source list, package lists and caches, so the
  # system's apt state is neither read for backports nor changed.
  local -a APT=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$work/sources"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "APT::Sandbox::User=root"
  )
  log "reading bookworm-backports from $mirror"
  quiet apt-get "${APT[@]}" update
  ver="$(apt-cache "${APT[@]}" madison qemu-system-x86 \
         | awk -F'|' '$3 ~ /bookworm-backports/ {gsub(/[[:space:]]/, "", $2); print $2; exit}')"
  case "$ver" in
    1:10.0.*) ;;
    *) die "bookworm-backports offers qemu-system-x86 '${ver:-nothing}', expected 1:10.0.x" ;;
  esac
  log "downloading qemu-system-x86 $ver"
  cd "$work/debs"
  quiet apt-get "${APT[@]}" download \
    "qemu-system-x86=$ver" "qemu-system-common=$ver" "qemu-system-data=$ver"
  cd /

  # The shared libraries these packages link against all exist in bookworm main under the
  # same (soname-carrying) package names; install the ones that are missing.
  missing=()
  for lib in $(for deb in "$work"/debs/*.deb; do dpkg-deb -f "$deb" Depends; done \
               | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*//' -e 's/[[:space:]]//g' \
               | grep -E '^(lib|zlib)' | sort -u); do
    is_installed "$lib" || missing+=("$lib")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
  fi

  # Unpack into a fresh tree next to the old one, then swap, so an interrupted run never
  # leaves a half-unpacked prefix behind.
  mkdir -p "$PREFIX"
  rm -rf "$PREFIX/root.new"
  mkdir -p "$PREFIX/root.new"
  for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$PREFIX/root.new"
  done
  [ -x "$PREFIX/root.new/usr/bin/qemu-system-x86_64" ] \
    || die "unpacked packages contain no usr/bin/qemu-system-x86_64"
  if ldd "$PREFIX/root.new/usr/bin/qemu-system-x86_64" | grep -q 'not found'; then
    ldd "$PREFIX/root.new/usr/bin/qemu-system-x86_64" | grep 'not found' >&2
    die "QEMU 10.0 needs shared libraries that are not installed (listed above)"
  fi
  rm -rf "$PREFIX/root"
  mv "$PREFIX/root.new" "$PREFIX/root"

  # The wrapper points the binary at its own modules and data files (firmware not found
  # there comes from the system's /usr/share/seabios, installed with QEMU 7.2).
  mkdir -p "$PREFIX/bin"
  cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# QEMU 10.0 (Debian bookworm-backports), unpacked beside the system's QEMU 7.2 by
# livemig's scripts/install-qemu-peers.sh: run it with its own modules and data files.
export QEMU_MODULE_DIR="$PREFIX/root/usr/lib/x86_64-linux-gnu/qemu"
exec "$PREFIX/root/usr/bin/qemu-system-x86_64" -L "$PREFIX/root/usr/share/qemu" "\$@"
EOF
  chmod 755 "$WRAPPER.tmp"
  mv "$WRAPPER.tmp" "$WRAPPER"

  rm -rf "$work"
  trap - EXIT
}

v10="$(qemu_version "$WRAPPER")"
if [ "$v10" != 10.0 ]; then
  [ -z "$v10" ] || log "$WRAPPER reports version $v10; reinstalling QEMU 10.0"
  install_qemu10
  v10="$(qemu_version "$WRAPPER")"
fi
[ "$v10" = 10.0 ] || die "$WRAPPER reports version '${v10:-none}' after installing, expected 10.0.x"

# --- done ------------------------------------------------------------------------------------
qemu-system-x86_64 --version | head -n 1
"$WRAPPER" --version | head -n 1
