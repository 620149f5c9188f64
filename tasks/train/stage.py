"""The training stage's entry points, the functions `train_and_register`'s training tasks call.

`resolve_dataset` picks the gated dataset, `prepare_training` renders the Axolotl config and lays
out the run folder (keyed by the dataset, the overrides and the backend, so a rerun reuses it),
`run_local_training` trains on the worker (a finished run folder is not retrained), and
`collect_training` reads a finished run (local or container) into the JSON-able record the
register stage logs (`tasks.register.stage.register_training`). Evaluation and the shadow
deployment are their own stages (`tasks.evaluate.stage.evaluate_registered`,
`tasks.shadow.stage.deploy_registered`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tasks.core.ids import canonical_json, stable_id
from tasks.core.settings import get_settings

log = logging.getLogger(__name__)

TRAINING_PARAM_KEYS = ("base_model", "num_epochs", "max_steps", "learning_rate", "lora_r",
                       "micro_batch_size", "gradient_accumulation_steps")
BACKENDS = ("local", "docker", "kubernetes")


class DatasetNotTrainable(RuntimeError):
    """The requested dataset does not exist or did not pass its gate."""


def _path_from_uri(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri)


def resolve_dataset(dataset_id: str | None, *, engine: Any = None) -> dict[str, Any]:
    """The dataset to train on: `dataset_id`, else the newest dataset whose gate passed."""
    from sqlalchemy import select

    from tasks.core.db.engine import get_engine, session_scope
    from tasks.core.db.models import Dataset
    from tasks.datasets.export import format_path

    with session_scope(engine or get_engine()) as session:
        if dataset_id:
            row = session.get(Dataset, dataset_id)
            if row is None:
                raise DatasetNotTrainable(
                    f"dataset {dataset_id!r} does not exist; run curate_dataset (or "
                    "build_reaction_dataset) first, or leave dataset_id empty for the latest")
        else:
            row = session.scalars(
                select(Dataset).where(Dataset.gate_passed.is_(True))
                .order_by(Dataset.created_at.desc()).limit(1)
            ).first()
            if row is None:
                raise DatasetNotTrainable(
                    "no dataset has passed its gate yet; run curate_dataset first")
        if not row.gate_passed:
            failed = (row.gate_result or {}).get("failed_expectations", [])
            raise DatasetNotTrainable(
                f"dataset {row.id} failed its quality gate ({', '.join(failed) or 'see gate'}); "
                "fix the data or thresholds and curate again")
        root = _path_from_uri(row.artifact_uri)
        return {
            "dataset_id": row.id,
            "kind": row.kind,
            "content_hash": row.content_hash,
            "artifact_uri": row.artifact_uri,
            "train_path": str(format_path(root, "openai", "train")),
            "val_path": str(format_path(root, "openai", "validation")),
        }


def training_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params (Airflow UI / CLI) → Axolotl config overrides; 0 max_steps means no cap."""
    overrides = {k: params[k] for k in TRAINING_PARAM_KEYS if k in params}
    if not overrides.get("max_steps"):
        overrides.pop("max_steps", None)
    return overrides


def prepare_training(dataset: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Render the config for this dataset + Params and lay out the run folder."""
    from tasks.train.config import load_training_config
    from tasks.train.container import prepare_container_run

    settings = get_settings()
    backend = str(params.get("backend") or settings.trainer_backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    overrides = training_overrides(params)
    run_key = stable_id(dataset["dataset_id"], canonical_json(overrides), backend, length=16)
    run_dir = (settings.data_dir / "runs" / run_key).resolve()
    output_dir = run_dir / "output"
    cfg = load_training_config({
        **overrides,
        "datasets": [{"path": dataset["train_path"]}],
        "output_dir": str(output_dir),
    })
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "axolotl.yaml"
    config_path.write_text(cfg.to_axolotl_yaml())
    prepared: dict[str, Any] = {
        "backend": backend, "run_key": run_key, "run_dir": str(run_dir),
        "config_path": str(config_path), "output_dir": str(output_dir),
        "base_model": cfg.base_model, "overrides": overrides, "dataset": dict(dataset),
    }
    if backend != "local":
        container = prepare_container_run(
            cfg, run_dir=run_dir / "container", artifacts_root=settings.data_dir.resolve(),
            mlflow_tracking_uri=settings.resolved_mlflow_tracking_uri,
        )
        prepared.update(container.to_dict())
        prepared["output_dir"] = container.host_output_dir
    log.info("prepared %s training run %s for dataset %s", backend, run_key,
             dataset["dataset_id"])
    return prepared


def _config(prepared: Mapping[str, Any]):
    import yaml

    from tasks.train.config import load_training_config

    data = yaml.safe_load(Path(prepared["config_path"]).read_text())
    return load_training_config({**data, "output_dir": prepared["output_dir"]})


def run_local_training(prepared: Mapping[str, Any], progress=None) -> dict[str, Any]:
    """Train on this worker; a finished run folder is reused (a rerun does not retrain)."""
    from tasks.train.local import load_train_result, train_local

    output_dir = Path(prepared["output_dir"])
    try:
        result = load_train_result(output_dir)
        log.info("training output %s already complete; reusing it", output_dir)
    except Exception:
        result = train_local(_config(prepared), output_dir=output_dir, progress=progress)
    return result.to_dict()


def collect_training(prepared: Mapping[str, Any]) -> dict[str, Any]:
    """A finished run (local, or the container's output collected) as a JSON-able record: the
    adapter folder, metrics, loss/eval curves, chat template and the resolved training config."""
    from tasks.train.local import load_train_result

    if prepared["backend"] != "local":
        from tasks.train.container import collect_axolotl_output

        collect_axolotl_output(prepared["config_path"], prepared["output_dir"])
    result = load_train_result(prepared["output_dir"])
    return {
        **result.to_dict(),
        "loss_curve": [list(point) for point in result.loss_curve],
        "eval_curve": [list(point) for point in result.eval_curve],
        "chat_template": result.chat_template,
        "config": _config(prepared).model_dump(mode="json"),
    }
