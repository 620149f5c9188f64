"""MLflow tracking and model registry for trained LoRA adapters.

One MLflow run per training: the whole trainer config as params, the loss curve and eval loss as
step metrics, perplexity and tokens/s as summary metrics, dataset lineage through
`log_inputs` (name = dataset id, digest = snapshot hash, source = a Postgres dataset URI), and as
artifacts only the adapter folder, the rendered config YAML and the chat template — never the
full base model. Each run becomes a version of one registered model (aliases, not stages):
a new version gets `challenger`; the shadow comparison decides whether `champion` moves.

The base model as champion: MLflow version numbers are integers, so a brand-new registry gets a
real version whose artifact is a small `base/base_model.json` marker (no adapter) tagged
`is_base=true`. `ensure_champion` registers it once and points `champion` at it; consumers call
`materialize_adapter`, which returns None for such a version ("serve the base model alone").

The tracking URI is `get_settings().resolved_mlflow_tracking_uri`; on a local store (sqlite or a
file path) experiments are created with their artifact location under
`settings.mlflow_artifact_root`, so artifacts never land in the working directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.core.ids import canonical_json
from tasks.core.paths import REPO_ROOT
from tasks.core.settings import DEFAULT_LOCAL_MODEL, get_settings

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "tuneloop-training"
REGISTRY_EXPERIMENT = "tuneloop-registry"
ADAPTER_ARTIFACT_PATH = "adapter"
BASE_ARTIFACT_PATH = "base"
CONFIG_ARTIFACT_PATH = "config"
CHAT_TEMPLATE_ARTIFACT = "chat_template.jinja"
CHAMPION = "champion"
CHALLENGER = "challenger"
MARKER_FILE = ".tuneloop-version.json"

# Run/version tag keys (one namespace so the registry view can read them back).
TAG_DATASET_ID = "tuneloop.dataset_id"
TAG_DATASET_HASH = "tuneloop.dataset_hash"
TAG_DATASET_URI = "tuneloop.dataset_uri"
TAG_GATE_PASSED = "tuneloop.gate_passed"
TAG_GATE_RESULT = "tuneloop.gate_result"
TAG_BASE_MODEL = "tuneloop.base_model"
TAG_GIT_SHA = "tuneloop.git_sha"
TAG_RUN_ID = "tuneloop.run_id"
TAG_IS_BASE = "is_base"
TAG_KIND = "tuneloop.kind"

# MLflow limits (mlflow/utils/validation.py): param values 6000 chars, keys 250 chars, 100 params
# per batch, 1000 metrics per batch, dataset digest 36 chars.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_DIGEST = 32

# Files a trainer may leave next to an adapter that must never be uploaded as "the adapter":
# full-model weights, optimizer/scheduler state, RNG state, trainer pickles.
_EXCLUDED_FILE_PATTERNS = (
    re.compile(r"^model(-\d+-of-\d+)?\.safetensors$"),
    re.compile(r"^model\.safetensors\.index\.json$"),
    re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$"),
    re.compile(r"^pytorch_model\.bin\.index\.json$"),
    re.compile(r"^(optimizer|scheduler|scaler)\.pt$"),
    re.compile(r"^rng_state.*\.pth$"),
    re.compile(r"^training_args\.bin$"),
    re.compile(r".*\.gguf$"),
)
_EXCLUDED_DIR_PATTERN = re.compile(r"^(checkpoint-\d+|runs|global_step\d+)$")


class RegistryError(RuntimeError):
    """A tracking/registry operation cannot proceed; carries what the caller needs to fix it."""

    def __init__(self, message: str, *, model_name: str | None = None,
                 version: str | None = None, run_id: str | None = None) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.version = version
        self.run_id = run_id


# ---- client and experiment ---------------------------------------------------------------------

def tracking_uri() -> str:
    return get_settings().resolved_mlflow_tracking_uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def get_client():  # -> mlflow.MlflowClient
    """An MlflowClient on the configured store; also points the fluent API at it."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-") or "default"


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment id for `name`, created with an artifact location under the data dir."""
    client = get_client()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if _is_local_store(tracking_uri()):
        root = get_settings().mlflow_artifact_root / _slug(name)
        root.mkdir(parents=True, exist_ok=True)
        artifact_location = root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our lookup and create
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


# ---- small helpers -----------------------------------------------------------------------------

def git_sha() -> str:
    """`git rev-parse HEAD` of the repository, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", sha) else "unknown"


def local_base_name(base_model: str) -> str:
    """The pip-shipped short name for a base (maps Hugging Face ids the trainer config uses)."""
    try:
        from tasks.train.config import local_model_name
    except ImportError:  # trainer package absent: names are already local
        return base_model
    return local_model_name(base_model)


