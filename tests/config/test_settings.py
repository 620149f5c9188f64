"""Settings: embedded defaults, per-role overrides, and errors that name the variable."""

from __future__ import annotations

import os
import secrets

import pytest

from tasks.core.settings import SettingsError, load_settings
from tests.production_env import fernet_key


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


# ---- production mode: no development or known-default secret ----------------------------------
# The `clean_env` and `production` fixtures are in tests/conftest.py.


def _problems(message: str) -> list[str]:
    return [line.strip() for line in message.splitlines()[1:]]


def _router_clients(settings) -> dict[str, str]:
    """The router's clients as it builds them (TUNELOOP_ROUTER_API_KEY folded in as "default")."""
    from serving.router_config import RouterConfig

    return RouterConfig.from_settings(settings).clients


def test_a_complete_production_environment_starts(production):
    settings = load_settings()
    assert settings.env == "production" and settings.is_airflow_process
    assert list(_router_clients(settings)) == ["web"]


def test_dev_mode_keeps_every_default_for_the_offline_demo(clean_env):
    from tasks.core.secrets import DEV_ROUTER_API_KEY, key_digest

    settings = load_settings()
    assert settings.env == "dev"
    assert _router_clients(settings) == {"default": key_digest(DEV_ROUTER_API_KEY)}
    # an Airflow process with a tracking server is fine in dev mode too
    clean_env.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://a@b/c")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_settings().env == "dev"


# (variable, value that must be refused: None = unset)
REFUSED = [
    ("TUNELOOP_USER_HASH_SALT", None), ("TUNELOOP_USER_HASH_SALT", "tuneloop-dev-salt-change-me"),
    ("TUNELOOP_USER_HASH_SALT", "short"),
    ("TUNELOOP_ROUTER_ADMIN_KEY", None), ("TUNELOOP_ROUTER_ADMIN_KEY", "tuneloop-dev-admin-key"),
    ("TUNELOOP_ROUTER_CLIENTS", None), ("TUNELOOP_ROUTER_CLIENTS", '{"web": "plain-text-key"}'),
    ("TUNELOOP_ROUTER_CLIENTS", '{"web": "sha256:abc"}'),
    ("TUNELOOP_MODEL_SERVER_API_KEY", None), ("TUNELOOP_MODEL_SERVER_API_KEY", "tuneloop-local"),
    ("TUNELOOP_MODEL_SERVER_ADMIN_KEY", None),
    ("TUNELOOP_MODEL_SERVER_ADMIN_KEY", "tuneloop-local-admin"),
    ("TUNELOOP_REGISTRY_SIGNING_KEY", None),
    ("TUNELOOP_REGISTRY_SIGNING_KEY", "tuneloop-dev-registry-key"),
    ("TUNELOOP_LLM_API_KEY", None), ("TUNELOOP_LLM_API_KEY", "tuneloop-local"),
    ("TUNELOOP_JUDGE_API_KEY", "tuneloop-local"),
    ("DATABASE_URL", "postgresql://tuneloop:tuneloop@postgres/tuneloop"),
    ("AIRFLOW__API_AUTH__JWT_SECRET", None),
    ("AIRFLOW__API_AUTH__JWT_SECRET", "change-me-in-production"),
    ("AIRFLOW__API_AUTH__JWT_SECRET", "0123456789abcdef"),  # < 32 characters
    ("AIRFLOW__CORE__FERNET_KEY", None), ("AIRFLOW__CORE__FERNET_KEY", ""),
    ("AIRFLOW__CORE__FERNET_KEY", "not-a-fernet-key"),
    ("AIRFLOW_ADMIN_PASSWORD", "admin"), ("AIRFLOW_ADMIN_PASSWORD", "short"),
    ("MLFLOW_TRACKING_USERNAME", None), ("MLFLOW_TRACKING_USERNAME", "admin"),
    ("MLFLOW_TRACKING_PASSWORD", None), ("MLFLOW_TRACKING_PASSWORD", "password1234"),
]


@pytest.mark.parametrize(("variable", "value"), REFUSED,
                         ids=[f"{v}={'unset' if x is None else x or 'empty'}" for v, x in REFUSED])
