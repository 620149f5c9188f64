"""The register stage's entry point for `train_and_register`: log a finished training to MLflow
once, register it as a version with alias `challenger`, and stage its adapter for serving.

Idempotent: the MLflow run id is recorded in the run folder (`mlflow_run.json`), so a rerun after
a crash reuses the logged run, and `register_version` returns the existing version for a run.
The registry itself (aliases, versions, downloads) is `tasks.register.registry`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.register.registry import materialize_adapter, register_version
from tasks.register.runs import load_dataset_ref, log_training_run

RUN_RECORD = "mlflow_run.json"


def register_training(prepared: Mapping[str, Any], trained: Mapping[str, Any]) -> dict[str, Any]:
    """`prepared` from `tasks.train.stage.prepare_training`, `trained` from `collect_training`."""
    record_path = Path(prepared["run_dir"]) / RUN_RECORD
    if record_path.exists():
        run_id = json.loads(record_path.read_text())["run_id"]
    else:
        dataset = load_dataset_ref(prepared["dataset"]["dataset_id"])
        run_id = log_training_run(trained, trained["config"], dataset=dataset,
                                  run_name=f"train-{prepared['run_key']}")
        record_path.write_text(json.dumps({"run_id": run_id}))
    registered = register_version(run_id)
    adapter = materialize_adapter(registered["version"])
    return {
        "version": str(registered["version"]), "model_name": registered["model_name"],
        "run_id": run_id, "adapter_dir": str(adapter or trained["adapter_dir"]),
        "base_model": prepared["base_model"], "val_path": prepared["dataset"]["val_path"],
        "dataset_id": prepared["dataset"]["dataset_id"],
        "metrics": {k: v for k, v in trained["metrics"].items() if isinstance(v, int | float)},
    }
