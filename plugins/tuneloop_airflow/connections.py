"""Airflow Connections → tuneloop settings.

Connections (all optional; env defaults apply when absent):
- `tuneloop_llm_generator`, `tuneloop_llm_user_sim`, `tuneloop_llm_tagger`, `tuneloop_llm_judge`,
  `tuneloop_llm_judge2`, or `tuneloop_llm` for every role: type http; host/port/schema build the
  base URL (or put the full URL in extra `base_url`), password = API key, extra `model`.
- `tuneloop_db`: type postgres → DATABASE_URL.
- `tuneloop_mlflow`: type http → MLFLOW_TRACKING_URI.

Every task of every tuneloop DAG runs `apply_connections()` before its `execute()`: it is the
`pre_execute` hook in `DEFAULT_ARGS` (tuneloop_airflow.common), so a new task cannot forget it and
DAG files do not call it. It exports what the connections say as the environment variables
tuneloop's settings read, so `tasks/` stays free of Airflow. Precedence (README, "A real
OpenAI-compatible endpoint"): a defined connection overrides the environment variable it maps to;
without the connection the environment stands. A role connection (`tuneloop_llm_judge`) sets the
role's variables (`TUNELOOP_JUDGE_*`), `tuneloop_llm` the default ones (`TUNELOOP_LLM_*`), so an
explicit `TUNELOOP_JUDGE_BASE_URL` still beats `tuneloop_llm`, as it does in settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("generator", "user_sim", "tagger", "judge", "judge2")


def _get_connection(conn_id: str):
    """The connection, or None when it is not defined (then the environment applies).

    Any other error (a denied secrets backend, a malformed connection) fails the task: falling
    back to the environment would silently write to the wrong database or MLflow.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
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


def _sqlalchemy_url(conn) -> str:
    """A Connection's URI as SQLAlchemy takes it: Airflow writes postgres://, SQLAlchemy 2
    knows only postgresql://."""
    uri = conn.get_uri()
    return "postgresql://" + uri[len("postgres://"):] if uri.startswith("postgres://") else uri


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
        env["DATABASE_URL"] = _sqlalchemy_url(db)
    ml = _get_connection("tuneloop_mlflow")
    if ml is not None:
        env["MLFLOW_TRACKING_URI"] = _http_base_url(ml, default_path="") or ml.get_uri()
    return env


def postgres_url(conn_id: str) -> str:
    """The SQLAlchemy URL of the Airflow Connection `conn_id` (type postgres), for a task that
    reads another database (the import_reactions DAG's `source_conn_id`). Never logged: it
    holds the password."""
    conn = _get_connection(conn_id)
    if conn is None:
        raise ValueError(f"Airflow Connection {conn_id!r} is not defined; add it (type "
                         "postgres) under Admin → Connections, or leave source_conn_id empty "
                         "to query tuneloop's own database")
    url = _sqlalchemy_url(conn)
    scheme = url.partition("://")[0]
    if scheme != "postgresql" and not scheme.startswith("postgresql+"):
        raise ValueError(f"Airflow Connection {conn_id!r} is of type {conn.conn_type!r}, not "
                         "postgres; the sql source reads PostgreSQL only")
    return url


def apply_connections(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Export connection-derived settings into `environ` (this task process's environment).

    Idempotent and cheap when nothing changed: only variables whose value differs are written,
    and only then is the cached `get_settings()` cleared. Returns the names (never the values,
    which hold API keys and passwords) of the variables the connections define.
    """
    env = connection_env()
    changed = sorted(name for name, value in env.items() if environ.get(name) != value)
    if changed:
        environ.update({name: env[name] for name in changed})
        from tasks.core.settings import get_settings

        get_settings.cache_clear()
        log.info("settings from Airflow connections: %s", ", ".join(changed))
    return sorted(env)


def apply_connections_hook(context: Mapping[str, Any]) -> None:
    """`pre_execute` hook (DEFAULT_ARGS) so every task runs with the connections' settings."""
    apply_connections()
