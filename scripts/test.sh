#!/usr/bin/env bash
# Run tuneloop's test suite: lint (incl. Airflow 3 rules), then pytest at all four levels.
# pytest exit 5 (no tests collected) is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check dags plugins tasks tests bench || { echo "ruff failed"; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose (a suite that runs nothing proves nothing)"
  exit 1
fi
exit "$rc"