def resolve_base_path(base_model: str) -> Path:
    """A local folder with the base model's weights, for a short name, hub id or folder."""
    from tasks.core.weights import resolve_base_model

    return resolve_base_model(local_base_name(base_model))


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
    """Flatten nested config into MLflow params: dotted keys, lists as JSON, values truncated.

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
    out[key] = text[:MAX_PARAM_VALUE]
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


def is_excluded_artifact(relative: Path) -> bool:
    """True for files that are not part of an adapter (full weights, optimizer state, ...)."""
    if any(_EXCLUDED_DIR_PATTERN.match(part) for part in relative.parts[:-1]):
        return True
    return any(p.match(relative.name) for p in _EXCLUDED_FILE_PATTERNS)


def stage_adapter(adapter_dir: Path, out_dir: Path) -> list[str]:
    """Copy only the adapter's own files from `adapter_dir` into `out_dir`; return their names.

    Raises RegistryError when the folder holds no PEFT adapter (adapter_config.json and
    adapter weights), so a full model folder can never be registered by mistake.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RegistryError(
            f"{adapter_dir} has no adapter_config.json; pass the PEFT adapter folder written by "
            "model.save_pretrained() (TrainResult.adapter_dir), not a base-model folder"
        )
    weights = [p for p in ("adapter_model.safetensors", "adapter_model.bin")
               if (adapter_dir / p).is_file()]
    if not weights:
        raise RegistryError(
            f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors; the "
            "training run did not finish saving its adapter — rerun the train task"
        )
    copied: list[str] = []
    skipped: list[str] = []
    for path in sorted(adapter_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(adapter_dir)
        if is_excluded_artifact(relative):
            skipped.append(str(relative))
            continue
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(str(relative))
    if skipped:
        log.info("not uploading %d non-adapter files from %s (e.g. %s)", len(skipped),
                 adapter_dir, ", ".join(skipped[:3]))
    return copied


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
    tags = {
        TAG_KIND: "training",
        TAG_DATASET_ID: str(dataset["id"]),
        TAG_DATASET_HASH: str(dataset.get("content_hash") or ""),
        TAG_DATASET_URI: str(dataset.get("source_uri") or dataset_source_uri(str(dataset["id"]))),
        TAG_GATE_PASSED: "unknown" if gate_passed is None else str(gate_passed).lower(),
        TAG_GATE_RESULT: canonical_json(gate_result if gate_result is not None else {})[:5000],
        TAG_BASE_MODEL: base_model,
        TAG_GIT_SHA: sha,
        "mlflow.source.git.commit": sha,
    }
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
        client.log_artifact(run_id, str(config_yaml), CONFIG_ARTIFACT_PATH)
    template = _field(result, "chat_template")
    if template:
        client.log_text(run_id, str(template), CHAT_TEMPLATE_ARTIFACT)


# ---- registry ----------------------------------------------------------------------------------

def _model_name(model_name: str | None) -> str:
    return model_name or get_settings().registered_model_name


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="tuneloop LoRA adapters; aliases champion/challenger"
            )
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def _versions_for_run(client, name: str, run_id: str) -> list[Any]:
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda mv: int(mv.version))


def register_version(
    run_id: str,
    *,
    model_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str = CHALLENGER,
) -> dict[str, Any]:
    """Register the run's adapter as a model version, tag it, point `alias` at it.

    Idempotent: a run already registered returns its existing version (the alias is re-set).
    Returns {"version", "model_name", "alias", "run_id", "created"}.
    """
    from mlflow.exceptions import MlflowException

    client = get_client()
    name = _model_name(model_name)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(
            f"MLflow run {run_id!r} does not exist on {tracking_uri()}; register the run id "
            "returned by log_training_run", run_id=run_id, model_name=name,
        ) from exc
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    if ADAPTER_ARTIFACT_PATH not in artifacts:
        raise RegistryError(
            f"run {run_id} has no '{ADAPTER_ARTIFACT_PATH}/' artifact; log it with "
            "log_training_run before registering", run_id=run_id, model_name=name,
        )
    _ensure_registered_model(client, name)
    existing = _versions_for_run(client, name, run_id)
    created = False
    if existing:
        version = existing[0]
    else:
        run_tags = run.data.tags
        version_tags = {
            "dataset_id": run_tags.get(TAG_DATASET_ID, "unknown"),
            "dataset_hash": run_tags.get(TAG_DATASET_HASH, ""),
            "gate_passed": run_tags.get(TAG_GATE_PASSED, "unknown"),
            "gate_result": run_tags.get(TAG_GATE_RESULT, "{}"),
            "base_model": run_tags.get(TAG_BASE_MODEL, "unknown"),
            "git_sha": run_tags.get(TAG_GIT_SHA) or git_sha(),
            TAG_IS_BASE: "false",
            TAG_RUN_ID: run_id,
        }
        version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        source = f"{run.info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT_PATH}"
        version = client.create_model_version(
            name, source=source, run_id=run_id, tags=version_tags,
            description=f"LoRA adapter on {version_tags['base_model']} "
                        f"(dataset {version_tags['dataset_id']})",
        )
        created = True
    if tags and not created:
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, str(key), str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("%s version %s of %s (run %s) alias=%s",
             "registered" if created else "found", version.version, name, run_id, alias)
    return {"version": str(version.version), "model_name": name, "alias": alias,
            "run_id": run_id, "created": created}


