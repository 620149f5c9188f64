#!/bin/sh
# Starts the MLflow server; configuration comes from the environment (see mlflow/README.md).
set -eu
exec mlflow server \
  --host 0.0.0.0 --port 5000 \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://tuneloop:tuneloop@postgres/mlflow}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" \
  --serve-artifacts \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-*}"
