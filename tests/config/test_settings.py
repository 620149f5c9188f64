"""Settings: embedded defaults, per-role overrides, and errors that name the variable."""

from __future__ import annotations

import pytest

from tasks.core.settings import SettingsError, load_settings


def test_defaults_point_every_role_at_the_local_model_server(monkeypatch):
    for var in ("TUNELOOP_LLM_BASE_URL", "TUNELOOP_JUDGE_BASE_URL", "TUNELOOP_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    ep = s.endpoint("generator")
    assert ep.base_url == "http://127.0.0.1:8300/v1"
    assert ep.model == "smollm2-135m-instruct"


def test_role_override_wins_over_default(monkeypatch):
    monkeypatch.setenv("TUNELOOP_LLM_BASE_URL", "http://llm.internal:8000/v1/")
    monkeypatch.setenv("TUNELOOP_JUDGE_BASE_URL", "https://api.example.com/v1")
    monkeypatch.setenv("TUNELOOP_JUDGE_MODEL", "big-judge")
    s = load_settings()
    assert s.endpoint("generator").base_url == "http://llm.internal:8000/v1"
    assert s.endpoint("judge").base_url == "https://api.example.com/v1"
    assert s.endpoint("judge").model == "big-judge"
    assert s.endpoint("judge2").model == s.llm_model


def test_bad_database_url_names_variable_and_example(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "mysql://root@localhost/db")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "DATABASE_URL" in str(err.value)
    assert "postgresql://" in str(err.value)


def test_bad_llm_url_names_variable(monkeypatch):
    monkeypatch.setenv("TUNELOOP_GENERATOR_BASE_URL", "localhost:8000")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "TUNELOOP_GENERATOR_BASE_URL" in str(err.value)
    assert "http://" in str(err.value)


def test_non_numeric_concurrency_is_rejected(monkeypatch):
    monkeypatch.setenv("TUNELOOP_LLM_MAX_CONCURRENCY", "0")
    with pytest.raises(SettingsError, match="TUNELOOP_LLM_MAX_CONCURRENCY"):
        load_settings()


def test_unset_mlflow_uri_gives_registry_capable_sqlite_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path))
    assert load_settings().resolved_mlflow_tracking_uri.startswith("sqlite:///")


def test_router_rate_limits_come_from_the_environment(monkeypatch):
    from serving.router_config import RouterConfig

    monkeypatch.setenv("TUNELOOP_ROUTER_USER_RATE_LIMIT_PER_S", "5")
    monkeypatch.setenv("TUNELOOP_ROUTER_USER_RATE_LIMIT_BURST", "7")
    monkeypatch.setenv("TUNELOOP_ROUTER_KEY_RATE_LIMIT_PER_S", "0")
    config = RouterConfig.from_settings(load_settings())
    assert (config.rate_limit_per_s, config.rate_limit_burst) == (5.0, 7)
    assert (config.key_rate_limit_per_s, config.key_rate_limit_burst) == (0.0, 2000)


@pytest.mark.parametrize(("var", "value", "message"), [
    ("TUNELOOP_ROUTER_USER_RATE_LIMIT_PER_S", "-1", "must be >= 0 requests/s"),
    ("TUNELOOP_ROUTER_KEY_RATE_LIMIT_BURST", "0", "must be >= 1 request"),
])
def test_bad_router_rate_limit_names_the_variable(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=f"{var}: .*{message}"):
        load_settings()
