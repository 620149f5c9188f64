#!/usr/bin/env bash
# Run tuneloop's test suite: lint (incl. Airflow 3 rules), layer rules, then pytest at all four levels.
# pytest exit 5 (no tests collected) is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check dags plugins tasks serving tests bench || { echo "ruff failed"; exit 1; }
# Layer rules (pyproject.toml [tool.importlinter]): entry points -> stages -> datasets -> core;
# serving -> core; stages independent except the listed edges.
.venv/bin/lint-imports || { echo "lint-imports failed: an import crosses a layer (see pyproject.toml)"; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose (a suite that runs nothing proves nothing)"
  exit 1
fi
exit "$rc"
