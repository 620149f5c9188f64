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
    assert "tasks.cli migrate" in script
    assert "tuneloop_llm" in script and "tuneloop_gpu" in script


def test_postgres_creates_airflow_tuneloop_and_mlflow_databases():
    script = (ROOT / "docker/postgres/init-databases.sh").read_text()
    assert "airflow tuneloop mlflow" in script