def test_production_refuses_a_missing_or_default_secret_naming_the_variable(production,
                                                                             variable, value):
    from tasks.core.secrets import MAKE_A_SECRET

    if value is None:
        production.delenv(variable, raising=False)
    else:
        production.setenv(variable, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    problems = _problems(str(err.value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{variable}: ")
    assert "tuneloop secrets" in problems[0] or MAKE_A_SECRET in problems[0]
    if value and len(value) >= 8:  # the refused value is not echoed
        assert value not in problems[0].replace("postgresql://tuneloop:***", "")


def test_every_problem_is_reported_at_once_one_line_each(clean_env):
    clean_env.setenv("TUNELOOP_ENV", "production")
    clean_env.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://a:b@c/d")
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    with pytest.raises(SettingsError) as err:
        load_settings()
    named = {line.split(":", 1)[0] for line in _problems(str(err.value))}
    assert named == {
        "TUNELOOP_USER_HASH_SALT", "TUNELOOP_ROUTER_ADMIN_KEY", "TUNELOOP_ROUTER_CLIENTS",
        "TUNELOOP_MODEL_SERVER_API_KEY", "TUNELOOP_MODEL_SERVER_ADMIN_KEY",
        "TUNELOOP_REGISTRY_SIGNING_KEY", "TUNELOOP_LLM_API_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_airflow_secrets_are_checked_only_in_an_airflow_process(production):
    """The router and the model server (no Airflow metadata database) get no Airflow secret."""
    for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API_AUTH__JWT_SECRET",
                 "AIRFLOW__CORE__FERNET_KEY"):
        production.delenv(name)
    production.setenv("AIRFLOW_HOME", "/opt/airflow")  # every container of the Airflow image
    production.setenv("AIRFLOW_ADMIN_PASSWORD", "admin")
    assert not load_settings().is_airflow_process


def test_airflow_secrets_given_through_cmd_or_secret_backends_are_not_required(production):
    production.delenv("AIRFLOW__API_AUTH__JWT_SECRET")
    production.delenv("AIRFLOW__CORE__FERNET_KEY")
    production.setenv("AIRFLOW__API_AUTH__JWT_SECRET_CMD", "cat /run/secrets/jwt")
    production.setenv("AIRFLOW__CORE__FERNET_KEY_SECRET", "airflow/fernet")
    assert load_settings().is_airflow_process


def test_a_rotating_fernet_key_pair_is_accepted_and_each_key_is_validated(production):
    production.setenv("AIRFLOW__CORE__FERNET_KEY", f"{fernet_key()},{fernet_key()}")
    load_settings()
    production.setenv("AIRFLOW__CORE__FERNET_KEY", f"{fernet_key()},bogus")
    with pytest.raises(SettingsError, match="AIRFLOW__CORE__FERNET_KEY: key 2 of 2"):
        load_settings()


def test_mlflow_login_is_needed_only_for_a_tracking_server(production):
    production.delenv("MLFLOW_TRACKING_USERNAME")
    production.delenv("MLFLOW_TRACKING_PASSWORD")
    production.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/mlflow.db")
    load_settings()
    production.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    production.setenv("MLFLOW_TRACKING_TOKEN", secrets.token_hex(16))
    load_settings()


def test_a_strong_router_api_key_replaces_the_clients(production):
    from tasks.core.secrets import key_digest

    key = secrets.token_hex(32)
    production.delenv("TUNELOOP_ROUTER_CLIENTS")
    production.setenv("TUNELOOP_ROUTER_API_KEY", key)
    assert _router_clients(load_settings()) == {"default": key_digest(key)}


def test_the_development_router_key_is_no_client_in_production(production):
    assert "default" not in _router_clients(load_settings())


def test_a_client_named_default_and_the_router_api_key_are_refused_not_renamed(production):
    from tasks.core.secrets import key_digest

    production.setenv("TUNELOOP_ROUTER_CLIENTS",
                      f'{{"default": "{key_digest(secrets.token_hex(32))}"}}')
    production.setenv("TUNELOOP_ROUTER_API_KEY", secrets.token_hex(32))
    with pytest.raises(ValueError, match="names a client 'default', and TUNELOOP_ROUTER_API_KEY"):
        _router_clients(load_settings())


@pytest.mark.parametrize("mode", ["dev", "production"])
def test_dev_and_production_accept_the_same_client_digests(production, mode):
    from tasks.core.secrets import key_digest

    production.setenv("TUNELOOP_ENV", mode)
    digest = key_digest("k")
    production.setenv("TUNELOOP_ROUTER_CLIENTS", f'{{"web": " {digest.upper()} "}}')
    assert load_settings().router_clients == {"web": digest}  # stripped, lower-cased
    production.setenv("TUNELOOP_ROUTER_CLIENTS", '{"web": "plain-text-key"}')
    with pytest.raises(SettingsError, match="TUNELOOP_ROUTER_CLIENTS: client 'web' is not "
                                            "stored as sha256:<64 hex digits>") as err:
        load_settings()
    assert "plain-text-key" not in str(err.value)
    production.setenv("TUNELOOP_ROUTER_CLIENTS", f'{{"has space": "{digest}"}}')
    with pytest.raises(SettingsError, match="TUNELOOP_ROUTER_CLIENTS: client name 'has space'"):
        load_settings()


def test_the_model_server_admin_key_must_differ_from_its_api_key(production):
    production.setenv("TUNELOOP_MODEL_SERVER_ADMIN_KEY",
                      os.environ["TUNELOOP_MODEL_SERVER_API_KEY"])
    with pytest.raises(SettingsError, match="TUNELOOP_MODEL_SERVER_ADMIN_KEY: equals"):
        load_settings()


def test_key_digest_is_sha256_hex_with_a_prefix():
    import hashlib

    from tasks.core.secrets import CLIENT_DIGEST, key_digest

    assert key_digest("k") == "sha256:" + hashlib.sha256(b"k").hexdigest()
    assert CLIENT_DIGEST.fullmatch(key_digest("k"))


# ---- secrets stay out of errors and repr ------------------------------------------------------

def test_a_bad_database_url_error_hides_its_password(clean_env):
    clean_env.setenv("DATABASE_URL", "mysql://root:hunter2-s3cret@db/tuneloop")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "hunter2-s3cret" not in str(err.value)
    assert "DATABASE_URL: DATABASE_URL='mysql://root:***@db/tuneloop' is not a PostgreSQL URL" \
        in str(err.value)


def test_a_bad_base_url_error_hides_its_password(clean_env):
    clean_env.setenv("TUNELOOP_JUDGE_BASE_URL", "ftp://user:tok-s3cret@llm/v1")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "tok-s3cret" not in str(err.value) and "TUNELOOP_JUDGE_BASE_URL" in str(err.value)


def test_settings_repr_shows_no_secret(production):
    production.setenv("DATABASE_URL", "postgresql://tuneloop:db-s3cret-value@postgres/tuneloop")
    settings = load_settings()
    text = f"{settings!r} {settings}"
    assert "postgresql://tuneloop:***@postgres/tuneloop" in text
    assert "db-s3cret-value" not in text
    airflow_db_password = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split(":")[2]
    assert airflow_db_password.split("@")[0] not in text
    for name in ("TUNELOOP_ROUTER_ADMIN_KEY", "TUNELOOP_USER_HASH_SALT",
                 "MLFLOW_TRACKING_PASSWORD", "AIRFLOW__API_AUTH__JWT_SECRET",
                 "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_ADMIN_PASSWORD"):
        assert os.environ[name] not in text, name


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pw-s3cret@db:5432/x", "postgresql://u:***@db:5432/x"),
    ("postgresql://u@db/x", "postgresql://u@db/x"),
    ("https://h/p?token=s3cret", "https://h/p?***"),
    ("not a url", "not a url"),
])
def test_redact_url(url, shown):
    from tasks.core.secrets import redact_url

    assert redact_url(url) == shown


def test_redact_urls_in_masks_every_password_in_a_text():
    from tasks.core.secrets import redact_urls_in

    text = "connect postgresql://a:s3cr@t@db/x failed; retry http://b:tok3n@h/v1 or http://h/"
    assert redact_urls_in(text) == ("connect postgresql://a:***@db/x failed; retry "
                                    "http://b:***@h/v1 or http://h/")


@pytest.mark.parametrize(("text", "shown"), [
    ("postgresql://u:pa/ss@db:5432/x down", "postgresql://u:***@db:5432/x down"),
    ("redis://:a/b@c/d@redis:6379/0", "redis://:***@redis:6379/0"),
    ("see http://host:8080/path", "see http://host:8080/path"),
])
def test_redact_urls_in_masks_a_password_holding_slashes(text, shown):
    from tasks.core.secrets import redact_urls_in

    assert redact_urls_in(text) == shown


def test_model_level_errors_are_not_prefixed_with_a_question_mark():
    from tasks.core.settings import _error_line

    line = _error_line({"loc": (), "msg": "Value error, TUNELOOP_X and TUNELOOP_Y disagree"})
    assert line == "TUNELOOP_X and TUNELOOP_Y disagree"
    assert _error_line({"loc": ("DATABASE_URL",), "msg": "bad"}) == "DATABASE_URL: bad"
    assert _error_line({"loc": ("airflow_fernet_key",), "msg": "bad"}) == \
        "AIRFLOW__CORE__FERNET_KEY: bad"