def ensure_champion(model_name: str | None = None, *, base_model: str | None = None
                    ) -> dict[str, Any]:
    """Make sure `champion` points somewhere; on a new registry, at a base-model version.

    The base version's artifact is `base/base_model.json` (no adapter) and it is tagged
    is_base=true; materialize_adapter returns None for it. Idempotent.
    Returns {"version", "model_name", "alias": "champion", "is_base", "created"}.
    """
    import tempfile

    client = get_client()
    name = _model_name(model_name)
    _ensure_registered_model(client, name)
    current = get_alias_version(name, CHAMPION)
    if current is not None:
        mv = client.get_model_version(name, current)
        return {"version": current, "model_name": name, "alias": CHAMPION,
                "is_base": mv.tags.get(TAG_IS_BASE) == "true", "created": False}
    base_name = base_model or DEFAULT_LOCAL_MODEL
    base_versions = [
        mv for mv in client.search_model_versions(f"name = '{name}'")
        if mv.tags.get(TAG_IS_BASE) == "true" and mv.tags.get("base_model") == base_name
    ]
    created = False
    if base_versions:
        version = min(base_versions, key=lambda mv: int(mv.version))
    else:
        experiment_id = ensure_experiment(REGISTRY_EXPERIMENT)
        run = client.create_run(
            experiment_id, run_name=f"base-{base_name}",
            tags={TAG_KIND: "base", TAG_BASE_MODEL: base_name, TAG_GIT_SHA: git_sha()},
        )
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / "base_model.json"
            marker.write_text(json.dumps({"base_model": base_name, "adapter": None}))
            client.log_artifact(run.info.run_id, str(marker), BASE_ARTIFACT_PATH)
        client.set_terminated(run.info.run_id, status="FINISHED")
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri.rstrip('/')}/{BASE_ARTIFACT_PATH}",
            run_id=run.info.run_id,
            tags={TAG_IS_BASE: "true", "base_model": base_name, "dataset_id": "none",
                  "git_sha": git_sha(), TAG_RUN_ID: run.info.run_id},
            description=f"base model {base_name} without an adapter",
        )
        created = True
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return {"version": str(version.version), "model_name": name, "alias": CHAMPION,
            "is_base": True, "created": created}


def set_alias(model_name: str | None, alias: str, version: str | int) -> None:
    """Point `alias` (champion / challenger / any) at `version`."""
    client = get_client()
    name = _model_name(model_name)
    client.set_registered_model_alias(name, alias, str(version))


def get_alias_version(model_name: str | None, alias: str) -> str | None:
    """The version an alias points at, or None (also when the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    client = get_client()
    try:
        return str(client.get_model_version_by_alias(_model_name(model_name), alias).version)
    except MlflowException:
        return None


def get_version_info(version: str | int, *, model_name: str | None = None) -> dict[str, Any]:
    """Tags, run id, aliases and source of one version as a plain dict."""
    from mlflow.exceptions import MlflowException

    client = get_client()
    name = _model_name(model_name)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"{name} has no version {version}; list versions with `python -m "
            "tasks.register.view`", model_name=name, version=str(version),
        ) from exc
    return {
        "model_name": name, "version": str(mv.version), "run_id": mv.run_id,
        "source": mv.source, "tags": dict(mv.tags), "aliases": list(mv.aliases or []),
        "is_base": mv.tags.get(TAG_IS_BASE) == "true",
        "created": int(mv.creation_timestamp or 0),
    }


def adapter_cache_dir(version: str | int, model_name: str | None = None) -> Path:
    return get_settings().data_dir / "adapters" / f"{_slug(_model_name(model_name))}-v{version}"


def materialize_adapter(version: str | int, *, model_name: str | None = None) -> Path | None:
    """Download a version's adapter to `<data_dir>/adapters/<model>-v<version>/`; return it.

    Idempotent (a complete earlier download for the same run is reused) and atomic (download
    into a temp folder, then rename). Returns None for the base-model version (no adapter).
    """
    info = get_version_info(version, model_name=model_name)
    if info["is_base"]:
        return None
    target = adapter_cache_dir(info["version"], info["model_name"])
    marker = target / MARKER_FILE
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("run_id") == info["run_id"]:
                return target
        except (OSError, ValueError):
            pass
    client = get_client()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        downloaded = Path(client.download_artifacts(info["run_id"], ADAPTER_ARTIFACT_PATH,
                                                    str(tmp)))
        if not (downloaded / "adapter_config.json").is_file():
            raise RegistryError(
                f"version {info['version']} of {info['model_name']} has no adapter_config.json "
                f"in its '{ADAPTER_ARTIFACT_PATH}/' artifact; re-register it from a complete "
                "training run", model_name=info["model_name"], version=info["version"],
                run_id=info["run_id"],
            )
        (downloaded / MARKER_FILE).write_text(json.dumps(
            {"model_name": info["model_name"], "version": info["version"],
             "run_id": info["run_id"]}))
        if target.exists():
            shutil.rmtree(target)
        try:
            downloaded.rename(target)
        except OSError:  # a concurrent materialiser won; its copy is equivalent
            if not (target / MARKER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    client = get_client()
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)
