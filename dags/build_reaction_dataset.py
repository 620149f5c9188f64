"""
### Build a dataset from production reaction signals

Turns served interactions and their reactions into training data (seed rules):
positive = `done` with dwell 15 s–2 min, negative = `dismiss` under 5 s (windows configurable).
Positives become SFT rows; chosen/rejected pairs for the same (or embedding-near) context become
DPO pairs. Everything exported is de-identified (salted user hashes, PII scrubbed).

* Only answers users were shown count (champion/challenger, status ok; never mirror copies,
  erased or retention-purged interactions), and an example whose chat history holds an assistant
  turn the router did not serve to that user is dropped (`unverified_history`): a client cannot
  write "assistant" words itself and get them trained on. Each user contributes at most
  `max_examples_per_user` examples (`capped_per_user`).

* Below the minimum signal counts (500 positive / 500 negative by default) the build refuses with
  the counts, and downstream training is skipped.
* Emits `tuneloop://datasets/curated` (extra: dataset_id) when a dataset was built and gated.

Logic: `tasks/signals/stage.py`, `tasks/signals/labels.py`, `tasks/datasets/deid/`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from tuneloop_airflow.common import DATASET_ASSET, DEFAULT_ARGS, TAGS, dag_params

DAG_ID = "build_reaction_dataset"

BUILT_TASK_ID = "enough_signals"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "signals", "curate"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "min_positive": Param(500, type="integer", minimum=1),
        "min_negative": Param(500, type="integer", minimum=0),
        "done_min_ms": Param(15000, type="integer", minimum=0),
        "done_max_ms": Param(120000, type="integer", minimum=0),
        "dismiss_max_ms": Param(5000, type="integer", minimum=0),
        "pseudonymize": Param(False, type="boolean",
                              description="numbered placeholders consistent within a "
                                          "conversation (<PERSON_1>, <EMAIL_1>) instead of "
                                          "typed ones (<PERSON>)"),
        "max_examples_per_user": Param(50, type="integer", minimum=0,
                                       description="at most this many examples from one "
                                                   "(hashed) user; 0 = no cap"),
    }),
)
def build_reaction_dataset():
    @task
    def build(params: dict | None = None) -> dict:
        from tasks.signals.stage import SignalConfig, build_reaction_dataset_or_skip

        return build_reaction_dataset_or_skip(SignalConfig.from_params(params))

    @task.short_circuit(task_id=BUILT_TASK_ID)
    def enough_signals(result: dict) -> bool:
        return bool(result.get("built")) and bool(result.get("gate_passed", True))

    @task(outlets=[DATASET_ASSET])
    def publish(result: dict, outlet_events=None) -> dict:
        outlet_events[DATASET_ASSET].extra = {"dataset_id": result["dataset_id"]}
        return {"dataset_id": result["dataset_id"]}

    result = build()
    enough_signals(result) >> publish(result)


build_reaction_dataset()
