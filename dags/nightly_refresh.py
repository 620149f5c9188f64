"""
### Nightly refresh and retrain

Runs at 02:00 UTC (TUNELOOP_NIGHTLY_CRON). Ingests the day's reactions into a reaction-signal
dataset and retrains **only** when the minimum new-signal count (Params `min_new_positive` /
`min_new_negative`, also the dataset build's minimums) is met and the gate passes;
otherwise it skips with one clear log line saying which threshold was not met and the counts.
It always refreshes the shadow comparison so the report reflects the latest reactions.

Before counting, `purge_expired_text` wipes the text (prompts, answers, context) of interactions
older than TUNELOOP_RETENTION_DAYS (`tuneloop retention`); with that setting unset it logs that
text is kept and does nothing. Purged or erased interactions are never signals.

Retraining is data-aware: publishing the new dataset asset schedules **train_and_register**.
Logic: `tasks/signals/stage.py`, `tasks/signals/erasure.py`, `tasks/shadow/stage.py`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import CronTriggerTimetable, Param, dag, task

from tuneloop_airflow.common import (
    DATASET_ASSET,
    DEFAULT_ARGS,
    LLM_POOL,
    NIGHTLY_CRON,
    TAGS,
    dag_params,
)

DAG_ID = "nightly_refresh"

DECIDE_TASK_ID = "enough_new_signals"


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable(NIGHTLY_CRON, timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "nightly", "signals"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "min_new_positive": Param(500, type="integer", minimum=0),
        "min_new_negative": Param(500, type="integer", minimum=0),
    }),
)
def nightly_refresh():
    @task(pool=LLM_POOL)
    def refresh_comparison() -> dict:
        from tasks.shadow.stage import compare_and_report

        return compare_and_report(deployment_id=None)

    @task
    def purge_expired_text() -> dict:
        from tasks.signals.erasure import nightly_retention

        return nightly_retention()

    @task
    def count_signals(params: dict | None = None) -> dict:
        from tasks.signals.stage import nightly_decision

        return nightly_decision(min_new_positive=params["min_new_positive"],
                                min_new_negative=params["min_new_negative"])

    @task.short_circuit(task_id=DECIDE_TASK_ID)
    def enough_new_signals(decision: dict) -> bool:
        import logging

        logging.getLogger(__name__).info("nightly retrain: %s", decision["reason"])
        return bool(decision["retrain"])

    @task
    def build(params: dict | None = None) -> dict:
        from tasks.signals.stage import build_reaction_dataset_or_skip, nightly_signal_config

        return build_reaction_dataset_or_skip(nightly_signal_config(
            params["min_new_positive"], params["min_new_negative"]))

    @task.short_circuit
    def gate_passed(result: dict) -> bool:
        return bool(result.get("built")) and bool(result.get("gate_passed", True))

    @task(outlets=[DATASET_ASSET])
    def publish(result: dict, outlet_events=None) -> dict:
        outlet_events[DATASET_ASSET].extra = {"dataset_id": result["dataset_id"]}
        return {"dataset_id": result["dataset_id"]}

    refresh_comparison()
    decision = count_signals()
    purge_expired_text() >> decision  # purged text is never counted nor built
    built = build()
    enough_new_signals(decision) >> built
    gate_passed(built) >> publish(built)


nightly_refresh()
