"""The MLflow client, the shared tag vocabulary and the error every registry call raises.

The tracking URI is `get_settings().resolved_mlflow_tracking_uri`; on a local store (sqlite or a
file path) experiments are created with their artifact location under
`settings.mlflow_artifact_root`, so artifacts never land in the working directory. The run and
version tag keys live here, in one namespace, so the run logger (`runs`), the registry
(`registry`) and the registry view (`view`) read and write the same names.

What reaches MLflow leaves the system (a shared tracking server, its UI, its artifact store), so
the de-identification of params, tags, text and file artifacts lives here, once: `deid_text`,
`deid_tags` and `deid_artifact`, all through `tasks.datasets.deid`.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.mlflow_client import make_client
from tasks.core.paths import REPO_ROOT
from tasks.core.settings import get_settings
from tasks.datasets import deid

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

# MLflow keeps tag values up to 8000 characters; ours stay well below (a gate result is cut).
MAX_TAG_VALUE = 5000
# Artifact files read as text and de-identified before logging; anything else (adapter weights,
# PNG charts) is logged as it is.
TEXT_ARTIFACT_SUFFIXES = frozenset({".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ".html",
                                    ".csv", ".jinja", ".jinja2"})
# Embedded images (the model card's PNG data URIs) are not text and are left out of the scrub:
# a run of base64 can look like a phone number ("/+9787") and would be cut out of the image.
_DATA_URI = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/=]+")


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
    """An MlflowClient on the configured store (HTTP timeouts and retries from the settings,
    `tasks.core.mlflow_client`); also points the fluent API at it."""
    import mlflow

    uri = tracking_uri()
    client = make_client(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return client


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


# ---- de-identification of what is logged ------------------------------------------------------

def deid_text(text: str, limit: int | None = None) -> str:
    """`text` fit for MLflow: PII scrubbed (`deid.scrub_text`), then cut to `limit` characters.

    Scrubbing comes first so that a cut can never leave half an email the scrubber would no
    longer recognise. No person names are passed: params and tags are config values, where a
    `name` field names a run or a dataset, not a person.
    """
    scrubbed = deid.scrub_text(text)
    return scrubbed if limit is None else scrubbed[:limit]


def deid_tags(values: Mapping[str, Any], limit: int = MAX_TAG_VALUE) -> dict[str, str]:
    """Tag (or param) values as MLflow stores them, strings, each through `deid_text`."""
    return {str(key): deid_text(str(value), limit) for key, value in values.items()}


def _deid_json(text: str, *, lines: bool) -> str | None:
    """De-identified JSON (or JSON Lines) text, or None when nothing changes. Scrubbed as
    values (`deid.scrub_value`: strings, name and user-id fields) and dumped again, never as
    raw text, where a placeholder could swallow the backslash of an escape."""
    values = ([json.loads(line) for line in text.splitlines() if line.strip()] if lines
              else [json.loads(text)])
    scrubbed = [deid.scrub_value(value) for value in values]
    if scrubbed == values:
        return None
    if not lines:
        return json.dumps(scrubbed[0], indent=2, ensure_ascii=False, default=str)
    return "".join(json.dumps(value, ensure_ascii=False, default=str) + "\n"
                   for value in scrubbed)


def _deid_file_text(path: Path) -> str | None:
    """The de-identified text of a text artifact, or None when there is nothing to change."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_ARTIFACT_SUFFIXES:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    if suffix in (".json", ".jsonl"):
        try:
            return _deid_json(text, lines=suffix == ".jsonl")
        except json.JSONDecodeError:
            pass  # not JSON after all: scrubbed as text below
    return _deid_plain_text(text)


def _deid_plain_text(text: str) -> str | None:
    """De-identified text outside its data URIs, or None when nothing changes."""
    pieces = _DATA_URI.split(text)
    if not any(deid.has_pii(piece) for piece in pieces):
        return None
    images = _DATA_URI.findall(text)
    out = [deid.scrub_text(pieces[0])]
    for image, piece in zip(images, pieces[1:], strict=True):
        out += [image, deid.scrub_text(piece)]
    return "".join(out)


@contextmanager
def deid_artifact(path: Path | str) -> Iterator[Path]:
    """The file to hand MLflow for `path`: `path` itself when it is not text or holds no PII,
    else a de-identified copy with the same name (MLflow names the artifact after the file)
    in a temporary folder that lives as long as the `with` block.

    A folder is yielded as it is: the only folder logged is the adapter (weights and its
    config), which carries no user text.
    """
    path = Path(path)
    scrubbed = _deid_file_text(path) if path.is_file() else None
    if scrubbed is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tuneloop-deid-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(scrubbed, encoding="utf-8")
        yield copy
