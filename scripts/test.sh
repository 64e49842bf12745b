#!/usr/bin/env bash
# Runs the whole test suite in the project's virtualenv: first the linters (ruff on the
# code, tests, benchmarks and scripts; mypy --strict on livemig, both configured in
# pyproject.toml), then pytest (unit, fuzz, and interoperability tests against real QEMU
# 7.2 and 10.0). A linter finding fails the command before pytest starts. Extra arguments
# go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIVEMIG_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "test: no virtualenv at $VENV; run scripts/install.sh first" >&2
  exit 1
fi
cd "$ROOT"
PY="$VENV/bin/python"

for tool in ruff mypy; do
  if ! "$PY" -c "import $tool" 2>/dev/null; then
    echo "test: $tool is not installed in $VENV; run scripts/install.sh" >&2
    exit 1
  fi
done

# Both linters run, so that one pass shows every finding; then the verdict.
failed=()
echo "test: ruff check livemig tests benchmarks scripts" >&2
"$PY" -m ruff check --quiet livemig tests benchmarks scripts || failed+=(ruff)
echo "test: mypy (strict, livemig)" >&2
"$PY" -m mypy || failed+=(mypy)
if [ "${#failed[@]}" -ne 0 ]; then
  printf -v names '%s and ' "${failed[@]}"
  echo "test: FAILED: ${names% and } reported findings (above); pytest was not run" >&2
  exit 1
fi

exec "$PY" -m pytest -q "$@"
