"""The MLflow client, the shared tag vocabulary and the error every registry call raises.

The tracking URI is `get_settings().resolved_mlflow_tracking_uri`; on a local store (sqlite or a
file path) experiments are created with their artifact location under
`settings.mlflow_artifact_root`, so artifacts never land in the working directory. The run and
version tag keys live here, in one namespace, so the run logger (`runs`), the registry
(`registry`) and the registry view (`view`) read and write the same names.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tasks.core.paths import REPO_ROOT
from tasks.core.settings import get_settings

DEFAULT_EXPERIMENT = "tuneloop-training"
ADAPTER_ARTIFACT_PATH = "adapter"

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


class RegistryError(RuntimeError):
    """A tracking/registry operation cannot proceed; carries what the caller needs to fix it."""

    def __init__(self, message: str, *, model_name: str | None = None,
                 version: str | None = None, run_id: str | None = None) -> None:
        super().__init__(message)
        self.model_name = model_name
        self.version = version
        self.run_id = run_id


# ---- client, experiment, names -----------------------------------------------------------------

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


def slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-") or "default"


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment id for `name`, created with an artifact location under the data dir."""
    client = get_client()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if _is_local_store(tracking_uri()):
        root = get_settings().mlflow_artifact_root / slug(name)
        root.mkdir(parents=True, exist_ok=True)
        artifact_location = root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our lookup and create
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def registered_model_name(model_name: str | None) -> str:
    return model_name or get_settings().registered_model_name


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
