#!/usr/bin/env bash
# tuneloop trainer entrypoint: axolotl preprocess -> axolotl train -> collect adapter + metrics.
#
#   entrypoint.sh [CONFIG] [extra `axolotl train` args...]
#
# CONFIG defaults to /config/axolotl.yaml (written by tasks.train.container.prepare_container_run).
# Results land in $TUNELOOP_OUTPUT_DIR (default /output): adapter/, metrics.json,
# trainer_state.json, chat_template.jinja, axolotl.yaml; axolotl's own files stay in
# /output/axolotl (checkpoints) and /output/prepared (tokenised dataset cache).
set -euo pipefail

CONFIG="${1:-/config/axolotl.yaml}"
if [[ $# -gt 0 ]]; then shift; fi
OUTPUT_DIR="${TUNELOOP_OUTPUT_DIR:-/output}"

if [[ ! -f "$CONFIG" ]]; then
  echo "tuneloop-trainer: config $CONFIG not found; mount the run's config folder at /config" >&2
  exit 2
fi
mkdir -p "$OUTPUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || true
else
  echo "tuneloop-trainer: warning: nvidia-smi not found; is a GPU requested for this container?" >&2
fi

echo "== axolotl preprocess $CONFIG"
axolotl preprocess "$CONFIG"
echo "== axolotl train $CONFIG $*"
axolotl train "$CONFIG" "$@"
echo "== collect -> $OUTPUT_DIR"
exec python -m tasks.train collect --config "$CONFIG" --output-dir "$OUTPUT_DIR"
