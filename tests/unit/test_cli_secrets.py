"""`tuneloop secrets init | client | revoke | check` (tasks/cli/secrets.py)."""

from __future__ import annotations

import json
import stat

import pytest

from tasks.cli import main
from tasks.core.secrets import CLIENT_DIGEST, KNOWN_DEFAULT_SECRETS, key_digest

COMPOSE_SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "TUNELOOP_USER_HASH_SALT",
                   "TUNELOOP_ROUTER_ADMIN_KEY", "TUNELOOP_MODEL_SERVER_API_KEY",
                   "TUNELOOP_LLM_API_KEY", "TUNELOOP_MODEL_SERVER_ADMIN_KEY",
                   "TUNELOOP_REGISTRY_SIGNING_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY",
                   "AIRFLOW_ADMIN_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(autouse=True)
def workdir(clean_env, tmp_path):
    """Run in an empty folder with no tuneloop/Airflow/MLflow variable set (clean_env)."""
    return tmp_path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _values(path) -> dict[str, str]:
    from dotenv import dotenv_values

    return dict(dotenv_values(path))


def _shown_key(err: str) -> str:
    lines = [line for line in err.splitlines() if "shown once" in line]
    assert len(lines) == 1, err
    return lines[0].rsplit(" ", 1)[-1]


def test_init_writes_a_private_env_with_every_compose_secret(workdir, capsys):
    code, out, err = _run(["secrets", "init", "--docker-gid", "998", "--airflow-uid", "1000"],
                          capsys)
    assert code == 0
    env_file = workdir / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = _values(env_file)
    assert values["TUNELOOP_ENV"] == "production"
    for name in COMPOSE_SECRETS:
        assert values[name] and values[name] not in KNOWN_DEFAULT_SECRETS, name
    secrets_only = [values[name] for name in COMPOSE_SECRETS if name != "TUNELOOP_LLM_API_KEY"]
    assert len(set(secrets_only)) == len(secrets_only)  # each one fresh
    assert values["TUNELOOP_LLM_API_KEY"] == values["TUNELOOP_MODEL_SERVER_API_KEY"]
    assert values["MLFLOW_TRACKING_USERNAME"] != values["MLFLOW_ADMIN_USERNAME"]
    assert (values["AIRFLOW_UID"], values["DOCKER_GID"]) == ("1000", "998")
    assert values["TUNELOOP_HOST_DATA_DIR"] == str(workdir.resolve() / "data")
    summary = json.loads(out)
    assert summary["env_file"] == ".env" and "POSTGRES_PASSWORD" in summary["variables"]


def test_init_stores_only_the_digest_of_the_key_it_shows_once(workdir, capsys):
    _, out, err = _run(["secrets", "init", "--docker-gid", "1"], capsys)
    key = _shown_key(err)
    text = (workdir / ".env").read_text()
    assert key not in text and key not in out
    clients = json.loads(_values(workdir / ".env")["TUNELOOP_ROUTER_CLIENTS"])
    assert clients == {"default": key_digest(key)}
    assert CLIENT_DIGEST.fullmatch(clients["default"])


def test_init_generates_a_valid_fernet_key(workdir, capsys):
    from cryptography.fernet import Fernet

    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    fernet = Fernet(_values(workdir / ".env")["AIRFLOW_FERNET_KEY"])
    assert fernet.decrypt(fernet.encrypt(b"conn-password")) == b"conn-password"


def test_init_refuses_to_overwrite_without_force(workdir, capsys):
    (workdir / ".env").write_text("POSTGRES_PASSWORD=the-live-one\n")
    code, out, err = _run(["secrets", "init"], capsys)
    assert code == 2 and out == ""
    assert ".env exists" in err and "--force" in err
    assert "shown once" not in err  # no key made for nothing
    assert (workdir / ".env").read_text() == "POSTGRES_PASSWORD=the-live-one\n"


def test_init_force_replaces_the_file_and_makes_it_private(workdir, capsys):
    env_file = workdir / ".env"
    env_file.write_text("POSTGRES_PASSWORD=old\n")
    env_file.chmod(0o644)
    code, _, _ = _run(["secrets", "init", "--force", "--docker-gid", "1"], capsys)
    assert code == 0
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert _values(env_file)["POSTGRES_PASSWORD"] != "old"


def test_init_print_writes_nothing(workdir, capsys):
    code, out, err = _run(["secrets", "init", "--print", "--docker-gid", "1"], capsys)
    assert code == 0
    assert not (workdir / ".env").exists()
    assert "TUNELOOP_ENV=production" in out and "AIRFLOW_FERNET_KEY=" in out
    assert _shown_key(err) not in out


def test_init_never_makes_the_containers_root(workdir, capsys):
    _run(["secrets", "init", "--airflow-uid", "0", "--docker-gid", "1"], capsys)
    assert _values(workdir / ".env")["AIRFLOW_UID"] == "50000"


def test_init_output_passes_the_production_checks(workdir, capsys):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    code, out, err = _run(["secrets", "check"], capsys)
    assert code == 0, err
    assert json.loads(out)["production_ready"] is True


