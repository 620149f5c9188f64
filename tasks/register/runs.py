"""Training-run logging: one MLflow run per training, plus metrics and artifacts added later.

One MLflow run per training: the whole trainer config as params, the loss curve and eval loss as
step metrics, perplexity and tokens/s as summary metrics, dataset lineage through
`log_inputs` (name = dataset id, digest = snapshot hash, source = a Postgres dataset URI), and as
artifacts only the adapter folder, the rendered config YAML and the chat template — never the
full base model. Evaluation later adds its results to the same run (`log_run_metrics`,
`log_run_artifact`); registering the run as a model version is `registry.register_version`.

Params, tags, the chat template and every text artifact go through the de-identification of
`tracking` (`deid_text`, `deid_tags`, `deid_artifact`): a config can carry an endpoint URL with
credentials or a system prompt, and evaluation files carry model-written text. Dataset files
are never logged here, only their lineage (ids, hash, counts).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.core.ids import canonical_json
from tasks.core.settings import get_settings
from tasks.register.adapters import stage_adapter
from tasks.register.tracking import (
    ADAPTER_ARTIFACT_PATH,
    DEFAULT_EXPERIMENT,
    TAG_BASE_MODEL,
    TAG_DATASET_HASH,
    TAG_DATASET_ID,
    TAG_DATASET_URI,
    TAG_GATE_PASSED,
    TAG_GATE_RESULT,
    TAG_GIT_SHA,
    TAG_KIND,
    RegistryError,
    deid_artifact,
    deid_tags,
    deid_text,
    ensure_experiment,
    get_client,
    git_sha,
)

log = logging.getLogger(__name__)

CONFIG_ARTIFACT_PATH = "config"
CHAT_TEMPLATE_ARTIFACT = "chat_template.jinja"

# MLflow limits (mlflow/utils/validation.py): param values 6000 chars, keys 250 chars, 100 params
# per batch, 1000 metrics per batch, dataset digest 36 chars.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_DIGEST = 32


# ---- params and metrics ------------------------------------------------------------------------

def _field(obj: Any, name: str, default: Any = None) -> Any:
    """Read `name` from a dataclass/pydantic object or a mapping (TrainResult may cross XCom)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _config_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump(mode="json")
    if hasattr(cfg, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(cfg)
    raise RegistryError(
        f"cannot read a config from {type(cfg).__name__}; pass the AxolotlConfig (pydantic) "
        "or a plain dict"
    )


def flatten_params(value: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested config into MLflow params: dotted keys, lists as JSON, values
    de-identified then truncated (`tracking.deid_text`).

    Lists of dicts (e.g. `datasets`) are indexed (`datasets.0.path`) so each field stays
    searchable; other lists become one JSON value.
    """
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(flatten_params(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
        for index, item in enumerate(value):
            out.update(flatten_params(item, f"{prefix}.{index}" if prefix else str(index)))
        return out
    if isinstance(value, list | tuple):
        text = json.dumps(list(value), default=str)
    elif value is None:
        text = "None"
    elif isinstance(value, Path):
        text = str(value)
    else:
        text = str(value)
    key = _metric_key(prefix or "value")[:MAX_KEY]
    out[key] = deid_text(text, MAX_PARAM_VALUE)
    return out


def _metric_key(name: str) -> str:
    # MLflow names: alphanumerics, underscores, dashes, periods, spaces, colons, slashes.
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(name))[:MAX_KEY]


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _curve(points: Iterable[Any] | None) -> list[tuple[int, float]]:
    """Normalise [(step, loss)] or [{"step":..,"loss":..}] into (int, float) pairs."""
    out: list[tuple[int, float]] = []
    for point in points or []:
        if isinstance(point, Mapping):
            step = point.get("step")
            loss = point.get("loss", point.get("eval_loss", point.get("value")))
        else:
            step, loss = point[0], point[1]
        number = _finite(loss)
        if step is not None and number is not None:
            out.append((int(step), number))
    return out


# ---- dataset lineage ---------------------------------------------------------------------------

def dataset_source_uri(dataset_id: str) -> str:
    """`postgresql://host:port/db/datasets/<id>` without credentials (the system of record)."""
    from sqlalchemy.engine import make_url

    url = get_settings().database_url
    if not url:
        return f"postgresql://embedded/tuneloop/datasets/{dataset_id}"
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    host = parsed.host or "localhost"
    port = f":{parsed.port}" if parsed.port else ""
    return f"postgresql://{host}{port}/{parsed.database or ''}/datasets/{dataset_id}"


def load_dataset_ref(dataset_id: str, engine=None) -> dict[str, Any]:
    """The lineage dict `log_training_run` wants, read from the `datasets` table."""
    from tasks.core.db.engine import get_engine, session_scope
    from tasks.core.db.models import Dataset

    with session_scope(engine or get_engine()) as session:
        row = session.get(Dataset, dataset_id)
        if row is None:
            raise RegistryError(
                f"dataset {dataset_id!r} is not in the datasets table; export it first "
                "(tasks.datasets.export) or pass the dataset dict explicitly"
            )
        return {
            "id": row.id, "name": row.name, "content_hash": row.content_hash,
            "artifact_uri": row.artifact_uri, "gate_passed": row.gate_passed,
            "gate_result": row.gate_result, "counts": row.counts,
        }


def _dataset_input(dataset: Mapping[str, Any]):  # -> mlflow.entities.DatasetInput
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class PostgresDatasetSource(DatasetSource):
        """A dataset snapshot whose system of record is a row in tuneloop's Postgres."""

        def __init__(self, uri: str, artifact_uri: str = "") -> None:
            self.uri = uri
            self.artifact_uri = artifact_uri

        @staticmethod
        def _get_source_type() -> str:
            return "postgres"

        def load(self) -> str:
            return self.artifact_uri or self.uri

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("postgresql://")

        @classmethod
        def _resolve(cls, raw_source: Any) -> PostgresDatasetSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri, "artifact_uri": self.artifact_uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> PostgresDatasetSource:
            return cls(source_dict["uri"], source_dict.get("artifact_uri", ""))

    class SnapshotDataset(MetaDataset):
        """MetaDataset plus a profile (row counts, full content hash)."""

        def __init__(self, source: DatasetSource, name: str, digest: str,
                     profile: dict[str, Any]) -> None:
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            config = super().to_dict()
            config["profile"] = json.dumps(self._profile, default=str)
            return config

    dataset_id = str(dataset["id"])
    content = str(dataset.get("content_hash") or "")
    source = PostgresDatasetSource(
        str(dataset.get("source_uri") or dataset_source_uri(dataset_id)),
        str(dataset.get("artifact_uri") or ""),
    )
    profile = {"content_hash": content, "counts": dataset.get("counts") or {}}
    snapshot = SnapshotDataset(
        source, name=dataset_id, digest=(content or dataset_id)[:MAX_DIGEST], profile=profile
    )
    entity = snapshot._to_mlflow_entity()
    return DatasetInput(dataset=entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def _gate_passed(dataset: Mapping[str, Any]) -> bool | None:
    if "gate_passed" in dataset and dataset["gate_passed"] is not None:
        return bool(dataset["gate_passed"])
    gate = dataset.get("gate_result")
    if isinstance(gate, Mapping):
        for key in ("passed", "success", "gate_passed"):
            if key in gate:
                return bool(gate[key])
    if isinstance(gate, bool):
        return gate
    return None


# ---- training runs -----------------------------------------------------------------------------

def log_training_run(
    result: Any,
    cfg: Any,
    *,
    dataset: Mapping[str, Any],
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
) -> str:
    """Log one training (TrainResult + its config) as an MLflow run; return the run id.

    `result` needs `adapter_dir`, `metrics` (dict), `loss_curve` [(step, loss)], optionally
    `eval_curve`, `config_yaml_path`, `chat_template`; it may be the object or a dict.
    `dataset` needs `id` and `content_hash`; `artifact_uri`, `gate_result`/`gate_passed`,
    `counts` and `source_uri` are recorded when present.
    """
    from mlflow.entities import Metric, Param

    if not dataset or not dataset.get("id"):
        raise RegistryError(
            "dataset lineage is required: pass dataset={'id': ..., 'content_hash': ...} "
            "(tasks.register.registry.load_dataset_ref(dataset_id) builds it from Postgres)"
        )
    adapter_dir = _field(result, "adapter_dir")
    if adapter_dir is None:
        raise RegistryError("the training result has no adapter_dir; nothing to log")
    adapter_dir = Path(adapter_dir)
    config = _config_dict(cfg)
    base_model = str(config.get("base_model") or _field(result, "base_model") or "unknown")

    client = get_client()
    experiment_id = ensure_experiment(experiment)
    sha = git_sha()
    gate_passed = _gate_passed(dataset)
    gate_result = dataset.get("gate_result")
    tags = deid_tags({
        TAG_KIND: "training",
        TAG_DATASET_ID: str(dataset["id"]),
        TAG_DATASET_HASH: str(dataset.get("content_hash") or ""),
        TAG_DATASET_URI: str(dataset.get("source_uri") or dataset_source_uri(str(dataset["id"]))),
        TAG_GATE_PASSED: "unknown" if gate_passed is None else str(gate_passed).lower(),
        TAG_GATE_RESULT: canonical_json(gate_result if gate_result is not None else {}),
        TAG_BASE_MODEL: base_model,
        TAG_GIT_SHA: sha,
        "mlflow.source.git.commit": sha,
    })
    run = client.create_run(
        experiment_id, run_name=run_name or f"train-{str(dataset['id'])[:12]}",
        tags=tags,
    )
    run_id = run.info.run_id
    try:
        params = flatten_params(config)
        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start:start + PARAMS_PER_BATCH])

        metrics: list[Metric] = []
        timestamp = int(time.time() * 1000)  # display only; MLflow orders by step
        for step, loss in _curve(_field(result, "loss_curve")):
            metrics.append(Metric("train_loss", loss, timestamp, step))
        for step, loss in _curve(_field(result, "eval_curve")):
            metrics.append(Metric("eval_loss", loss, timestamp, step))
        summary = summary_metrics(_field(result, "metrics") or {})
        final_step = max((m.step for m in metrics), default=0)
        curve_names = {m.key for m in metrics}
        for key, value in summary.items():
            if key in curve_names:  # the curve already ends with the trainer's final value
                continue
            metrics.append(Metric(key, value, timestamp, final_step))
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])

        client.log_inputs(run_id, datasets=[_dataset_input(dataset)])
        _log_training_artifacts(client, run_id, result, adapter_dir)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    log.info("logged training run %s (dataset %s, base %s)", run_id, dataset["id"], base_model)
    return run_id


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numeric metrics, plus perplexity = exp(eval_loss) when the trainer gave none."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = _finite(value)
        if number is not None and not isinstance(value, bool):
            out[_metric_key(key)] = number
    if "perplexity" not in out and "eval_loss" in out:
        out["perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out


def _log_training_artifacts(client, run_id: str, result: Any, adapter_dir: Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tuneloop-artifacts-") as tmp:
        staged = Path(tmp) / ADAPTER_ARTIFACT_PATH
        stage_adapter(adapter_dir, staged)
        client.log_artifacts(run_id, str(staged), ADAPTER_ARTIFACT_PATH)
    config_yaml = _field(result, "config_yaml_path")
    if config_yaml and Path(config_yaml).is_file():
        with deid_artifact(config_yaml) as path:
            client.log_artifact(run_id, str(path), CONFIG_ARTIFACT_PATH)
    template = _field(result, "chat_template")
    if template:
        client.log_text(run_id, deid_text(str(template)), CHAT_TEMPLATE_ARTIFACT)


def log_run_metrics(run_id: str, metrics: Mapping[str, Any], *, step: int = 0) -> int:
    """Log finite numeric metrics to an existing run (evaluation results); return the count."""
    from mlflow.entities import Metric

    client = get_client()
    now_ms = int(time.time() * 1000)
    items = [Metric(_metric_key(k), v, now_ms, step) for k, raw in metrics.items()
             if not isinstance(raw, bool) and (v := _finite(raw)) is not None]
    for start in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[start:start + METRICS_PER_BATCH])
    return len(items)


def log_run_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Log a file (de-identified: `tracking.deid_artifact`) or a folder to an existing run."""
    client = get_client()
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        with deid_artifact(path) as logged:
            client.log_artifact(run_id, str(logged), artifact_path)
