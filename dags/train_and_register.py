"""
### Train a LoRA adapter, register it in MLflow and shadow-deploy it

1. Resolves the dataset: the `dataset_id` Param, else the triggering asset event, else the latest
   dataset whose gate passed (a dataset whose gate failed is refused).
2. Renders the Axolotl config (`include/training/lora.yaml` + Params) and trains with the chosen
   backend: **local** (transformers + peft on this worker), **docker** (Dockerfile.trainer with a
   GPU device request) or **kubernetes** (a GPU pod).
3. Logs the run to MLflow (config, loss curve, eval metrics, dataset lineage, adapter only),
   registers a model version with alias **challenger**, evaluates it against the base model
   (perplexity, rubric pass rate, pairwise win rate / ELO, HTML model card), and writes a shadow
   deployment so the router starts sending the challenger its share of traffic.

Scheduled by `tuneloop://datasets/curated`; emits `tuneloop://mlflow/challenger`.
Logic, one stage per step: `tasks/train/stage.py` (prepare, train, collect),
`tasks/register/stage.py` (register), `tasks/evaluate/stage.py` (evaluate_registered),
`tasks/shadow/stage.py` (deploy_registered).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from tuneloop_airflow.common import (
    DATASET_ASSET,
    DEFAULT_ARGS,
    GPU_POOL,
    LLM_POOL,
    MODEL_ASSET,
    TAGS,
    dag_params,
)
from tuneloop_airflow.operators import ContainerTrainerOperator

DAG_ID = "train_and_register"

LOCAL_TASK_ID = "train_local"
DOCKER_TASK_ID = "train_docker"
KUBERNETES_TASK_ID = "train_kubernetes"
BACKEND_TASK_IDS = {"local": LOCAL_TASK_ID, "docker": DOCKER_TASK_ID,
                    "kubernetes": KUBERNETES_TASK_ID}


@dag(
    dag_id=DAG_ID,
    schedule=[DATASET_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "train", "mlflow"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "dataset_id": Param("", type="string",
                            description="empty = triggering asset event, else latest gated"),
        "base_model": Param("smollm2-135m-instruct", type="string"),
        "num_epochs": Param(1, type="integer", minimum=1),
        "max_steps": Param(0, type="integer", minimum=0, description="0 = no cap"),
        "learning_rate": Param(2e-4, type="number", exclusiveMinimum=0),
        "lora_r": Param(16, type="integer", minimum=1),
        "backend": Param("local", enum=["local", "docker", "kubernetes"]),
        "evaluate": Param(True, type="boolean"),
        "shadow_mode": Param("canary", enum=["canary", "mirror", "off"]),
        "shadow_share": Param(0.05, type="number", minimum=0, maximum=1),
    }),
)
def train_and_register():
    @task
    def prepare(params: dict | None = None, triggering_asset_events=None) -> dict:
        from tasks.train.stage import prepare_training, resolve_dataset

        dataset_id = params["dataset_id"] or _asset_dataset_id(triggering_asset_events)
        return prepare_training(resolve_dataset(dataset_id or None), params)

    @task.branch
    def choose_backend(prepared: dict) -> str:
        return BACKEND_TASK_IDS[prepared["backend"]]

    @task(task_id=LOCAL_TASK_ID, pool=GPU_POOL)
    def train_local(prepared: dict) -> dict:
        from tasks.train.stage import run_local_training

        return run_local_training(prepared)

    @task(trigger_rule="none_failed_min_one_success")
    def register(prepared: dict) -> dict:
        from tasks.register.stage import register_training
        from tasks.train.stage import collect_training

        return register_training(prepared, collect_training(prepared))

    @task(pool=LLM_POOL)
    def evaluate(registered: dict, params: dict | None = None) -> dict:
        from tasks.evaluate.stage import evaluate_registered

        if not params["evaluate"]:
            return {"skipped": True}
        return evaluate_registered(registered)

    @task(outlets=[MODEL_ASSET])
    def shadow_deploy(registered: dict, evaluation: dict, params: dict | None = None,
                      outlet_events=None) -> dict:
        from tasks.shadow.stage import deploy_registered

        deployment = deploy_registered(registered, mode=params["shadow_mode"],
                                   share=params["shadow_share"])
        outlet_events[MODEL_ASSET].extra = {"version": registered["version"],
                                            "deployment_id": deployment["deployment_id"]}
        return deployment

    prepared = prepare()
    branch = choose_backend(prepared)
    trainers = [
        train_local(prepared),
        ContainerTrainerOperator(task_id=DOCKER_TASK_ID, backend="docker", prepared=prepared,
                                 pool=GPU_POOL),
        ContainerTrainerOperator(task_id=KUBERNETES_TASK_ID, backend="kubernetes",
                                 prepared=prepared, pool=GPU_POOL),
    ]
    registered = register(prepared)
    for trainer in trainers:
        branch >> trainer >> registered
    shadow_deploy(registered, evaluate(registered))


def _asset_dataset_id(events) -> str | None:
    """The dataset id carried by the newest triggering asset event, if any."""
    if not events:
        return None
    for asset_events in events.values():
        for event in reversed(list(asset_events)):
            if event.extra and event.extra.get("dataset_id"):
                return str(event.extra["dataset_id"])
    return None


train_and_register()
