"""docker-compose.yaml: the official Airflow 3 layout plus tuneloop's services, validated."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


PROFILES = ("celery", "gpu", "vllm", "ollama")
APP_IMAGE = "tuneloop:latest"  # the image of Airflow, the router and the model server
INTERNAL_ONLY = ("model-server", "mlflow", "vllm", "ollama")
# Values no rendered config may hold (tasks.core.secrets.KNOWN_DEFAULT_SECRETS has them all).
PLACEHOLDERS = ("change-me", "password1234", "tuneloop-dev", "tuneloop-local")


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose missing in CI: .ci/run installs Debian's docker-compose")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    return binary


def _compose_config(env_file: Path, *files: Path) -> subprocess.CompletedProcess:
    """`docker-compose config` with every profile, reading only `env_file` (not a developer's
    .env, nor this process's environment)."""
    argv = [_docker_compose(), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for path in files or (COMPOSE,):
        argv += ["-f", str(path)]
    for profile in PROFILES:
        argv += ["--profile", profile]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run([*argv, "config"], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def production_env_file(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """What `tuneloop secrets init --print` writes, with a Docker group (no socket here)."""
    from tasks.cli.secrets import production_env, render_env

    values, _ = production_env(airflow_uid=1000, host_data_dir="/srv/tuneloop-data",
                               docker_gid=998)
    path = tmp_path_factory.mktemp("compose") / ".env"
    path.write_text(render_env(values))
    return path, values


@pytest.fixture(scope="module")
def rendered(production_env_file) -> dict:
    result = _compose_config(production_env_file[0])
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*_strings(key), *_strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [str(node)] if node is not None else []


def _volume_sources(service: dict) -> list[str]:
    return [v.split(":", 1)[0] if isinstance(v, str) else str(v.get("source"))
            for v in service.get("volumes", [])]


def test_compose_client_validates_the_file_with_a_secrets_init_env(rendered):
    assert {"router", "model-server", "vllm", "ollama", "trainer"} <= set(rendered["services"])


def test_without_an_env_file_compose_refuses_naming_a_variable(tmp_path):
    empty = tmp_path / ".env"
    empty.write_text("")
    result = _compose_config(empty)
    assert result.returncode != 0
    assert "run tuneloop secrets init" in result.stderr
    required = re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text())
    assert any(name in result.stderr for name in required), result.stderr


@pytest.mark.parametrize("variable", ["POSTGRES_PASSWORD", "TUNELOOP_ROUTER_CLIENTS",
                                      "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
                                      "MLFLOW_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                                      "TUNELOOP_MODEL_SERVER_API_KEY", "DOCKER_GID",
                                      "REDIS_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"])
def test_each_secret_is_required_not_defaulted(production_env_file, tmp_path, variable):
    from tasks.cli.secrets import render_env

    _, values = production_env_file
    partial = tmp_path / ".env"
    partial.write_text(render_env({k: v for k, v in values.items() if k != variable}))
    result = _compose_config(partial)
    assert result.returncode != 0, f"compose starts without {variable}"
    assert "run tuneloop secrets init" in result.stderr


def test_only_the_router_and_the_airflow_ui_publish_ports(rendered):
    published = {name for name, svc in rendered["services"].items() if svc.get("ports")}
    assert published == {"router", "airflow-apiserver"}
    for name in INTERNAL_ONLY:
        assert not rendered["services"][name].get("ports"), name


def test_llm_servers_sit_on_the_internal_network_only(rendered):
    assert rendered["networks"]["models"]["internal"] is True
    for name in ("model-server", "vllm", "ollama"):
        assert set(rendered["services"][name]["networks"]) == {"models"}, name
    # ... and what calls them is on it too
    for name in ("router", "airflow-scheduler", "airflow-worker"):
        assert "models" in rendered["services"][name]["networks"], name


def test_the_docker_socket_reaches_only_the_task_runners(rendered):
    with_socket = {name for name, svc in rendered["services"].items()
                   if "/var/run/docker.sock" in _volume_sources(svc)}
    assert with_socket == {"airflow-scheduler", "airflow-worker"}
    for name in with_socket:
        assert rendered["services"][name]["group_add"] == ["998"]
    assert not any("group_add" in svc for name, svc in rendered["services"].items()
                   if name not in with_socket)


def test_every_tuneloop_and_airflow_service_runs_in_production_mode(rendered):
    app = {name: svc for name, svc in rendered["services"].items()
           if svc.get("image") == APP_IMAGE}
    assert {"router", "model-server", "airflow-scheduler", "airflow-init"} <= set(app)
    for name, svc in app.items():
        assert svc["environment"]["TUNELOOP_ENV"] == "production", name


SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|SALT|CLIENTS|TOKEN")


def test_no_known_default_secret_anywhere_in_the_rendered_config(rendered):
    from tasks.core.secrets import KNOWN_DEFAULT_SECRETS

    secrets_seen = 0
    for name, svc in rendered["services"].items():
        for variable, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                secrets_seen += 1
                assert value and str(value) not in KNOWN_DEFAULT_SECRETS, (name, variable)
        command = svc.get("command") or []
        if "--api-key" in command:
            assert command[command.index("--api-key") + 1] not in KNOWN_DEFAULT_SECRETS
    assert secrets_seen > 50
    for text in _strings(rendered):
        assert not any(p in text for p in PLACEHOLDERS), text
        for password in re.findall(r"://[^:/@\s]*:([^@/\s]*)@", text):
            assert password and password not in KNOWN_DEFAULT_SECRETS, text
    env = rendered["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__FERNET_KEY"] and env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert rendered["services"]["airflow-init"]["environment"]["AIRFLOW_ADMIN_PASSWORD"]


def test_the_rendered_environment_passes_the_production_checks(rendered, monkeypatch, tmp_path):
    """What compose hands the scheduler (an Airflow process) is what load_settings accepts."""
    from tasks.core.settings import load_settings

    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(os.environ):
        if name.startswith(("TUNELOOP_", "AIRFLOW_", "AIRFLOW__", "MLFLOW_")) or \
                name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for service in ("airflow-scheduler", "router", "model-server", "airflow-init"):
        env = rendered["services"][service]["environment"]
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, str(value))
            settings = load_settings()
        assert settings.env == "production"
        assert settings.is_airflow_process == service.startswith("airflow"), service


def test_mlflow_runs_the_basic_auth_app_without_a_host_wildcard(rendered):
    entrypoint = (ROOT / "mlflow" / "entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entrypoint
    assert "'*'" not in entrypoint and ":-*}" not in entrypoint
    assert "mlflow[auth]" in (ROOT / "mlflow" / "Dockerfile").read_text()
    env = rendered["services"]["mlflow"]["environment"]
    assert "*" not in env["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] != env["MLFLOW_TRACKING_USERNAME"]
    for service in ("router", "airflow-scheduler", "trainer"):
        client = rendered["services"][service]["environment"]
        assert client["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_TRACKING_USERNAME"]
        assert client["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_TRACKING_PASSWORD"]


def test_vllm_requires_the_model_server_key(rendered, production_env_file):
    command = rendered["services"]["vllm"]["command"]
    key = production_env_file[1]["TUNELOOP_MODEL_SERVER_API_KEY"]
    assert command[command.index("--api-key") + 1] == key


def test_router_and_model_server_get_no_airflow_secret(rendered):
    for name in ("router", "model-server"):
        env = rendered["services"][name]["environment"]
        assert not [k for k in env if k.startswith("AIRFLOW")], name


def test_the_trainer_image_runs_unprivileged():
    text = (ROOT / "Dockerfile.trainer").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "useradd" in text


def test_the_dev_override_publishes_on_loopback_only(production_env_file):
    result = _compose_config(production_env_file[0], COMPOSE, ROOT / "docker-compose.dev.yaml")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in INTERNAL_ONLY:
        ports = services[name]["ports"]
        assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), (name, ports)


def test_expected_services_and_profiles(compose):
    services = compose["services"]
    for name in ("postgres", "mlflow", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer", "airflow-init", "router",
                 "model-server"):
        assert name in services and "profiles" not in services[name], name
    assert services["airflow-worker"]["profiles"] == ["celery"]
    assert services["redis"]["profiles"] == ["celery"]
    assert services["trainer"]["profiles"] == ["gpu"]
    assert {"vllm", "ollama"} <= set(services)


def test_every_long_running_service_has_a_healthcheck(compose):
    for name, svc in compose["services"].items():
        if name == "airflow-init":
            continue
        assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_trainer_reserves_an_nvidia_gpu(compose):
    devices = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert compose["services"]["trainer"]["build"]["dockerfile"] == "Dockerfile.trainer"


def test_init_migrates_airflow_and_tuneloop_and_creates_pools(compose):
    script = "\n".join(compose["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in script
    assert "tuneloop migrate" in script
    assert "tuneloop_llm" in script and "tuneloop_gpu" in script


def test_postgres_creates_airflow_tuneloop_and_mlflow_databases():
    script = (ROOT / "docker/postgres/init-databases.sh").read_text()
    assert "airflow tuneloop mlflow" in script


def _code_reads(name: str) -> bool:
    from tasks.core.settings import Settings

    for field, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else None
        if name == (alias or f"TUNELOOP_{field.upper()}"):
            return True
    sources = [*(ROOT / "tasks").rglob("*.py"), *(ROOT / "plugins").rglob("*.py"),
               *(ROOT / "dags").glob("*.py")]
    return any(f'"{name}"' in path.read_text() for path in sources)


def test_every_tuneloop_variable_in_the_file_is_one_the_code_reads(compose):
    """A misspelt variable is silently ignored (the router once pointed at 127.0.0.1)."""
    names = {name for svc in compose["services"].values()
             for name in (svc.get("environment") or {})
             if name.startswith("TUNELOOP_") or name in ("DATABASE_URL", "MLFLOW_TRACKING_URI")}
    assert "TUNELOOP_ROUTER_CHAMPION_BASE_URL" in names
    unread = sorted(name for name in names if not _code_reads(name))
    assert unread == [], f"set in docker-compose.yaml but read by nothing: {unread}"


def test_router_and_tasks_reach_the_model_server_by_service_name(compose):
    services = compose["services"]
    assert services["router"]["environment"]["TUNELOOP_ROUTER_CHAMPION_BASE_URL"].endswith(
        "http://model-server:8300/v1}")
    for name in ("airflow-scheduler", "router"):
        assert services[name]["environment"]["TUNELOOP_MODEL_SERVER_HOST"] == "model-server"


def test_init_writes_the_admin_password_and_hands_folders_to_the_airflow_user(compose):
    init = compose["services"]["airflow-init"]
    script = "\n".join(init["command"])
    password_file = init["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert f"> {password_file}" in script
    assert init["environment"]["AIRFLOW_ADMIN_PASSWORD"] == \
        "${AIRFLOW_ADMIN_PASSWORD:?run tuneloop secrets init}"
    assert 'chown -R "${AIRFLOW_UID:-50000}:0" /opt/airflow/logs /opt/airflow/config ' \
           "/opt/tuneloop-data" in script
    data_mount = "${TUNELOOP_HOST_DATA_DIR:-./data}:/opt/tuneloop-data"
    assert data_mount in compose["services"]["airflow-scheduler"]["volumes"]


def test_docker_backend_can_reach_the_daemon_and_the_network(compose):
    scheduler = compose["services"]["airflow-scheduler"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in scheduler["volumes"]
    assert scheduler["group_add"][0].startswith("${DOCKER_GID:?")
    assert compose["networks"]["default"]["name"] == \
        scheduler["environment"]["TUNELOOP_TRAINER_NETWORK"]
