"""Airflow Connections → tuneloop settings.

Connections (all optional; env defaults apply when absent):
- `tuneloop_llm_generator`, `tuneloop_llm_user_sim`, `tuneloop_llm_tagger`, `tuneloop_llm_judge`,
  `tuneloop_llm_judge2`, or `tuneloop_llm` for every role: type http; host/port/schema build the
  base URL (or put the full URL in extra `base_url`), password = API key, extra `model`.
- `tuneloop_db`: type postgres → DATABASE_URL.
- `tuneloop_mlflow`: type http → MLFLOW_TRACKING_URI.

Tasks call `apply_connections()` first; it exports what the connections say as the environment
variables tuneloop's settings read, so `tasks/` stays free of Airflow.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ROLES = ("generator", "user_sim", "tagger", "judge", "judge2")


def _get_connection(conn_id: str):
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception:  # not defined: env defaults apply
        return None


def _http_base_url(conn, default_path: str = "/v1") -> str | None:
    extra = conn.extra_dejson or {}
    if extra.get("base_url"):
        return str(extra["base_url"])
    if not conn.host:
        return None
    if conn.host.startswith(("http://", "https://")):
        base = conn.host
    else:
        scheme = conn.schema if conn.schema in ("http", "https") else "http"
        base = f"{scheme}://{conn.host}"
        if conn.port:
            base += f":{conn.port}"
    base = base.rstrip("/")
    path = extra.get("path", default_path)
    return base if not path or base.endswith(path) else base + path


def connection_env() -> dict[str, str]:
    """Environment variables derived from the tuneloop Airflow connections that exist."""
    env: dict[str, str] = {}
    default = _get_connection("tuneloop_llm")
    for role in ROLES:
        conn = _get_connection(f"tuneloop_llm_{role}") or default
        if conn is None:
            continue
        prefix = "TUNELOOP_LLM" if conn is default else f"TUNELOOP_{role.upper()}"
        base_url = _http_base_url(conn)
        if base_url:
            env[f"{prefix}_BASE_URL"] = base_url
        if conn.password:
            env[f"{prefix}_API_KEY"] = conn.password
        model = (conn.extra_dejson or {}).get("model")
        if model:
            env[f"{prefix}_MODEL"] = str(model)
    db = _get_connection("tuneloop_db")
    if db is not None:
        env["DATABASE_URL"] = db.get_uri().replace("postgres://", "postgresql://", 1)
    ml = _get_connection("tuneloop_mlflow")
    if ml is not None:
        env["MLFLOW_TRACKING_URI"] = _http_base_url(ml, default_path="") or ml.get_uri()
    return env


def apply_connections() -> dict[str, str]:
    """Export connection-derived settings for this task process; returns the names (not values)."""
    env = connection_env()
    os.environ.update(env)
    if env:
        from tasks.settings import get_settings

        get_settings.cache_clear()
        log.info("settings from Airflow connections: %s", sorted(env))
    return env
