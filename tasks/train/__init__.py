"""Training: the Axolotl config model, the local transformers+peft trainer, container launch specs.

- `config`: `AxolotlConfig`, `load_training_config()` (include/training/lora.yaml + overrides),
  `check_sequence_len()`; errors are `TrainingConfigError` with the fix in the message.
- `local`: `train_local(cfg) -> TrainResult` (LoRA, assistant-only loss, packing without
  cross-contamination, eval split, checkpoints, PEFT adapter).
- `container`: `prepare_container_run()`, `docker_trainer_kwargs()`,
  `kubernetes_trainer_kwargs()` for Dockerfile.trainer (axolotl), and
  `collect_axolotl_output()` which the container's entrypoint runs after `axolotl train`.

Nothing here imports Airflow; torch/transformers/peft load only inside the functions that train.
"""

from __future__ import annotations

from tasks.train.config import (
    AxolotlConfig,
    DatasetSpec,
    TrainingConfigError,
    TrainingError,
    load_training_config,
)
from tasks.train.data import check_sequence_len
from tasks.train.local import TrainResult, load_train_result, train_dataset, train_local

__all__ = [
    "AxolotlConfig",
    "DatasetSpec",
    "TrainResult",
    "TrainingConfigError",
    "TrainingError",
    "check_sequence_len",
    "load_train_result",
    "load_training_config",
    "train_dataset",
    "train_local",
]
