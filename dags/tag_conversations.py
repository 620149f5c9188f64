"""
### Tag and judge conversations

Runs the five taggers (emotion, topic, temporal, belief, hallucination) and the binary rubric
judge (two judge backends, agreement reported) over conversations that lack a result for the
current tagger/rubric version, so reruns and template changes re-tag only what is needed.

* Scheduled by `tuneloop://postgres/conversations` (after **generate_conversations**) and
  triggerable from the UI with Params.
* Failed attempts are recorded in `tag_failures` with the raw output; nothing crashes a batch.
* Emits `tuneloop://postgres/tag_results`, which schedules **curate_dataset**.

Logic: `tasks/tag/stage.py` (taggers and judge shards), `tasks/judge/` · prompts: `include/prompts/taggers/`,
`include/prompts/judge/` · rubric: `include/rubrics/rubric.yaml`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from tuneloop_airflow.common import (
    CONVERSATIONS_ASSET,
    DEFAULT_ARGS,
    LLM_POOL,
    TAGS,
    TAGS_ASSET,
    dag_params,
)

DAG_ID = "tag_conversations"


@dag(
    dag_id=DAG_ID,
    schedule=[CONVERSATIONS_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "tag"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "taggers": Param(["emotion", "topic", "temporal", "belief", "hallucination"],
                         type="array", description="taggers to run"),
        "classifier_backend": Param("embedding", enum=["embedding", "llm"],
                                    description="backend for emotion/topic/temporal"),
        "retries": Param(3, type="integer", minimum=1, maximum=50,
                         description="LLM attempts per tagger before recording a failure"),
        "judges": Param(["judge", "judge2"], type="array",
                        description="judge slots (endpoints from settings/connections)"),
        "judge_policy": Param("both", enum=["both", "either"]),
        "batch_id": Param("", type="string", description="limit to one generation batch"),
        "shard_size": Param(50, type="integer", minimum=1),
    }),
)
def tag_conversations():
    @task(multiple_outputs=False)
    def plan(params: dict | None = None) -> list[dict]:
        from tasks.tag.stage import plan_tagging

        return plan_tagging(_config(params))

    @task(pool=LLM_POOL)
    def tag_shard(shard: dict, params: dict | None = None) -> dict:
        from tasks.tag.stage import tag_shard as run

        return run(shard, _config(params))

    @task(pool=LLM_POOL)
    def judge_shard(shard: dict, params: dict | None = None) -> dict:
        from tasks.tag.stage import judge_shard as run

        return run(shard, _config(params))

    @task(outlets=[TAGS_ASSET])
    def stats(tagged: list[dict], judged: list[dict], params: dict | None = None) -> dict:
        from tasks.core.settings import get_settings
        from tasks.tag.stage import tagging_stats

        out_dir = get_settings().data_dir / "reports" / "tagging"
        return tagging_stats(_config(params), out_dir)

    shards = plan()
    stats(tag_shard.expand(shard=shards), judge_shard.expand(shard=shards))


def _config(params: dict):
    from tasks.tag.config import TaggingConfig

    return TaggingConfig.from_params(params)


tag_conversations()
