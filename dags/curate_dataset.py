"""
### Curate a dataset behind a Great Expectations gate

Applies the row filters (hallucination, emotion confidence, required taggers, rubric pass and
safety gates, near-duplicate pruning; every exclusion recorded with its reason), runs the Great
Expectations gate on the batch, and writes an immutable, content-hashed snapshot (OpenAI chat,
ShareGPT/chat_template and Alpaca JSONL, with provenance variants, stats and Data Docs).

* Scheduled by `tuneloop://postgres/tag_results`; triggerable from the UI with thresholds.
* **A failed gate short-circuits**: the dataset asset is not emitted, so training does not run;
  the failed expectations are named in the log and stored on the dataset row.
* Emits `tuneloop://datasets/curated` (extra: dataset_id), which schedules **train_and_register**.

Logic: `tasks/curate/stage.py`, `tasks/datasets/gate.py`, `tasks/datasets/export.py`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from tuneloop_airflow.common import DATASET_ASSET, DEFAULT_ARGS, TAGS, TAGS_ASSET, dag_params

DAG_ID = "curate_dataset"

GATE_TASK_ID = "gate_passed"


@dag(
    dag_id=DAG_ID,
    schedule=[TAGS_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "curate", "gate"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "max_hallucination": Param(0.1, type="number", minimum=0, maximum=1),
        "min_emotion_confidence": Param(0.0, type="number", minimum=0, maximum=1),
        "require_rubric_pass": Param(False, type="boolean",
                                     description="drop rows whose rubric score is below the "
                                                 "pass threshold (safety-gate failures always drop)"),
        "min_rows": Param(10, type="integer", minimum=1),
        "batch_id": Param("", type="string", description="limit to one generation batch"),
        "seed": Param(13, type="integer"),
        "pseudonymize": Param(False, type="boolean",
                              description="numbered placeholders consistent within a "
                                          "conversation (<PERSON_1>, <EMAIL_1>) instead of "
                                          "typed ones (<PERSON>)"),
    }),
)
def curate_dataset():
    @task
    def curate(params: dict | None = None) -> dict:
        from tasks.curate.config import CurationConfig
        from tasks.curate.stage import curate as run

        return run(CurationConfig.from_params(params))

    @task.short_circuit(task_id=GATE_TASK_ID)
    def gate_passed(result: dict) -> bool:
        if not result["gate_passed"]:
            import logging

            logging.getLogger(__name__).error(
                "gate failed for dataset %s: %s (Data Docs: %s)", result["dataset_id"],
                ", ".join(result["failed_expectations"]), result.get("data_docs"),
            )
        return bool(result["gate_passed"])

    @task(outlets=[DATASET_ASSET])
    def publish(result: dict, outlet_events=None) -> dict:
        outlet_events[DATASET_ASSET].extra = {"dataset_id": result["dataset_id"]}
        return {"dataset_id": result["dataset_id"], "artifact_uri": result["artifact_uri"]}

    result = curate()
    gate_passed(result) >> publish(result)


curate_dataset()
