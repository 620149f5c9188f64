"""A complete, valid production environment for tests that exercise TUNELOOP_ENV=production:
start from it (the `production` fixture in tests/conftest.py sets it) and break one variable, so
a refusal is shown to come from that variable alone."""

from __future__ import annotations

import json
import secrets

# Variables a test environment must not leak into a production check (the suite itself sets
# AIRFLOW__DATABASE__SQL_ALCHEMY_CONN and TUNELOOP_DATA_DIR).
PRODUCTION_PREFIXES = ("TUNELOOP_", "AIRFLOW_", "AIRFLOW__", "MLFLOW_")


def fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def production_env() -> dict[str, str]:
    """A complete production environment, as docker compose hands it to an Airflow task."""
    from tasks.core.secrets import key_digest

    model_server_key = secrets.token_hex(32)
    return {
        "TUNELOOP_ENV": "production",
        "DATABASE_URL": f"postgresql://tuneloop:{secrets.token_urlsafe(24)}@postgres/tuneloop",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "tuneloop",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
        "TUNELOOP_USER_HASH_SALT": secrets.token_hex(32),
        "TUNELOOP_ROUTER_ADMIN_KEY": secrets.token_hex(32),
        "TUNELOOP_ROUTER_CLIENTS": json.dumps({"web": key_digest(secrets.token_hex(32))}),
        "TUNELOOP_MODEL_SERVER_API_KEY": model_server_key,
        "TUNELOOP_LLM_API_KEY": model_server_key,
        "TUNELOOP_MODEL_SERVER_ADMIN_KEY": secrets.token_hex(32),
        "TUNELOOP_REGISTRY_SIGNING_KEY": secrets.token_hex(32),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN":
            f"postgresql+psycopg2://tuneloop:{secrets.token_hex(16)}@postgres/airflow",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__CORE__FERNET_KEY": fernet_key(),
        "AIRFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(24),
    }
