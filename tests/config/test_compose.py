"""docker-compose.yaml: the official Airflow 3 layout plus tuneloop's services, validated."""

from __future__ import annotations

import os
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


def test_compose_client_validates_the_file():
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose missing in CI: .ci/run installs Debian's docker-compose")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    env = {**os.environ, "TUNELOOP_USER_HASH_SALT": "test-salt"}
    result = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Without the salt the stack refuses to start, and says which variable to set.
    env.pop("TUNELOOP_USER_HASH_SALT")
    result = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "set TUNELOOP_USER_HASH_SALT to a long random secret" in result.stderr


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
    assert init["environment"]["AIRFLOW_ADMIN_PASSWORD"] == "${AIRFLOW_ADMIN_PASSWORD:-admin}"
    assert 'chown -R "${AIRFLOW_UID:-50000}:0" /opt/airflow/logs /opt/airflow/config ' \
           "/opt/tuneloop-data" in script
    data_mount = "${TUNELOOP_HOST_DATA_DIR:-./data}:/opt/tuneloop-data"
    assert data_mount in compose["services"]["airflow-scheduler"]["volumes"]


def test_docker_backend_can_reach_the_daemon_and_the_network(compose):
    scheduler = compose["services"]["airflow-scheduler"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in scheduler["volumes"]
    assert scheduler["group_add"] == ["${DOCKER_GID:-0}"]
    assert compose["networks"]["default"]["name"] == \
        scheduler["environment"]["TUNELOOP_TRAINER_NETWORK"]
