#!/usr/bin/env bash
# Prepare a machine (Debian 12) for developing and testing livemig:
#   1. the QEMU 7.2 and 10.0 peers (scripts/install-qemu-peers.sh; needs root, uses sudo
#      when run as another user and something is missing);
#   2. a virtualenv .venv in the project with livemig installed editable plus its test
#      extras (pip install -e '.[test]').
# Safe to run again: finished steps are skipped. Environment: PYTHON (interpreter for the
# virtualenv, default python3, must be >= 3.11), LIVEMIG_VENV (default <project>/.venv).
set -Eeuo pipefail

die() {
  echo "install: ERROR: $*" >&2
  exit 1
}
trap 'die "command failed (exit status $?) at line $LINENO: $BASH_COMMAND"' ERR
log() { echo "install: $*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${LIVEMIG_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# --- 1. QEMU peers ---------------------------------------------------------------------------
qemu_version() {
  { "$1" --version 2>/dev/null || true; } \
    | sed -n '1s/^QEMU emulator version \([0-9]*\.[0-9]*\).*/\1/p'
}
if [ "$(id -u)" = 0 ]; then
  "$HERE/install-qemu-peers.sh"
elif [ "$(qemu_version qemu-system-x86_64)" = 7.2 ] \
     && [ "$(qemu_version "${QEMU10_PREFIX:-/opt/qemu-10.0}/bin/qemu-system-x86_64")" = 10.0 ]; then
  log "QEMU 7.2 and 10.0 already installed"
elif command -v sudo >/dev/null; then
  sudo --preserve-env=QEMU10_PREFIX "$HERE/install-qemu-peers.sh"
else
  die "QEMU peers missing and not root (run: sudo $HERE/install-qemu-peers.sh)"
fi

# --- 2. virtualenv ---------------------------------------------------------------------------
# On a bare Debian system (as root) the interpreter and its venv module come from apt.
apt_python() {
  log "apt-get install python3 python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
           python3 python3-venv >/dev/null; }
}
can_apt_python() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "$PYTHON" = python3 ] \
    && { ! command -v python3 >/dev/null \
         || [ "$(readlink -f "$(command -v python3)")" = "$(readlink -f /usr/bin/python3)" ]; }
}

if ! command -v "$PYTHON" >/dev/null; then
  can_apt_python || die "python interpreter '$PYTHON' not found"
  apt_python
  hash -r
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); livemig needs Python >= 3.11"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian ships venv's ensurepip separately (python3-venv).
  can_apt_python || die "$PYTHON cannot create virtualenvs (on Debian: apt-get install python3-venv)"
  apt_python
  "$PYTHON" -c 'import venv, ensurepip' || die "python3-venv did not make ensurepip available"
fi

if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  log "creating virtualenv $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when pyproject.toml changed or the environment lost a package.
stamp="$VENV/.livemig-install-stamp"
want="$(cd "$ROOT" && sha256sum pyproject.toml | cut -d' ' -f1)"
# The import check runs from / : an editable install made before livemig/__init__.py
# existed maps livemig as an empty namespace package, which only shows outside the tree.
check='import livemig, numpy, zstandard, qemu.qmp, rich, pytest, hypothesis, ruff, mypy; livemig.__version__'
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] \
   && (cd / && "$VENV/bin/python" -c "$check") 2>/dev/null; then
  log "virtualenv $VENV is up to date"
else
  log "pip install -e '.[test]' into $VENV"
  rm -f "$stamp"
  cd "$ROOT"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
  (cd / && "$VENV/bin/python" -c "$check") \
    || die "the virtualenv cannot import livemig and its test dependencies after installing"
  echo "$want" >"$stamp"
fi
log "ready: activate with '. ${VENV}/bin/activate', then run pytest"
