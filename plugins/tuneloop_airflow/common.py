"""Assets, default args, pools and task ids shared by the tuneloop DAGs (parse-time light)."""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Asset

from tuneloop_airflow.callbacks import on_task_failure

# Data-aware scheduling: each stage emits the asset the next stage is scheduled on.
CONVERSATIONS_ASSET = Asset("tuneloop://postgres/conversations", group="tuneloop")
TAGS_ASSET = Asset("tuneloop://postgres/tag_results", group="tuneloop")
DATASET_ASSET = Asset("tuneloop://datasets/curated", group="tuneloop")
MODEL_ASSET = Asset("tuneloop://mlflow/challenger", group="tuneloop")

# Pools bound how hard the loop leans on shared resources (created by airflow-init / the demo).
LLM_POOL = "tuneloop_llm"
GPU_POOL = "tuneloop_gpu"
POOLS = {LLM_POOL: (8, "concurrent tasks calling LLM endpoints"),
         GPU_POOL: (1, "concurrent training jobs on the GPU")}

NIGHTLY_CRON = os.environ.get("TUNELOOP_NIGHTLY_CRON", "0 2 * * *")
SHADOW_COMPARE_CRON = os.environ.get("TUNELOOP_SHADOW_COMPARE_CRON", "30 * * * *")

DEFAULT_ARGS = {
    "owner": "tuneloop",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "on_failure_callback": on_task_failure,
}

TAGS = ["tuneloop"]
