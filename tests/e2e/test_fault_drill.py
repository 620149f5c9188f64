"""Fault drill: Postgres restarts while a generate_conversations run is in flight.

As in docker-compose.yaml, one PostgreSQL server holds both tuneloop's data and Airflow's
metadata: a private cluster this test owns (the machine's shared server on 5432 is never
touched). The fake LLM answers with latency, so generation shards are still running when the
first rows land; the cluster is then stopped (`pg_ctl stop -m fast`), kept down a few seconds and
started again. Airflow components that exit on losing their database are started again, as
compose's `restart: always` does. Tasks that hit the outage fail, Airflow retries them
(TUNELOOP_RETRY_DELAY_S is short here), and a retried shard resumes from the deterministic ids
already stored. The run must succeed with every requested conversation stored exactly once, and
the drill must prove the outage was actually hit.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from tests.e2e.airflow_harness import AirflowStack, PrivatePostgres, tuneloop_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "generate_conversations"
CONF = {"count": 24, "turns": 2, "seed": 11, "shard_size": 6}  # 4 shards, all in flight
# Every reply takes 0.3 s and one in four 2.5 s more (the fake's "hang" outcome, then a normal
# answer): conversations finish one by one over several seconds, so shards are still writing
# when the first rows land and the database goes down.
SLOW_LLM = {"latency_s": 0.3, "fault_rate": 0.25, "faults": ("hang",), "hang_s": 2.5, "seed": 3}
OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    """Private Postgres (tuneloop data + Airflow metadata) + slow fake LLM + Airflow."""
    from tests.fakes.fake_openai import FakeOpenAIServer

    root = tmp_path_factory.mktemp("fault-drill")
    with PrivatePostgres() as postgres, FakeOpenAIServer(
            responder="tests.fakes.pipeline_replies:reply", **SLOW_LLM) as llm:
        data_url = postgres.create_database("tuneloop")
        metadata_url = postgres.create_database("airflow")
        env = tuneloop_env(database_url=data_url, llm_base_url=llm.base_url,
                           data_dir=root / "data", retry_delay_s=3)
        # No triggerer: nothing here defers.
        with AirflowStack(root / "airflow", metadata_url, env, restart_always=True,
                          components=("api-server", "scheduler", "dag-processor")) as airflow:
            airflow.wait_for_dags([DAG_ID])
            airflow.create_tuneloop_pools()
            airflow.unpause(DAG_ID)
            yield {"airflow": airflow, "postgres": postgres, "data_url": data_url}


def _stored_rows(data_url: str) -> int:
    """Conversations stored so far (0 while the schema is not migrated yet)."""
    engine = create_engine(data_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if conn.scalar(text("SELECT to_regclass('conversations')")) is None:
                return 0
            return int(conn.scalar(text("SELECT count(*) FROM conversations")))
    finally:
        engine.dispose()


def test_generation_survives_a_postgres_restart(drill):
    from tasks.core.db.models import Conversation, GenerationBatch

    airflow: AirflowStack = drill["airflow"]
    postgres: PrivatePostgres = drill["postgres"]
    run_id = airflow.trigger(DAG_ID, CONF)["dag_run_id"]

    deadline = time.monotonic() + 180
    while (stored := _stored_rows(drill["data_url"])) == 0:
        assert time.monotonic() < deadline, "no conversation was stored within 180 s:\n" + (
            airflow.describe_run(DAG_ID, run_id))
        time.sleep(0.5)
    state = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
    assert state == "running", f"the run was {state} before the outage: the drill proves nothing"
    assert stored < CONF["count"], "every row was already stored: nothing left in flight"

    postgres.stop("fast")
    time.sleep(OUTAGE_S)
    postgres.start()

    run = airflow.wait_for_run(DAG_ID, run_id=run_id, timeout=300)
    assert run["state"] == "success"
    print("Airflow components restarted after the outage:", airflow.restarts or "none")

    # The outage was hit: some task failed on it and Airflow ran it again.
    retried = [ti for ti in airflow.task_instances(DAG_ID, run_id) if ti["try_number"] > 1]
    assert retried, ("no task instance needed a retry: the outage did not hit the run\n"
                     + airflow.describe_run(DAG_ID, run_id))
    print("retried after the outage:", ", ".join(
        f"{ti['task_id']}[{ti['map_index']}] x{ti['try_number']}" for ti in retried))
    first_attempts = [log for ti in retried for log in airflow.task_log_files(
        DAG_ID, run_id, ti["task_id"], ti["map_index"]) if log.name == "attempt=1.log"]
    assert any("OperationalError" in log.read_text(errors="replace") for log in first_attempts), (
        "retried tasks did not fail on a database error:\n" + airflow.describe_run(DAG_ID, run_id))

    engine = create_engine(drill["data_url"], poolclass=NullPool)
    with engine.connect() as conn:
        rows = conn.execute(select(Conversation.id, Conversation.item_index, Conversation.status,
                                   Conversation.content_hash, Conversation.failure_reason)).all()
        batch = conn.execute(select(GenerationBatch.status, GenerationBatch.counts)).one()
        cache_rows = conn.scalar(text("SELECT count(*) FROM llm_cache"))
        personas = conn.scalar(select(func.count(func.distinct(Conversation.persona_id))))
    engine.dispose()

    # Nothing lost, nothing twice: one row per requested item.
    assert len(rows) == CONF["count"]
    assert sorted(r.item_index for r in rows) == list(range(CONF["count"]))
    assert len({r.id for r in rows}) == CONF["count"]
    by_status = {s: sum(1 for r in rows if r.status == s) for s in ("ok", "failed", "duplicate")}
    assert sum(by_status.values()) == CONF["count"], by_status
    ok_hashes = [r.content_hash for r in rows if r.status == "ok"]
    assert ok_hashes and len(set(ok_hashes)) == len(ok_hashes)
    # The outage did not turn into recorded failures (those would never be regenerated).
    db_failures = [r.failure_reason for r in rows if r.status == "failed" and any(
        word in (r.failure_reason or "") for word in ("OperationalError", "connection"))]
    assert not db_failures, db_failures
    assert batch.status == "done" and batch.counts["missing"] == 0, batch
    assert batch.counts["ok"] == by_status["ok"]
    assert cache_rows > 0 and personas > 1
