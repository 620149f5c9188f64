#!/bin/bash
# One Postgres server, three databases: Airflow metadata, tuneloop data, MLflow backend store.
set -euo pipefail
for db in airflow tuneloop mlflow; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
SELECT 'CREATE DATABASE $db' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db')\gexec
SQL
done
