"""Airflow Connections → tuneloop settings (plugins/tuneloop_airflow/connections.py).

Connections come from `AIRFLOW_CONN_*` environment variables, the way Airflow's environment
secrets backend reads them; `apply_connections` writes into a plain dict where a test does not
need the real process environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

DB_URI = "postgres://tuneloop:db-s3cret@db.internal:5432/tuneloop"
LLM_KEY = "sk-llm-s3cret"


@pytest.fixture(autouse=True)
def no_tuneloop_connections(monkeypatch):
    """Start every test without tuneloop connections in the environment."""
    for name in list(os.environ):
        if name.startswith("AIRFLOW_CONN_TUNELOOP"):
            monkeypatch.delenv(name)


def _http_connection(host: str, password: str | None = None, **extra) -> str:
    return json.dumps({"conn_type": "http", "host": host, "password": password, "extra": extra})


def test_db_connection_becomes_database_url(monkeypatch):
    from tuneloop_airflow.connections import connection_env

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_DB", DB_URI)
    assert connection_env() == {
        "DATABASE_URL": "postgresql://tuneloop:db-s3cret@db.internal:5432/tuneloop"}


def test_mlflow_connection_becomes_tracking_uri(monkeypatch):
    from tuneloop_airflow.connections import connection_env

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_MLFLOW", _http_connection("http://mlflow:5000"))
    assert connection_env() == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def test_llm_connections_set_default_and_role_variables(monkeypatch):
    from tuneloop_airflow.connections import connection_env

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_LLM",
                       _http_connection("https://api.example.com", LLM_KEY, model="gpt-x"))
    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_LLM_JUDGE2",
                       _http_connection("vllm", None, base_url="http://vllm:8000/v1", model="q"))
    assert connection_env() == {
        "TUNELOOP_LLM_BASE_URL": "https://api.example.com/v1",
        "TUNELOOP_LLM_API_KEY": LLM_KEY,
        "TUNELOOP_LLM_MODEL": "gpt-x",
        "TUNELOOP_JUDGE2_BASE_URL": "http://vllm:8000/v1",
        "TUNELOOP_JUDGE2_MODEL": "q",
    }


def test_without_connections_the_environment_stands(monkeypatch):
    from tuneloop_airflow.connections import apply_connections

    environ = {"DATABASE_URL": "postgresql://env@127.0.0.1/env"}
    assert apply_connections(environ) == []
    assert environ == {"DATABASE_URL": "postgresql://env@127.0.0.1/env"}


def test_a_connection_overrides_the_variable_it_maps_to(monkeypatch):
    """README: "In Airflow, Connections override the environment"."""
    from tuneloop_airflow.connections import apply_connections

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_DB", DB_URI)
    environ = {"DATABASE_URL": "postgresql://env@127.0.0.1/env"}
    assert apply_connections(environ) == ["DATABASE_URL"]
    assert environ["DATABASE_URL"].endswith("@db.internal:5432/tuneloop")


def test_the_default_llm_connection_leaves_explicit_role_variables_alone(monkeypatch):
    from tuneloop_airflow.connections import apply_connections

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_LLM", _http_connection("http://llm:8000"))
    environ = {"TUNELOOP_JUDGE_BASE_URL": "http://judge:9000/v1"}
    apply_connections(environ)
    assert environ == {"TUNELOOP_JUDGE_BASE_URL": "http://judge:9000/v1",
                       "TUNELOOP_LLM_BASE_URL": "http://llm:8000/v1"}


def test_settings_cache_is_cleared_only_when_a_value_changes(monkeypatch):
    from tasks.core.settings import get_settings
    from tuneloop_airflow.connections import apply_connections

    monkeypatch.setenv("DATABASE_URL", "postgresql://env@127.0.0.1/env")
    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_DB", DB_URI)
    get_settings.cache_clear()
    before = get_settings()
    try:
        apply_connections()
        after = get_settings()
        assert after is not before
        assert after.database_url.endswith("@db.internal:5432/tuneloop")
        apply_connections()  # nothing changed: the cached settings stay
        assert get_settings() is after
    finally:
        get_settings.cache_clear()


def test_applying_twice_changes_nothing_the_second_time(monkeypatch, caplog):
    from tuneloop_airflow.connections import apply_connections

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_DB", DB_URI)
    environ: dict[str, str] = {}
    apply_connections(environ)
    first = dict(environ)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tuneloop_airflow.connections"):
        assert apply_connections(environ) == ["DATABASE_URL"]
    assert environ == first
    assert not caplog.records


def test_secrets_never_reach_the_log(monkeypatch, caplog):
    from tuneloop_airflow.connections import apply_connections

    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_DB", DB_URI)
    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_LLM", _http_connection("http://llm", LLM_KEY))
    with caplog.at_level(logging.DEBUG, logger="tuneloop_airflow.connections"):
        names = apply_connections({})
    assert names == ["DATABASE_URL", "TUNELOOP_LLM_API_KEY", "TUNELOOP_LLM_BASE_URL"]
    assert "DATABASE_URL" in caplog.text and "TUNELOOP_LLM_API_KEY" in caplog.text
    assert "db-s3cret" not in caplog.text and LLM_KEY not in caplog.text


def test_a_failing_connection_lookup_fails_instead_of_using_the_environment(monkeypatch):
    """Only "not defined" falls back to the environment; any other error must stop the task
    rather than let it write to the environment's database."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowSecretsBackendAccessDenied

    from tuneloop_airflow.connections import apply_connections

    def denied(conn_id):
        raise AirflowSecretsBackendAccessDenied(f"{conn_id}: denied")

    monkeypatch.setattr(BaseHook, "get_connection", staticmethod(denied))
    with pytest.raises(AirflowSecretsBackendAccessDenied):
        apply_connections({})


# ---- another database for a task (import_reactions' source_conn_id) ---------------------------
def test_a_postgres_connection_becomes_a_sqlalchemy_url(monkeypatch):
    from tuneloop_airflow.connections import postgres_url

    monkeypatch.setenv("AIRFLOW_CONN_APP_DB", "postgres://reader:app-s3cret@app-db:5432/app")
    assert postgres_url("app_db") == "postgresql://reader:app-s3cret@app-db:5432/app"


def test_an_undefined_or_non_postgres_connection_names_the_fix(monkeypatch):
    from tuneloop_airflow.connections import postgres_url

    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_DB", raising=False)
    with pytest.raises(ValueError, match="'no_such_db' is not defined; add it"):
        postgres_url("no_such_db")
    monkeypatch.setenv("AIRFLOW_CONN_APP_HTTP", _http_connection("http://app", "k-s3cret"))
    with pytest.raises(ValueError, match="not postgres") as exc:
        postgres_url("app_http")
    assert "k-s3cret" not in str(exc.value)