def test_check_exits_2_listing_every_problem_one_line_each(workdir, capsys):
    code, out, err = _run(["secrets", "check"], capsys)  # dev defaults everywhere
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == "tuneloop secrets: error: not ready for production:"
    named = {line.strip().split(":", 1)[0] for line in lines[1:]}
    assert {"TUNELOOP_USER_HASH_SALT", "TUNELOOP_ROUTER_ADMIN_KEY", "TUNELOOP_ROUTER_CLIENTS",
            "TUNELOOP_MODEL_SERVER_API_KEY", "TUNELOOP_REGISTRY_SIGNING_KEY"} <= named


def test_check_refuses_an_env_file_others_can_read(workdir, capsys):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    (workdir / ".env").chmod(0o644)
    code, _, err = _run(["secrets", "check"], capsys)
    assert code == 2 and "readable by other users" in err and "chmod 600" in err


def test_check_names_a_default_secret_in_the_environment(workdir, capsys, monkeypatch):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://a:b@c/d")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "change-me-in-production")
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "")
    code, _, err = _run(["secrets", "check"], capsys)
    assert code == 2
    assert "AIRFLOW__API_AUTH__JWT_SECRET: is a publicly known default" in err
    assert "AIRFLOW__CORE__FERNET_KEY: is empty" in err
    assert "change-me-in-production" not in err.replace(
        "AIRFLOW__API_AUTH__JWT_SECRET: is a publicly known default", "")


def test_check_lists_the_router_clients_and_refuses_two_clients_named_default(
        workdir, capsys, monkeypatch):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    code, out, _ = _run(["secrets", "check"], capsys)
    assert code == 0 and json.loads(out)["router_clients"] == ["default"]
    monkeypatch.setenv("TUNELOOP_ROUTER_API_KEY", "a-legacy-router-key-0123456789")
    code, _, err = _run(["secrets", "check"], capsys)
    assert code == 2
    assert "names a client 'default', and TUNELOOP_ROUTER_API_KEY is the client" in err
    assert "a-legacy-router-key-0123456789" not in err


def test_client_adds_a_key_and_updates_the_env_file(workdir, capsys):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    env_file = workdir / ".env"
    code, out, err = _run(["secrets", "client", "web-2026", "--env-file", ".env"], capsys)
    assert code == 0
    key = _shown_key(err)
    clients = json.loads(_values(env_file)["TUNELOOP_ROUTER_CLIENTS"])
    assert set(clients) == {"default", "web-2026"}
    assert clients["web-2026"] == key_digest(key)
    assert key not in env_file.read_text() and key not in out
    assert json.loads(out)["clients"] == ["default", "web-2026"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_client_without_env_file_prints_the_new_json_from_settings(workdir, capsys, monkeypatch):
    monkeypatch.setenv("TUNELOOP_ROUTER_CLIENTS", json.dumps({"old": key_digest("k")}))
    code, out, err = _run(["secrets", "client", "new"], capsys)
    assert code == 0
    encoded = json.loads(out)["TUNELOOP_ROUTER_CLIENTS"]
    assert json.loads(encoded) == {"old": key_digest("k"), "new": key_digest(_shown_key(err))}
    assert "TUNELOOP_ROUTER_CLIENTS='" in err


def test_client_works_in_a_production_env_that_has_no_client_yet(workdir, capsys, monkeypatch):
    monkeypatch.setenv("TUNELOOP_ENV", "production")
    code, out, _ = _run(["secrets", "client", "first"], capsys)
    assert code == 0 and json.loads(out)["clients"] == ["first"]


def test_client_refuses_an_existing_name_unless_replaced(workdir, capsys):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    code, _, err = _run(["secrets", "client", "default", "--env-file", ".env"], capsys)
    assert code == 2 and "exists" in err and "revoke" in err
    before = json.loads(_values(workdir / ".env")["TUNELOOP_ROUTER_CLIENTS"])["default"]
    code, _, err = _run(["secrets", "client", "default", "--env-file", ".env", "--replace"],
                        capsys)
    assert code == 0
    after = json.loads(_values(workdir / ".env")["TUNELOOP_ROUTER_CLIENTS"])["default"]
    assert after != before and after == key_digest(_shown_key(err))


def test_client_rejects_a_bad_name(capsys):
    code, _, err = _run(["secrets", "client", "no spaces"], capsys)
    assert code == 2 and "client name 'no spaces'" in err


def test_rotation_is_add_then_revoke(workdir, capsys):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    _run(["secrets", "client", "default-2", "--env-file", ".env"], capsys)
    code, out, _ = _run(["secrets", "revoke", "default", "--env-file", ".env"], capsys)
    assert code == 0 and json.loads(out)["clients"] == ["default-2"]
    assert list(json.loads(_values(workdir / ".env")["TUNELOOP_ROUTER_CLIENTS"])) == \
        ["default-2"]
    code, _, _ = _run(["secrets", "check"], capsys)
    assert code == 0


def test_revoke_of_an_unknown_client_lists_the_known_ones(workdir, capsys):
    _run(["secrets", "init", "--docker-gid", "1"], capsys)
    code, _, err = _run(["secrets", "revoke", "nope", "--env-file", ".env"], capsys)
    assert code == 2 and "the clients are: default" in err


@pytest.mark.parametrize("action", ["init", "client", "revoke", "check"])
def test_every_action_has_help_with_examples(action, capsys):
    code, out, _ = _run(["secrets", action, "--help"], capsys)
    assert code == 0 and "examples:" in out and f"tuneloop secrets {action}" in out
