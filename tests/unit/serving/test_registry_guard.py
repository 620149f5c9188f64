"""Registry tampering contained: the router serves only signed registrations, keeps the last good
version (and says why) when an alias or a deployment names anything else, and starts on its
persisted state when MLflow is unreachable — against a real MLflow (sqlite) registry and a fake
OpenAI-compatible backend that records which model each request asked for."""

from __future__ import annotations

import logging
import socket
import sqlite3
import time
import uuid

import httpx
import pytest

from serving.router import create_router_app
from serving.router_config import BackendConfig, RouterConfig, default_state_path, key_digest
from serving.router_server import RouterServer
from serving.routing import StateResolver
from tasks.shadow.stage import deploy_challenger
from tests.fakes.fake_openai import FakeOpenAIServer
from tests.unit.serving.registry_helpers import make_run_id, sign_for_tests, signed_version

BASE = "base-model"
ADMIN_KEY = "guard-admin-key"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """A real MLflow store (sqlite), created once per module (its migrations take seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    return uri


@pytest.fixture(scope="module")
def guard_engine(make_engine):
    return make_engine("tuneloop_guard")


@pytest.fixture()
def model_name() -> str:
    return f"guard-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def client(tracking_uri, model_name):
    """The registry, with `model_name` registered (no versions yet)."""
    from mlflow import MlflowClient

    registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    registry.create_registered_model(model_name)
    return registry


@pytest.fixture()
def adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.fixture()
def backend(model_name):
    """One fake backend knowing the base model and versions 1..9 (vllm names)."""
    names = (BASE, *(f"{model_name}-v{n}" for n in range(1, 10)))
    with FakeOpenAIServer(model_ids=names) as server:
        yield server


def router_config(backend_url: str, model_name: str, tracking_uri: str,
                  **overrides) -> RouterConfig:
    """As RouterConfig.from_settings fills it: the signing key the test versions are signed
    with and the state file under the (temporary) data dir."""
    from tasks.core.settings import get_settings

    settings = get_settings()
    values = dict(
        registry_signing_key=settings.registry_signing_key,
        state_path=default_state_path(settings.data_dir, model_name),
        backends={"champion": BackendConfig(base_url=backend_url, base_model=BASE,
                                            model_template="vllm")},
        registered_model_name=model_name, public_model="tuneloop", api_keys=["k"],
        user_hash_salt="s", admin_key_sha256=key_digest(ADMIN_KEY), tracking_uri=tracking_uri,
        alias_ttl_s=3600, deployment_ttl_s=3600,
        rate_limit_per_s=0, key_rate_limit_per_s=0, log_flush_interval_s=0.05)
    values.update(overrides)
    return RouterConfig(**values)


@pytest.fixture()
def resolver(model_name, tracking_uri, guard_engine, data_dir):
    def make(uri: str = tracking_uri, **overrides) -> StateResolver:
        config = router_config("http://127.0.0.1:9/v1", model_name, uri, **overrides)
        return StateResolver(config, guard_engine)

    return make


def champion_is(client, model_name: str, version) -> None:
    client.set_registered_model_alias(model_name, "champion", str(version))


def asked_models(backend: FakeOpenAIServer) -> list[str]:
    return [request["model"] for request in backend.requests]


def chat(http: httpx.Client) -> httpx.Response:
    response = http.post("/chat/completions", json={
        "model": "tuneloop", "user": "u", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    return response


def routing_state(http: httpx.Client) -> dict:
    """GET /v1/router/state (the admin key only) → its "routing" part."""
    response = http.get("/router/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()["routing"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- what a resolver accepts -------------------------------------------------------------------


def test_a_signed_registration_is_served(client, model_name, adapter, resolver):
    signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    state = resolver()
    state.refresh_aliases()
    assert dict(state.state.versions) == {"champion": "1", "challenger": None}
    assert state.state.backend_models["champion"] == f"{model_name}-v1"
    assert state.state.rejected == {}


def test_unsigned_champion_keeps_the_previous_champion_and_logs_why(
        client, model_name, adapter, resolver, caplog):
    signed_version(client, model_name, adapter)
    signed_version(client, model_name, adapter, sign=False)
    champion_is(client, model_name, 1)
    guard = resolver()
    guard.refresh_aliases()
    champion_is(client, model_name, 2)
    with caplog.at_level(logging.WARNING, logger="serving.router"):
        guard.refresh_aliases()
    assert guard.state.versions["champion"] == "1"
    assert guard.state.backend_models["champion"] == f"{model_name}-v1"
    assert guard.state.rejected["champion"].startswith("version 2: no tuneloop.signature tag")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("version 2" in w and "tuneloop.signature" in w for w in warnings), warnings


def test_the_same_rejection_is_logged_once(client, model_name, adapter, resolver, caplog):
    signed_version(client, model_name, adapter, sign=False)
    champion_is(client, model_name, 1)
    guard = resolver()
    with caplog.at_level(logging.WARNING, logger="serving.router"):
        for _ in range(3):
            guard.refresh_aliases()
    assert sum("version 1" in r.getMessage() for r in caplog.records) == 1


def test_a_tag_edited_after_registration_is_rejected(client, model_name, adapter, resolver):
    signed_version(client, model_name, adapter)
    signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    guard = resolver()
    guard.refresh_aliases()
    client.set_model_version_tag(model_name, "2", "dataset_hash", "0" * 64)  # forged lineage
    champion_is(client, model_name, 2)
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == "1"
    assert guard.state.rejected["champion"].startswith("version 2: bad signature")


def test_a_signature_made_with_another_key_is_rejected(client, model_name, adapter, resolver):
    signed_version(client, model_name, adapter, key="somebody-elses-key")
    champion_is(client, model_name, 1)
    guard = resolver()
    guard.refresh_aliases()
    assert guard.state.versions["champion"] is None  # no good version yet: the base model
    assert guard.state.backend_models["champion"] == BASE
    assert guard.state.rejected["champion"].startswith("version 1: bad signature")


def test_versions_are_verified_with_the_config_signing_key_not_the_global_one(
        client, model_name, adapter, resolver):
    signed_version(client, model_name, adapter, key="the-router-config-key")
    champion_is(client, model_name, 1)
    guard = resolver(registry_signing_key="the-router-config-key")
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == "1" and guard.state.rejected == {}


def test_without_a_state_path_the_state_is_kept_in_memory_only(
        client, model_name, adapter, resolver, data_dir):
    signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    guard = resolver(state_path=None)
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == "1"
    assert not list(data_dir.glob("router-state-*.json"))


def test_from_settings_fills_the_signing_key_and_the_state_file(model_name, data_dir):
    from tasks.core.settings import load_settings

    settings = load_settings(registry_signing_key="a-signing-key-0123456789",
                             registered_model_name=model_name)
    config = RouterConfig.from_settings(settings)
    assert config.registry_signing_key.get_secret_value() == "a-signing-key-0123456789"
    assert config.state_path == default_state_path(settings.data_dir, model_name)
    assert RouterConfig.from_settings(settings, state_path=None).state_path is None


def test_a_version_whose_gate_did_not_pass_is_not_served(client, model_name, adapter,
                                                          resolver):
    signed_version(client, model_name, adapter, gate_passed="false")
    champion_is(client, model_name, 1)
    guard = resolver()
    guard.refresh_aliases()
    assert guard.state.versions["champion"] is None
    assert guard.state.rejected["champion"] == "version 1: gate not passed (gate_passed='false')"


def test_alias_to_a_nonexistent_version_keeps_the_last_good(client, model_name, adapter,
                                                            resolver, tracking_uri):
    signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    guard = resolver()
    guard.refresh_aliases()
    # MLflow refuses such an alias through its API; whoever can write its database does not.
    with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE registered_model_aliases SET version = 99 WHERE name = ? "
                   "AND alias = 'champion'", (model_name,))
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == "1"
    assert guard.state.rejected["champion"] == "version 99: does not exist in the registry"


def test_a_deployment_pinning_an_unsigned_version_keeps_serving_the_champion(
        client, model_name, adapter, resolver, guard_engine):
    signed_version(client, model_name, adapter)
    signed_version(client, model_name, adapter, sign=False)
    champion_is(client, model_name, 1)
    deploy_challenger("2", champion_version="1", mode="canary", share=1.0,
                      model_name=model_name, engine=guard_engine)
    guard = resolver()
    assert guard.refresh_deployment() is True
    state = guard.state
    assert dict(state.versions) == {"champion": "1", "challenger": None}
    assert state.mode == "off"  # no servable challenger: champion only, nothing fails
    assert state.rejected["challenger"].startswith("version 2: no tuneloop.signature tag")


def test_a_deployment_pinning_an_unknown_version_keeps_the_last_good_challenger(
        client, model_name, adapter, resolver, guard_engine):
    for _ in range(2):
        signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=guard_engine)
    guard = resolver()
    guard.refresh_deployment()
    assert guard.state.versions["challenger"] == "2" and guard.state.mode == "canary"
    deploy_challenger("42", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=guard_engine)
    assert guard.refresh_deployment() is True
    assert dict(guard.state.versions) == {"champion": "1", "challenger": "2"}
    assert guard.state.rejected["challenger"] == "version 42: does not exist in the registry"


def test_signing_a_rejected_version_makes_it_served_at_the_next_refresh(
        client, model_name, adapter, resolver):
    signed_version(client, model_name, adapter, sign=False)
    champion_is(client, model_name, 1)
    guard = resolver()
    guard.refresh_aliases()
    assert guard.state.versions["champion"] is None
    sign_for_tests(client, model_name, 1)
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == "1" and guard.state.rejected == {}


def test_a_version_registered_through_the_registry_stage_is_served(
        client, model_name, adapter, resolver, tracking_uri, monkeypatch):
    from tasks.core.settings import get_settings
    from tasks.register.registry import ensure_champion, register_version, set_alias

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    get_settings.cache_clear()
    run_id = make_run_id(client)
    client.set_tag(run_id, "tuneloop.dataset_id", "ds-registered")
    client.set_tag(run_id, "tuneloop.dataset_hash", "a" * 64)
    client.set_tag(run_id, "tuneloop.gate_passed", "true")
    client.log_artifact(run_id, str(adapter), "adapter")
    base = ensure_champion(model_name, base_model=BASE)
    guard = resolver()
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == base["version"]
    assert guard.state.backend_models["champion"] == BASE  # the base version: the bare model
    tuned = register_version(run_id, model_name=model_name)
    set_alias(model_name, "champion", tuned["version"])
    guard.refresh_aliases()
    assert guard.state.versions["champion"] == tuned["version"]
    assert guard.state.backend_models["champion"] == f"{model_name}-v{tuned['version']}"
    assert guard.state.rejected == {}


def test_the_last_good_state_is_saved_and_loaded(client, model_name, adapter, resolver):
    import json

    signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    first = resolver()
    first.refresh_aliases()
    saved = json.loads(first.state_path.read_text())
    assert saved["versions"] == {"champion": "1", "challenger": None}
    assert saved["is_base"] == {"champion": False, "challenger": False}
    assert saved["backend_models"]["champion"] == f"{model_name}-v1"
    again = resolver(f"http://127.0.0.1:{closed_port()}")
    assert again.state.versions["champion"] == "1" and again.state.source == "persisted"


def test_a_corrupt_saved_state_is_ignored(model_name, resolver, caplog):
    from tasks.core.settings import get_settings

    path = default_state_path(get_settings().data_dir, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"versions": ')
    with caplog.at_level(logging.WARNING, logger="serving.router"):
        guard = resolver()
    assert guard.state.versions["champion"] is None
    assert any("ignoring the saved routing state" in r.getMessage() for r in caplog.records)


# ---- over HTTP ---------------------------------------------------------------------------------


def test_over_http_an_unsigned_champion_is_never_requested_from_the_backend(
        client, model_name, adapter, backend, tracking_uri, guard_engine, data_dir):
    signed_version(client, model_name, adapter)
    signed_version(client, model_name, adapter, sign=False)
    champion_is(client, model_name, 1)
    config = router_config(backend.base_url, model_name, tracking_uri, alias_ttl_s=0.1)
    with RouterServer(create_router_app(config, engine=guard_engine)) as server, \
            httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer k"}) as http:
        chat(http)  # answered under the public model id: the backend saw who served it
        assert asked_models(backend) == [f"{model_name}-v1"]
        champion_is(client, model_name, 2)
        deadline = time.monotonic() + 10
        while "champion" not in routing_state(http)["rejected"]:
            assert time.monotonic() < deadline, "the router never read the new alias"
            time.sleep(0.05)
        chat(http)
        routing = routing_state(http)
    assert set(asked_models(backend)) == {f"{model_name}-v1"}
    assert routing["versions"]["champion"] == "1"
    assert routing["rejected"]["champion"].startswith("version 2: no tuneloop.signature tag")


def test_mlflow_unreachable_at_start_up_serves_the_persisted_state_within_seconds(
        client, model_name, adapter, backend, tracking_uri, guard_engine, data_dir, resolver):
    signed_version(client, model_name, adapter)
    champion_is(client, model_name, 1)
    resolver().refresh_aliases()  # a router that ran before saved champion=1
    unreachable = f"http://127.0.0.1:{closed_port()}"
    config = router_config(backend.base_url, model_name, unreachable)
    started = time.monotonic()
    with RouterServer(create_router_app(config, engine=guard_engine)) as server, \
            httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer k"}) as http:
        took = time.monotonic() - started
        chat(http)
        routing = routing_state(http)
    assert took < 6, f"start-up took {took:.1f} s"
    assert asked_models(backend) == [f"{model_name}-v1"]
    assert routing["versions"]["champion"] == "1"


def test_mlflow_unreachable_without_saved_state_serves_the_base_model(
        model_name, backend, guard_engine, data_dir):
    config = router_config(backend.base_url, model_name, f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with RouterServer(create_router_app(config, engine=guard_engine)) as server, \
            httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer k"}) as http:
        took = time.monotonic() - started
        chat(http)
        assert asked_models(backend) == [BASE]
    assert took < 6, f"start-up took {took:.1f} s"
