"""Registry versions the router will serve, for tests that build a registry by hand.

The router serves only versions carrying tuneloop's registration tags and a valid
`tuneloop.signature` (`tasks.core.signing`). Tests that create versions straight through
`MlflowClient` (instead of `tasks.register.registry.register_version`) make them servable with
`signed_version(...)` (a new version, tagged and signed) or `sign_for_tests(...)` (sign an
existing version over its current tags, e.g. after a test tagged it by hand).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tasks.core.settings import get_settings
from tasks.core.signing import (
    SIGNATURE_TAG,
    TAG_DATASET_HASH,
    TAG_DATASET_ID,
    TAG_GATE_PASSED,
    TAG_IS_BASE,
    TAG_RUN_ID,
    sign_tags,
)

TEST_EXPERIMENT = "tuneloop-test-registrations"


def _key(key: str | None) -> str:
    return key if key is not None else get_settings().registry_signing_key.get_secret_value()


def make_run_id(client: Any, artifact_dir: Path | None = None) -> str:
    """A fresh MLflow run to hang a version on (a signed adapter version names its run); its
    experiment's artifact location is `artifact_dir` (default: a temp folder; never the working
    directory), though nothing is logged there."""
    experiment = client.get_experiment_by_name(TEST_EXPERIMENT)
    if experiment is None:
        folder = artifact_dir or Path(tempfile.mkdtemp(prefix="tuneloop-test-mlruns-"))
        location = Path(folder).resolve().as_uri()
        try:
            experiment_id = client.create_experiment(TEST_EXPERIMENT,
                                                     artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently
            experiment_id = client.get_experiment_by_name(TEST_EXPERIMENT).experiment_id
    else:
        experiment_id = experiment.experiment_id
    return client.create_run(experiment_id, run_name="test-registration").info.run_id


def sign_for_tests(client: Any, name: str, version: str | int, *,
                   key: str | None = None) -> str:
    """Sign an existing version over its current source, run id and tags, as
    `tasks.register.registry` signs what it registers; returns the signature."""
    model_version = client.get_model_version(name, str(version))
    signature = sign_tags(_key(key), dict(model_version.tags or {}), name=name,
                          source=model_version.source, run_id=model_version.run_id)
    client.set_model_version_tag(name, str(model_version.version), SIGNATURE_TAG, signature)
    return signature


def signed_version(client: Any, name: str, source: str | Path, *, run_id: str | None = None,
                   dataset_id: str = "ds-test", dataset_hash: str = "d" * 64,
                   gate_passed: str = "true", is_base: bool = False, sign: bool = True,
                   key: str | None = None, tags: dict[str, str] | None = None) -> Any:
    """Create a version of `name` (the registered model must exist) with tuneloop's
    registration tags, signed unless `sign=False`; returns the ModelVersion as created."""
    run_id = run_id or make_run_id(client)
    version_tags = {TAG_DATASET_ID: dataset_id, TAG_DATASET_HASH: dataset_hash,
                    TAG_GATE_PASSED: gate_passed, TAG_IS_BASE: "true" if is_base else "false",
                    TAG_RUN_ID: run_id, **(tags or {})}
    model_version = client.create_model_version(name, source=str(source), run_id=run_id,
                                                tags=version_tags)
    if sign:
        sign_for_tests(client, name, model_version.version, key=key)
    return model_version
