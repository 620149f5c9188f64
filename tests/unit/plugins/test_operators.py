"""The docker training backend (plugins/tuneloop_airflow/operators.py): the unprivileged trainer
runs as the Airflow user, and gets the MLflow login only where the UI never renders it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


@pytest.fixture()
def prepared(tmp_path, monkeypatch):
    from tasks.core.settings import get_settings
    from tasks.train.config import load_training_config
    from tasks.train.container import prepare_container_run

    snapshot = tmp_path / "data" / "train.jsonl"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}) + "\n")
    cfg = load_training_config({"datasets": [{"path": str(snapshot)}],
                                "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "tuneloop")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-s3cret-password")
    get_settings.cache_clear()
    yield prepare_container_run(cfg, run_dir=tmp_path / "data" / "runs" / "r1",
                                artifacts_root=tmp_path / "data").to_dict()
    get_settings.cache_clear()


def _docker(prepared):
    from tuneloop_airflow.operators import ContainerTrainerOperator

    return ContainerTrainerOperator(task_id="train", backend="docker",
                                    prepared=prepared).build_operator(prepared)


def test_the_trainer_runs_as_the_airflow_user_with_group_0(prepared):
    assert _docker(prepared).user == f"{os.getuid()}:0"


def test_the_mlflow_login_goes_to_the_private_environment_only(prepared):
    docker = _docker(prepared)
    assert docker._private_environment == {"MLFLOW_TRACKING_USERNAME": "tuneloop",
                                           "MLFLOW_TRACKING_PASSWORD": "mlflow-s3cret-password"}
    assert "mlflow-s3cret-password" not in json.dumps(docker.environment)
    assert docker.environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_no_login_is_passed_for_a_local_store(prepared, monkeypatch):
    from tasks.core.settings import get_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/mlflow.db")
    get_settings.cache_clear()
    assert _docker(prepared)._private_environment == {}
