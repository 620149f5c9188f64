#!/bin/sh
# Starts the MLflow server with its basic-auth app; configuration comes from the environment
# (see mlflow/README.md). Every request but /health needs a login: the admin
# (MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD, created on the first start) and the user tuneloop's
# services log in as (MLFLOW_TRACKING_USERNAME / _PASSWORD), which `mlflow-users bootstrap`
# creates, or re-keys to the configured password, once the server answers.
set -eu
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (docker compose: MLFLOW_ADMIN_USERNAME from tuneloop secrets init)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (docker compose: MLFLOW_ADMIN_PASSWORD from tuneloop secrets init)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (signs CSRF tokens of the UI; from tuneloop secrets init)}"

# The auth app's settings file: MLflow reads no environment variable for the user store.
MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-basic-auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH
umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:////mlflow-auth/basic_auth.db}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

python /usr/local/bin/mlflow-users bootstrap &

exec mlflow server \
  --app-name basic-auth \
  --host 0.0.0.0 --port 5000 \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://tuneloop:<password>@postgres/mlflow}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}" \
  --serve-artifacts \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*}"
