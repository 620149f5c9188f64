"""The model registry: versions of one registered model, aliases champion/challenger, downloads.

Each training run becomes a version of one registered model (aliases, not stages): a new version
gets `challenger`; the shadow comparison decides whether `champion` moves. The base model as
champion: MLflow version numbers are integers, so a brand-new registry gets a real version whose
artifact is a small `base/base_model.json` marker (no adapter) tagged `is_base=true`;
`ensure_champion` registers it once and points `champion` at it, and consumers call
`materialize_adapter`, which returns None for such a version ("serve the base model alone").
Every version created here is signed (`tuneloop.signature`, an HMAC with
`settings.registry_signing_key` over its source, run id and registration tags, an adapter's
among them the sha256 of its `adapter/` files, `tuneloop.adapter_sha256`: see
`tasks.core.signing`); the router serves no other, and `materialize_adapter` installs an adapter
only when its signature verifies and the downloaded files have the signed digest.
Logging the run is `runs`, adapter staging and base-model paths are `adapters`, the client and
tag keys are `tracking`; the names other stages import are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.core.settings import DEFAULT_LOCAL_MODEL, get_settings
from tasks.core.signing import (
    SIGNATURE_TAG,
    TAG_ADAPTER_SHA256,
    adapter_digest,
    sign_tags,
    verify_version,
)
from tasks.register.runs import load_dataset_ref as load_dataset_ref
from tasks.register.runs import log_run_artifact as log_run_artifact
from tasks.register.runs import log_run_metrics as log_run_metrics
from tasks.register.runs import log_training_run as log_training_run
from tasks.register.tracking import (
    ADAPTER_ARTIFACT_PATH,
    TAG_BASE_MODEL,
    TAG_DATASET_HASH,
    TAG_DATASET_ID,
    TAG_GATE_PASSED,
    TAG_GATE_RESULT,
    TAG_GIT_SHA,
    TAG_IS_BASE,
    TAG_KIND,
    TAG_RUN_ID,
    RegistryError,
    deid_tags,
    ensure_experiment,
    get_client,
    git_sha,
    registered_model_name,
    slug,
    tracking_uri,
)

log = logging.getLogger(__name__)

REGISTRY_EXPERIMENT = "tuneloop-registry"
BASE_ARTIFACT_PATH = "base"
CHAMPION = "champion"
CHALLENGER = "challenger"
MARKER_FILE = ".tuneloop-version.json"


# ---- registry ----------------------------------------------------------------------------------

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


def _signing_key() -> str:
    return get_settings().registry_signing_key.get_secret_value()


def _sign(client, name: str, version: Any, tags: Mapping[str, str]) -> str:
    """Tag `version` with the signature of its real source, run id and `tags` (its tags as
    registered); the router serves only versions whose signature verifies (`tasks.core.signing`).
    """
    signature = sign_tags(_signing_key(), tags, name=name, source=version.source,
                          run_id=version.run_id)
    if tags.get(SIGNATURE_TAG) != signature:
        client.set_model_version_tag(name, version.version, SIGNATURE_TAG, signature)
    return signature


def _artifact_digest(client, run_id: str) -> str:
    """`adapter_digest` of the run's `adapter/` artifact as MLflow holds it now: the files the
    signature vouches for (downloaded to a temporary folder)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tuneloop-register-") as tmp:
        return adapter_digest(client.download_artifacts(run_id, ADAPTER_ARTIFACT_PATH, tmp))


def register_version(
    run_id: str,
    *,
    model_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str = CHALLENGER,
) -> dict[str, Any]:
    """Register the run's adapter as a model version, tag and sign it (with the digest of its
    adapter files), point `alias` at it.

    Idempotent: a run already registered returns its existing version (its registration tags
    re-asserted from the run, re-signed, the alias re-set). The caller's `tags` are
    de-identified like the run's (`tracking.deid_tags`).
    Returns {"version", "model_name", "alias", "run_id", "created"}.
    """
    from mlflow.exceptions import MlflowException

    client = get_client()
    name = registered_model_name(model_name)
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
    source = f"{run.info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT_PATH}"
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
    version_tags.update(deid_tags(tags or {}))
    version_tags.pop(SIGNATURE_TAG, None)  # only _sign writes it
    # Set after the caller's tags: the digest is of the files, never a value somebody passes.
    version_tags[TAG_ADAPTER_SHA256] = _artifact_digest(client, run_id)
    # A version someone else made for this run, with another source, is not ours to sign.
    existing = [mv for mv in _versions_for_run(client, name, run_id) if mv.source == source]
    created = False
    if existing:
        # Re-registering re-asserts the registration tags from the run (an edit made since is
        # undone) and signs again: also how a version registered before signing becomes
        # servable (`register_version(run_id, alias="")`).
        version = existing[0]
        current = dict(version.tags or {})
        for key, value in version_tags.items():
            if current.get(key) != value:
                client.set_model_version_tag(name, version.version, key, value)
        signed_tags = {**current, **version_tags}
    else:
        version = client.create_model_version(
            name, source=source, run_id=run_id, tags=version_tags,
            description=f"LoRA adapter on {version_tags['base_model']} "
                        f"(dataset {version_tags['dataset_id']})",
        )
        created = True
        signed_tags = version_tags
    _sign(client, name, version, signed_tags)
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
    name = registered_model_name(model_name)
    _ensure_registered_model(client, name)
    current = get_alias_version(name, CHAMPION)
    if current is not None:
        mv = client.get_model_version(name, current)
        return {"version": current, "model_name": name, "alias": CHAMPION,
                "is_base": mv.tags.get(TAG_IS_BASE) == "true", "created": False}
    base_name = base_model or DEFAULT_LOCAL_MODEL
    # Only a signed base version is reused: one anybody registered with is_base=true is not.
    base_versions = [
        mv for mv in client.search_model_versions(f"name = '{name}'")
        if mv.tags.get(TAG_IS_BASE) == "true" and mv.tags.get("base_model") == base_name
        and verify_version(_signing_key(), mv.tags, name=name, source=mv.source,
                           run_id=mv.run_id) is None
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
        base_tags = {TAG_IS_BASE: "true", "base_model": base_name, "dataset_id": "none",
                     "git_sha": git_sha(), TAG_RUN_ID: run.info.run_id}
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri.rstrip('/')}/{BASE_ARTIFACT_PATH}",
            run_id=run.info.run_id, tags=base_tags,
            description=f"base model {base_name} without an adapter",
        )
        _sign(client, name, version, base_tags)
        created = True
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return {"version": str(version.version), "model_name": name, "alias": CHAMPION,
            "is_base": True, "created": created}


