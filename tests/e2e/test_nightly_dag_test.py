"""nightly_refresh end to end through `dag.test()` against real Postgres: it skips with a clear
log line while new signals are below the Params' minimums (no dataset, no asset event, so no
retrain), builds and publishes the reaction dataset once they are met (the asset event is what
schedules train_and_register), and skips again when nothing new arrived since that dataset.

The reactions are real rows with planted PII (tests/unit/signals/test_signals_dataset.py's events): 60
interactions → 30 `done` inside 15 s–2 min, 24 quick `dismiss`, 6 outside both windows.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select

from tests.unit.signals.test_signals_dataset import planted_event, reaction_for, store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVENTS = 60
POSITIVE, NEGATIVE = 30, 24
SKIPPED_AFTER_DECISION = ("build", "gate_passed", "publish")


@pytest.fixture()
def nightly_db(dag_test_db):
    engine = dag_test_db("tuneloop_nightly")
    store(engine, [planted_event(i) for i in range(EVENTS)],
          [reaction_for(i) for i in range(EVENTS)])
    return engine


def _run(dagbag, conf: dict) -> tuple[object, dict[str, str]]:
    run = dagbag.dags["nightly_refresh"].test(run_conf=conf)
    return run, {ti.task_id: ti.state for ti in run.get_task_instances()}


def _xcom(run, task_id: str):
    ti = next(ti for ti in run.get_task_instances() if ti.task_id == task_id)
    return ti.xcom_pull(task_ids=task_id)


def _dataset_events(run) -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        return [event.extra for event in session.scalars(
            select(AssetEvent).where(AssetEvent.source_dag_id == "nightly_refresh",
                                     AssetEvent.source_run_id == run.run_id))]


def _datasets(engine) -> list[str]:
    from tasks.core.db.models import Dataset

    with engine.connect() as conn:
        return list(conn.scalars(select(Dataset.id)))


def test_nightly_skips_below_the_minimum_then_retrains_then_skips_without_new_signals(
        dagbag, nightly_db, caplog):
    # 1. Below the Params' minimums: the decision short-circuits; nothing is built or published.
    with caplog.at_level(logging.INFO):
        run, states = _run(dagbag, {"min_new_positive": 50, "min_new_negative": 50})
    assert run.state == "success", states
    assert states["refresh_comparison"] == "success"  # the comparison always refreshes
    assert states["count_signals"] == "success"
    for task_id in SKIPPED_AFTER_DECISION:
        assert states[task_id] == "skipped", states
    reason = _xcom(run, "count_signals")["reason"]
    assert reason == ("skipping retrain: too few new signals in total (no reaction dataset yet): "
                      f"{POSITIVE} positive < 50, {NEGATIVE} negative < 50")
    assert f"nightly retrain: {reason}" in caplog.text
    assert _dataset_events(run) == []
    assert _datasets(nightly_db) == []

    # 2. Minimums met: the build uses the same thresholds (never refused for a stricter total),
    # the gate passes, and publishing emits the dataset asset event that schedules training.
    run, states = _run(dagbag, {"min_new_positive": 20, "min_new_negative": 20})
    assert run.state == "success", states
    for task_id in SKIPPED_AFTER_DECISION:
        assert states[task_id] == "success", states
    built = _xcom(run, "build")
    assert built["built"] and built["gate_passed"]
    assert _datasets(nightly_db) == [built["dataset_id"]]
    assert _dataset_events(run) == [{"dataset_id": built["dataset_id"]}]

    # 3. Nothing new since that dataset: skip again, naming the dataset it counted from.
    run, states = _run(dagbag, {"min_new_positive": 20, "min_new_negative": 20})
    assert run.state == "success", states
    for task_id in SKIPPED_AFTER_DECISION:
        assert states[task_id] == "skipped", states
    assert _xcom(run, "count_signals")["reason"] == (
        f"skipping retrain: too few new signals since dataset {built['dataset_id']}: "
        "0 positive < 20, 0 negative < 20")
    assert _dataset_events(run) == []
    assert _datasets(nightly_db) == [built["dataset_id"]]
