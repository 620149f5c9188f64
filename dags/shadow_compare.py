"""
### Compare champion and challenger on live reactions

For the active shadow deployment, computes per variant: requests, magic-zone `done` rate
(15 s–2 min), quick-`dismiss` rate (< 5 s), mean dwell — with Wilson confidence intervals and a
two-proportion test behind a minimum sample size; in mirror mode also a pairwise judge on the
mirrored answers (both orders). The decision rule says **promote**, **keep_collecting** or
**roll back**; with `apply_decision` on, it moves the MLflow `champion` alias.

The HTML report (+ PNG charts) is logged to MLflow and its path is printed in the task log.
Scheduled hourly (TUNELOOP_SHADOW_COMPARE_CRON) and after each new challenger; triggerable.
Logic: `tasks/shadow/stage.py`, `tasks/shadow/stats.py`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from tuneloop_airflow.common import (
    DEFAULT_ARGS,
    LLM_POOL,
    MODEL_ASSET,
    SHADOW_COMPARE_CRON,
    TAGS,
    dag_params,
)

DAG_ID = "shadow_compare"


@dag(
    dag_id=DAG_ID,
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SHADOW_COMPARE_CRON, timezone="UTC"), assets=[MODEL_ASSET]
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "shadow", "mlflow"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "deployment_id": Param("", type="string", description="empty = the active deployment"),
        "min_samples": Param(100, type="integer", minimum=1,
                             description="per-variant minimum before any decision"),
        "alpha": Param(0.05, type="number", exclusiveMinimum=0, maximum=0.5),
        "apply_decision": Param(False, type="boolean",
                                description="move the champion alias when the rule says so"),
    }),
)
def shadow_compare():
    @task(pool=LLM_POOL)
    def compare(params: dict | None = None) -> dict:
        from tasks.shadow.stage import compare_and_report

        report = compare_and_report(
            deployment_id=params["deployment_id"] or None, min_samples=params["min_samples"],
            alpha=params["alpha"],
        )
        print(f"shadow comparison report: {report['report_uri']}")
        return report

    @task
    def decide(report: dict, params: dict | None = None) -> dict:
        from tasks.shadow.stage import apply_decision

        return apply_decision(report, enabled=params["apply_decision"])

    decide(compare())


shadow_compare()