def set_alias(model_name: str | None, alias: str, version: str | int) -> None:
    """Point `alias` (champion / challenger / any) at `version`."""
    client = get_client()
    name = registered_model_name(model_name)
    client.set_registered_model_alias(name, alias, str(version))


def get_alias_version(model_name: str | None, alias: str) -> str | None:
    """The version an alias points at, or None (also when the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    client = get_client()
    try:
        return str(client.get_model_version_by_alias(registered_model_name(model_name), alias).version)
    except MlflowException:
        return None


def get_version_info(version: str | int, *, model_name: str | None = None) -> dict[str, Any]:
    """Tags, run id, aliases and source of one version as a plain dict."""
    from mlflow.exceptions import MlflowException

    client = get_client()
    name = registered_model_name(model_name)
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"{name} has no version {version}; list versions with `tuneloop adapters`",
            model_name=name, version=str(version),
        ) from exc
    return {
        "model_name": name, "version": str(mv.version), "run_id": mv.run_id,
        "source": mv.source, "tags": dict(mv.tags), "aliases": list(mv.aliases or []),
        "is_base": mv.tags.get(TAG_IS_BASE) == "true",
        "created": int(mv.creation_timestamp or 0),
    }


def adapter_cache_dir(version: str | int, model_name: str | None = None) -> Path:
    return get_settings().data_dir / "adapters" / f"{slug(registered_model_name(model_name))}-v{version}"


def _reregister(info: Mapping[str, Any]) -> str:
    """How to make a version materializable again: re-register (and so re-sign) it."""
    if info["is_base"]:
        return ("point the alias at a base version tuneloop signed (ensure_champion registers "
                "one when champion is unset)")
    return f"re-register its run: tuneloop register {info['run_id']} --alias \"\""


def _cached(target: Path, info: Mapping[str, Any], expected_digest: str) -> bool:
    """Whether `target` holds a complete earlier download of this version's signed files."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("run_id") == info["run_id"] \
        and marker.get("adapter_sha256") == expected_digest


def materialize_adapter(version: str | int, *, model_name: str | None = None) -> Path | None:
    """Download a version's adapter to `<data_dir>/adapters/<model>-v<version>/`; return it.

    Only a version tuneloop signed (`verify_version`; the gate is the router's to check, not
    this) whose downloaded files have the digest signed at registration is installed; anything
    else raises RegistryError and leaves nothing in the adapters folder. Idempotent (a complete
    earlier download of the same files is reused) and atomic (download into a temp folder,
    check, then rename). Returns None for the base-model version (no adapter).
    """
    info = get_version_info(version, model_name=model_name)
    where = {"model_name": info["model_name"], "version": info["version"],
             "run_id": info["run_id"]}
    label = f"version {info['version']} of {info['model_name']}"
    problem = verify_version(_signing_key(), info["tags"], name=info["model_name"],
                             source=info["source"], run_id=info["run_id"], require_gate=False)
    if problem:
        raise RegistryError(f"{label} is not a registration tuneloop signed: {problem}; if it "
                            f"is yours, {_reregister(info)}", **where)
    if info["is_base"]:
        return None
    expected = info["tags"].get(TAG_ADAPTER_SHA256, "")
    if not expected:
        raise RegistryError(
            f"{label} has no {TAG_ADAPTER_SHA256} tag: it was registered before adapter files "
            f"were signed, so they cannot be checked; {_reregister(info)} (it signs the files "
            "MLflow holds now) and materialize again", **where)
    target = adapter_cache_dir(info["version"], info["model_name"])
    if _cached(target, info, expected):
        return target
    client = get_client()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        downloaded = Path(client.download_artifacts(info["run_id"], ADAPTER_ARTIFACT_PATH,
                                                    str(tmp)))
        actual = adapter_digest(downloaded)
        if actual != expected:
            raise RegistryError(
                f"{label}: its '{ADAPTER_ARTIFACT_PATH}/' files in MLflow are not the ones "
                f"signed at registration (sha256 {actual[:12]}..., signed {expected[:12]}...): "
                "they were changed since, and nothing was installed. Check who can write to "
                "MLflow's artifact store; restore the adapter from its training run, or if the "
                f"change is intended, {_reregister(info)}", **where)
        if not (downloaded / "adapter_config.json").is_file():
            raise RegistryError(
                f"{label} has no adapter_config.json in its '{ADAPTER_ARTIFACT_PATH}/' "
                "artifact; re-register it from a complete training run", **where)
        (downloaded / MARKER_FILE).write_text(json.dumps(
            {"model_name": info["model_name"], "version": info["version"],
             "run_id": info["run_id"], "adapter_sha256": expected}))
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
