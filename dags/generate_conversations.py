"""
### Generate synthetic conversations

Samples persona × taxonomy cells, runs a user simulator and an assistant through any
OpenAI-compatible endpoint (the local SmolLM2 server by default), post-processes and dedups
with MiniLM embeddings, and stores every conversation with full provenance in Postgres.

* **preview** > 0 renders that many conversations into the task log and stops (no writes).
* Work is sharded with dynamic task mapping; a rerun resumes (deterministic ids).
* Emits `tuneloop://postgres/conversations`, which schedules **tag_conversations**.

Logic: `tasks/generate/` · prompts: `include/prompts/generation/` · taxonomy and personas:
`include/rubrics/`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from tuneloop_airflow.common import CONVERSATIONS_ASSET, DEFAULT_ARGS, LLM_POOL, TAGS, dag_params

DAG_ID = "generate_conversations"

PREVIEW_TASK_ID = "preview"
PLAN_TASK_ID = "plan_batch"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "generate"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "count": Param(20, type="integer", minimum=1, description="conversations to generate"),
        "turns": Param(2, type="integer", minimum=1, maximum=20,
                       description="user+assistant exchanges; 1 = a single QA pair"),
        "persona_set": Param("default", type="string"),
        "seed": Param(42, type="integer"),
        "preview": Param(0, type="integer", minimum=0,
                         description="> 0: render this many conversations to the log, no writes"),
        "base_url": Param("", type="string",
                          description="OpenAI-compatible endpoint; empty = settings/connection"),
        "model": Param("", type="string", description="model name; empty = settings default"),
        "shard_size": Param(25, type="integer", minimum=1),
    }),
)
def generate_conversations():
    @task
    def migrate_schema() -> None:
        from tasks.core.db import migrate

        migrate()

    @task.short_circuit(task_id=PREVIEW_TASK_ID)
    def preview_or_continue(params: dict | None = None) -> bool:
        from tasks.generate import format_preview, preview

        if params["preview"] > 0:
            cfg = _config(params)
            print(format_preview(preview(cfg, params["preview"])))
            return False
        return True

    @task(task_id=PLAN_TASK_ID)
    def plan(params: dict | None = None) -> list[dict]:
        from tasks.generate import plan_batch

        return plan_batch(_config(params))["shards"]  # each shard carries its batch_id

    @task(pool=LLM_POOL, max_active_tis_per_dagrun=4)
    def generate_shard(shard: dict, params: dict | None = None) -> dict:
        from tasks.generate import generate_shard as run_shard

        return run_shard(shard, _config(params))

    @task(outlets=[CONVERSATIONS_ASSET])
    def finalize(shards: list[dict], shard_results: list[dict], outlet_events=None) -> dict:
        from tasks.generate import finalize_batch

        batch_id = shards[0]["batch_id"]
        summary = finalize_batch(batch_id)
        outlet_events[CONVERSATIONS_ASSET].extra = {"batch_id": batch_id}
        return summary

    planned = plan()
    migrate_schema() >> preview_or_continue() >> planned
    finalize(planned, generate_shard.expand(shard=planned))


def _config(params: dict):
    from tasks.generate import GenerationConfig

    overrides = {k: params[k] for k in ("count", "turns", "persona_set", "seed", "shard_size")}
    if params.get("base_url"):
        overrides["generator_base_url"] = overrides["user_sim_base_url"] = params["base_url"]
    if params.get("model"):
        overrides["generator_model"] = overrides["user_sim_model"] = params["model"]
    return GenerationConfig(**overrides)


generate_conversations()
