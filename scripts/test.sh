#!/usr/bin/env bash
# Runs the whole test suite (unit, fuzz, and interoperability tests against real QEMU 7.2
# and 10.0) in the project's virtualenv. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIVEMIG_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "test: no virtualenv at $VENV; run scripts/install.sh first" >&2
  exit 1
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
