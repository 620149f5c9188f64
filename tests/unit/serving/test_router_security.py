"""The router's front door for hostile clients (#15): named clients with hashed keys, the admin key
for the control route, X-Request-Id scoped per client (replay, 409, never overwritten), no variant
header, body and message limits, reactions tied to the client and end user that got the answer
(within the window; mirror copies never), and reactions taken while PostgreSQL is down — against
fake OpenAI backends (tests/fakes/fake_openai.py) and, for the outage, a TCP proxy in front of the
test database (tests/fakes/tcp_proxy.py)."""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from serving.openai_schema import SSEText
from serving.request_ids import RequestEntry, RequestIds
from serving.router import create_router_app
from serving.router_config import BackendConfig, RouterConfig, key_digest
from serving.router_server import RouterServer
from serving.routing import choose_variant, hash_user
from tasks.core.db.engine import session_scope
from tasks.core.db.models import Interaction, Reaction
from tasks.core.ids import stable_id
from tasks.core.settings import load_settings
from tasks.shadow.stage import deploy_challenger
from tests.fakes.fake_openai import FakeOpenAIServer

WEB_KEY = "web-client-key-0123456789"
APP_KEY = "app-client-key-0123456789"
ADMIN_KEY = "router-admin-key-0123456789"
SALT = "security-salt"
CHAT_BODY = {"model": "tuneloop", "messages": [{"role": "user", "content": "hi"}]}
INTERACTION_ID = re.compile(r"[0-9a-f]{32}")


def says(request: dict) -> str:
    return f"answer to {request['messages'][-1]['content']}"


@pytest.fixture(scope="module")
def security_engine(make_engine):
    return make_engine("tuneloop_router_security")


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(responder=says, model_ids=("champ", "chall")) as server:
        yield server


@pytest.fixture(scope="module")
def slow_backend() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(responder=says, model_ids=("champ",), latency_s=1.5) as server:
        yield server


def make_config(base_url: str, model_name: str, **overrides) -> RouterConfig:
    values = dict(
        backends={"champion": BackendConfig(base_url=base_url, base_model="champ",
                                            model_template="openai"),
                  "challenger": BackendConfig(base_url=base_url, base_model="chall",
                                              model_template="openai")},
        registered_model_name=model_name, public_model="tuneloop",
        clients={"web": key_digest(WEB_KEY), "app": key_digest(APP_KEY)},
        admin_key_sha256=key_digest(ADMIN_KEY), user_hash_salt=SALT, use_registry=False,
        deployment_ttl_s=0.1, log_flush_interval_s=0.05, rate_limit_per_s=0,
        key_rate_limit_per_s=0)
    values.update(overrides)
    return RouterConfig(**values)


class Running:
    """A started router and one HTTP client per key."""

    def __init__(self, server: RouterServer) -> None:
        self.server = server
        self.router = server.app.state.router
        self.url = server.base_url
        self.web = httpx.Client(base_url=self.url, timeout=30,
                                headers={"Authorization": f"Bearer {WEB_KEY}"})
        self.app = httpx.Client(base_url=self.url, timeout=30,
                                headers={"Authorization": f"Bearer {APP_KEY}"})
        self.admin = httpx.Client(base_url=self.url, timeout=30,
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def close(self) -> None:
        for client in (self.web, self.app, self.admin):
            client.close()
        self.server.stop()


@pytest.fixture()
def model_name() -> str:
    return f"sec-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def serve(backend, security_engine, model_name):
    """Factory: start a router (config overrides as keywords) → Running."""
    running: list[Running] = []

    def start(base_url: str | None = None, engine=None, **overrides) -> Running:
        config = make_config(base_url or backend.base_url, model_name, **overrides)
        server = RouterServer(create_router_app(config, engine=engine or security_engine))
        running.append(Running(server.start()))
        return running[-1]

    yield start
    for one in running:
        one.close()


def chat(client: httpx.Client, text: str = "hi", *, user: str | None = None,
         request_id: str | None = None, **extra) -> httpx.Response:
    body = {"model": "tuneloop", "messages": [{"role": "user", "content": text}], **extra}
    if user is not None:
        body["user"] = user
    headers = {"X-Request-Id": request_id} if request_id else {}
    return client.post("/chat/completions", json=body, headers=headers)


def stored(engine, interaction_id: str) -> Interaction | None:
    with session_scope(engine) as session:
        return session.get(Interaction, interaction_id)


def rows_for_request(engine, request_id: str) -> list[Interaction]:
    with session_scope(engine) as session:
        return list(session.execute(select(Interaction).where(
            Interaction.request_id == request_id).order_by(Interaction.client_id)).scalars())


def answered(running: Running, client: httpx.Client, *, user: str | None = "alice",
             text: str = "tip please") -> str:
    """An interaction id from `client`, its row written."""
    response = chat(client, text, user=user)
    assert response.status_code == 200, response.text
    interaction_id = response.headers["x-interaction-id"]
    assert running.router.log.wait_written(interaction_id, 10)
    return interaction_id


def react(client: httpx.Client, interaction_id: str, *, user: str | None = "alice",
          headers: dict | None = None, **extra) -> httpx.Response:
    body = {"interaction_id": interaction_id, "reaction": "done", "dwell_ms": 30_000, **extra}
    if user is not None:
        body["user"] = user
    return client.post("/reactions", json=body, headers=headers or {})


# ---- keys and configuration ---------------------------------------------------------------------


def test_key_digest_is_sha256_hex_of_the_key():
    import hashlib

    assert key_digest("k") == "sha256:" + hashlib.sha256(b"k").hexdigest()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", key_digest(secrets.token_hex(32)))


@pytest.mark.parametrize("clients, match", [
    ({"web": "not-a-digest"}, r"TUNELOOP_ROUTER_CLIENTS: client 'web' is not stored as "
                              r"sha256:<64 hex digits>.*tuneloop secrets client"),
    ({"web": "sha256:" + "a" * 63}, "TUNELOOP_ROUTER_CLIENTS: client 'web'"),
    ({"has space": key_digest("k")}, "TUNELOOP_ROUTER_CLIENTS: client name 'has space'"),
    ({"web": key_digest("same"), "app": key_digest("same")},
     "client 'web' and client 'app' have the same key"),
    ({}, "the router has no API client; set TUNELOOP_ROUTER_CLIENTS"),
])
def test_bad_client_entries_name_the_variable_and_the_fix(clients, match):
    with pytest.raises(ValidationError, match=match):
        RouterConfig(backends={"champion": {"base_url": "http://x/v1"}},
                     registered_model_name="m", clients=clients, user_hash_salt="s")


def test_a_raw_key_in_the_clients_setting_is_not_echoed_in_the_error():
    raw_key = "my-very-secret-raw-key"
    with pytest.raises(ValidationError) as caught:
        RouterConfig(backends={"champion": {"base_url": "http://x/v1"}},
                     registered_model_name="m", clients={"web": raw_key}, user_hash_salt="s")
    assert raw_key not in str(caught.value)


def test_the_admin_key_cannot_also_be_a_client_key():
    with pytest.raises(ValidationError, match="client 'web' and TUNELOOP_ROUTER_ADMIN_KEY"):
        RouterConfig(backends={"champion": {"base_url": "http://x/v1"}},
                     registered_model_name="m", clients={"web": key_digest("k")},
                     admin_key_sha256=key_digest("k"), user_hash_salt="s")


def test_from_settings_reads_clients_admin_key_limits_and_the_model_server_key():
    settings = load_settings(
        router_clients={"web": key_digest(WEB_KEY)}, router_api_key="legacy-key-0123456789",
        router_admin_key=ADMIN_KEY, model_server_api_key="model-server-key-0123456789",
        router_max_body_bytes=5_000, router_max_messages=7, router_max_content_chars=99,
        router_reaction_window_s=60.0)
    config = RouterConfig.from_settings(settings)
    assert config.clients == {"web": key_digest(WEB_KEY),
                              "default": key_digest("legacy-key-0123456789")}
    assert config.admin_key_sha256 == key_digest(ADMIN_KEY)
    assert {variant: backend.api_key.get_secret_value()
            for variant, backend in config.backends.items()} == {
        "champion": "model-server-key-0123456789", "challenger": "model-server-key-0123456789"}
    assert (config.max_body_bytes, config.max_messages, config.max_content_chars,
            config.reaction_window_s) == (5_000, 7, 99, 60.0)


# ---- who may call what ---------------------------------------------------------------------------

CLIENT_ROUTES = [("POST", "/chat/completions", CHAT_BODY), ("GET", "/models", None),
                 ("POST", "/reactions", {"interaction_id": "abc", "reaction": "done",
                                         "dwell_ms": 1})]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-key"},
                                     {"Authorization": f"Basic {WEB_KEY}"},
                                     {"Authorization": "Bearer"}],
                         ids=["none", "wrong", "not-bearer", "empty"])
@pytest.mark.parametrize("method, path, body", [*CLIENT_ROUTES, ("GET", "/router/state", None)],
                         ids=["chat", "models", "reactions", "router-state"])
def test_no_key_or_a_wrong_key_is_401_on_every_v1_route(serve, headers, method, path, body):
    running = serve()
    response = httpx.request(method, running.url + path, json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_router_state_takes_the_admin_key_and_no_client_key(serve):
    running = serve()
    for client in (running.web, running.app):
        refused = client.get("/router/state")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "forbidden"
        assert "admin key" in refused.json()["error"]["message"]
    state = running.admin.get("/router/state")
    assert state.status_code == 200
    assert state.json()["clients"] == ["app", "web"]
    assert state.json()["routing"]["mode"] == "off"


@pytest.mark.parametrize("method, path, body", CLIENT_ROUTES,
                         ids=["chat", "models", "reactions"])
def test_the_admin_key_is_403_on_client_routes(serve, method, path, body):
    running = serve()
    response = running.admin.request(method, path, json=body)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"


def test_health_and_the_openapi_document_are_public_and_say_nothing_about_the_state(serve):
    running = serve()
    root = running.url.removesuffix("/v1")
    health = httpx.get(f"{root}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    schema = httpx.get(f"{root}/openapi.json")
    assert schema.status_code == 200
    assert "/v1/router/state" in schema.json()["paths"]
    assert "deployment" not in health.text


def test_each_client_is_stored_by_its_name_and_the_one_key_setup_is_default(
        serve, security_engine):
    running = serve(api_keys=["legacy-key"])
    with httpx.Client(base_url=running.url, headers={"Authorization": "Bearer legacy-key"}) as old:
        ids = {name: answered(running, client)
               for name, client in (("web", running.web), ("app", running.app),
                                    ("default", old))}
    assert {name: stored(security_engine, interaction_id).client_id
            for name, interaction_id in ids.items()} == {
        "web": "web", "app": "app", "default": "default"}


def test_rate_limits_are_per_client(serve):
    running = serve(key_rate_limit_per_s=0.1, key_rate_limit_burst=2)
    assert [chat(running.web, user=f"u{i}").status_code for i in range(3)] == [200, 200, 429]
    assert chat(running.app, user="u0").status_code == 200  # its own bucket


# ---- interaction ids and the variant ------------------------------------------------------------


def test_interaction_ids_are_32_hex_from_secrets_never_from_the_request_id(serve, monkeypatch):
    running = serve()
    issued: list[str] = []
    real_token_hex = secrets.token_hex

    def recording(nbytes: int = 32) -> str:
        value = real_token_hex(nbytes)
        issued.append(value)
        return value

    monkeypatch.setattr(secrets, "token_hex", recording)
    request_id = "req-fixed"
    web = chat(running.web, user="u", request_id=request_id).headers["x-interaction-id"]
    app = chat(running.app, user="u", request_id=request_id).headers["x-interaction-id"]
    plain = chat(running.web, user="u").headers["x-interaction-id"]
    for interaction_id in (web, app, plain):
        assert INTERACTION_ID.fullmatch(interaction_id)
        assert interaction_id in issued
    assert len({web, app, plain}) == 3
    assert web != stable_id("interaction", "web", request_id)


def wait_for_mode(running, mode: str, timeout_s: float = 5.0) -> None:
    """Until the router serves the deployment just made (it re-reads it every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    while running.admin.get("/router/state").json()["routing"]["mode"] != mode:
        assert time.monotonic() < deadline, f"the router never switched to {mode}"
        time.sleep(0.05)


# What may differ between two answers whatever answered them: ids, dates and body lengths.
PER_ANSWER_HEADERS = {"x-interaction-id", "date", "content-length"}


def one_user_per_variant(share: float) -> dict[str, str]:
    """variant -> a user the routing function sends to it at canary `share`."""
    users: dict[str, str] = {}
    for i in range(1_000):
        user = f"user-{i}"
        users.setdefault(choose_variant(hash_user(user, SALT), "canary", share), user)
        if len(users) == 2:
            return users
    raise AssertionError(f"no user for each variant at share {share}")


def streamed_events(response: httpx.Response) -> list[dict]:
    """The JSON events of an SSE body (the [DONE] marker left out)."""
    data = [line.removeprefix("data:").strip() for line in response.text.splitlines()
            if line.startswith("data:")]
    assert data[-1] == "[DONE]", response.text
    return [json.loads(event) for event in data[:-1]]


def served_variant(running: Running, engine, response: httpx.Response) -> Interaction:
    interaction_id = response.headers["x-interaction-id"]
    assert running.router.log.wait_written(interaction_id, 10)
    return stored(engine, interaction_id)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_answers_of_the_two_variants_look_alike(serve, security_engine, model_name, stream):
    deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=security_engine)
    running = serve()
    wait_for_mode(running, "canary")
    answers = {variant: chat(running.web, user=user, stream=stream)
               for variant, user in one_user_per_variant(0.5).items()}
    for variant, response in answers.items():
        assert response.status_code == 200, response.text
        row = served_variant(running, security_engine, response)
        # Which variant and version answered is logged: in the stored row only.
        assert (row.variant, row.model_version, row.model_name) == {
            "champion": ("champion", "1", "champ"),
            "challenger": ("challenger", "2", "chall")}[variant]
    champion, challenger = answers["champion"], answers["challenger"]
    assert ([name for name, _ in champion.headers.multi_items()]
            == [name for name, _ in challenger.headers.multi_items()])
    assert ({name: value for name, value in champion.headers.multi_items()
             if name not in PER_ANSWER_HEADERS}
            == {name: value for name, value in challenger.headers.multi_items()
                if name not in PER_ANSWER_HEADERS})
    for response in answers.values():
        assert "x-tuneloop-model-version" not in response.headers
        assert "chall" not in response.text and "champ" not in response.text
    if stream:
        events = {variant: streamed_events(response) for variant, response in answers.items()}
        assert len(events["champion"]) == len(events["challenger"]) > 2
        assert {event["model"] for variant_events in events.values()
                for event in variant_events} == {"tuneloop"}
        assert ([sorted(event) for event in events["champion"]]
                == [sorted(event) for event in events["challenger"]])
    else:
        assert champion.json()["model"] == challenger.json()["model"] == "tuneloop"
        assert sorted(champion.json()) == sorted(challenger.json())


def test_no_response_names_the_variant(serve, backend, security_engine, model_name):
    deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=security_engine)
    running = serve()
    wait_for_mode(running, "canary")
    users = one_user_per_variant(0.5)
    interaction_id = answered(running, running.web, user=users["challenger"])
    responses = [
        *(chat(running.web, user=user, stream=stream)
          for user in users.values() for stream in (False, True)),
        chat(running.web, user=users["challenger"], request_id="r1"),
        chat(running.web, user=users["challenger"], request_id="r1"),  # a replay
        chat(running.web, user=users["challenger"], request_id="r2", stream=True),
        chat(running.web, user=users["challenger"], request_id="r2", stream=True),  # a replay
        running.web.post("/chat/completions", json={"model": "gpt-4", "messages": []}),
        running.web.post("/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "x"}]}),
        running.web.get("/models"),
        react(running.web, interaction_id),
        httpx.post(f"{running.url}/chat/completions", json=CHAT_BODY),
    ]
    for response in responses:
        assert "x-tuneloop-variant" not in response.headers, response.request.url
        assert "x-tuneloop-model-version" not in response.headers, response.request.url
        assert "challenger" not in response.text
        assert "chall" not in response.text and "champ" not in response.text
    for response in responses[:8]:
        assert response.status_code == 200, response.text
        models = ({event["model"] for event in streamed_events(response)}
                  if response.headers["content-type"].startswith("text/event-stream")
                  else {response.json()["model"]})
        assert models == {"tuneloop"}
    assert stored(security_engine, interaction_id).variant == "challenger"


# ---- X-Request-Id ------------------------------------------------------------------------------


def test_a_replay_by_the_same_client_returns_the_stored_answer_and_never_overwrites(
        serve, security_engine):
    running = serve()
    request_id = uuid.uuid4().hex
    first = chat(running.web, "first question", user="alice", request_id=request_id)
    assert first.status_code == 200
    replay = chat(running.web, "a different question", user="alice", request_id=request_id)
    assert replay.status_code == 200, replay.text
    assert replay.headers["x-interaction-id"] == first.headers["x-interaction-id"]
    assert replay.json()["interaction_id"] == first.headers["x-interaction-id"]
    assert replay.json()["choices"][0]["message"]["content"] == "answer to first question"
    assert running.router.log.flush(10)
    rows = rows_for_request(security_engine, request_id)
    assert len(rows) == 1
    assert rows[0].request_messages == [{"role": "user", "content": "first question"}]
    assert rows[0].response == "answer to first question" and rows[0].client_id == "web"


def test_a_streamed_replay_is_answered_as_a_stream(serve):
    running = serve()
    request_id = uuid.uuid4().hex
    first = chat(running.web, "stream me", user="alice", request_id=request_id, stream=True)
    assert first.status_code == 200
    assert running.router.log.wait_written(first.headers["x-interaction-id"], 10)
    replay = chat(running.web, "stream me", user="alice", request_id=request_id, stream=True)
    assert replay.status_code == 200
    assert replay.headers["content-type"].startswith("text/event-stream")
    text = SSEText()
    text.feed(replay.content)
    assert text.text == "answer to stream me"
    assert replay.headers["x-interaction-id"] == first.headers["x-interaction-id"]


def test_another_client_with_the_same_request_id_is_independent(serve, security_engine):
    running = serve()
    request_id = uuid.uuid4().hex
    web = chat(running.web, "from web", user="alice", request_id=request_id)
    app = chat(running.app, "from app", user="alice", request_id=request_id)
    assert (web.status_code, app.status_code) == (200, 200)
    assert web.headers["x-interaction-id"] != app.headers["x-interaction-id"]
    assert app.json()["choices"][0]["message"]["content"] == "answer to from app"
    assert running.router.log.flush(10)
    rows = rows_for_request(security_engine, request_id)
    assert [(r.client_id, r.request_messages[0]["content"]) for r in rows] == [
        ("app", "from app"), ("web", "from web")]


def test_a_replay_while_the_first_is_in_flight_is_409(serve, slow_backend, security_engine):
    running = serve(base_url=slow_backend.base_url)
    request_id = uuid.uuid4().hex
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(
        chat(running.web, "slow", user="alice", request_id=request_id)))
    thread.start()
    deadline = time.monotonic() + 5
    while running.router.requests.get(("web", request_id)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    replay = chat(running.web, "slow", user="alice", request_id=request_id)
    thread.join(30)
    assert replay.status_code == 409, replay.text
    assert replay.json()["error"]["code"] == "request_in_flight"
    assert replay.json()["error"]["param"] == "x-request-id"
    assert int(replay.headers["retry-after"]) >= 1
    assert first[0].status_code == 200
    assert replay.headers["x-interaction-id"] == first[0].headers["x-interaction-id"]
    assert running.router.log.flush(10)
    assert len(rows_for_request(security_engine, request_id)) == 1


def test_a_replay_of_a_failed_request_is_409_and_keeps_the_failed_row(serve, security_engine):
    running = serve(base_url="http://127.0.0.1:9/v1")  # nothing listens: the backend fails
    request_id = uuid.uuid4().hex
    first = chat(running.web, "anyone?", user="alice", request_id=request_id)
    assert first.status_code == 502
    assert "champion" not in first.text and "127.0.0.1" not in first.text
    replay = chat(running.web, "anyone?", user="alice", request_id=request_id)
    assert replay.status_code == 409
    assert replay.json()["error"]["code"] == "request_failed"
    assert "new X-Request-Id" in replay.json()["error"]["message"]
    assert running.router.log.flush(10)
    rows = rows_for_request(security_engine, request_id)
    assert [(r.status, r.id) for r in rows] == [("backend_error",
                                                 first.headers["x-interaction-id"])]


def test_a_request_id_from_before_a_restart_is_still_a_replay(serve, security_engine):
    first_router = serve()
    request_id = uuid.uuid4().hex
    first = chat(first_router.web, "before the restart", user="alice", request_id=request_id)
    assert first_router.router.log.wait_written(first.headers["x-interaction-id"], 10)
    first_router.close()
    second_router = serve()
    replay = chat(second_router.web, "after", user="alice", request_id=request_id)
    assert replay.status_code == 200
    assert replay.headers["x-interaction-id"] == first.headers["x-interaction-id"]
    assert replay.json()["choices"][0]["message"]["content"] == "answer to before the restart"


def test_an_evicted_request_id_is_found_in_the_database(serve, security_engine):
    running = serve(request_ids_max=2)
    ids = [uuid.uuid4().hex for _ in range(3)]
    responses = [chat(running.web, f"q{i}", user="alice", request_id=request_id)
                 for i, request_id in enumerate(ids)]
    assert running.router.log.flush(10)
    assert running.router.requests.get(("web", ids[0])) is None  # evicted from memory
    replay = chat(running.web, "q0 again", user="alice", request_id=ids[0])
    assert replay.status_code == 200
    assert replay.headers["x-interaction-id"] == responses[0].headers["x-interaction-id"]
    assert replay.json()["choices"][0]["message"]["content"] == "answer to q0"


REPLAY_USERS = [("alice", "mallory"), ("alice", None), (None, "mallory")]


def replayed_from(where: str, serve, request_id: str, first_user: str | None
                  ) -> tuple[Running, httpx.Response]:
    """A router that answers a replay of `request_id` (first sent by `first_user`) from
    `where`: memory, the database lookup of an evicted id, or the ids loaded at a restart."""
    running = serve(request_ids_max=2 if where == "lookup" else 10_000)
    first = chat(running.web, "private question", user=first_user, request_id=request_id)
    assert first.status_code == 200, first.text
    assert running.router.log.wait_written(first.headers["x-interaction-id"], 10)
    if where == "lookup":
        for i in range(2):
            chat(running.web, f"q{i}", user="bob", request_id=uuid.uuid4().hex)
        assert running.router.requests.get(("web", request_id)) is None  # evicted
    elif where == "restart":
        running.close()
        running = serve()
        deadline = time.monotonic() + 10
        while running.router.requests.get(("web", request_id)) is None:  # loaded at start
            assert time.monotonic() < deadline, "the request ids were never loaded"
            time.sleep(0.02)
    return running, first


@pytest.mark.parametrize("where", ["memory", "lookup", "restart"])
@pytest.mark.parametrize("first_user, replay_user", REPLAY_USERS,
                         ids=["other-user", "no-user", "user-after-none"])
def test_a_request_id_replayed_by_another_end_user_is_409(serve, security_engine, where,
                                                          first_user, replay_user):
    request_id = uuid.uuid4().hex
    running, first = replayed_from(where, serve, request_id, first_user)
    for stream in (False, True):
        replay = chat(running.web, "tell me", user=replay_user, request_id=request_id,
                      stream=stream)
        assert replay.status_code == 409, replay.text
        error = replay.json()["error"]
        assert (error["code"], error["param"]) == ("request_id_conflict", "x-request-id")
        assert "another user of this client" in error["message"]
        assert "send a new X-Request-Id" in error["message"]
        # Nothing of the first request reaches the other user: not its answer, not its id.
        assert "private question" not in replay.text
        assert "x-interaction-id" not in replay.headers
        assert first.headers["x-interaction-id"] not in replay.text
    assert running.router.log.flush(10)
    rows = rows_for_request(security_engine, request_id)
    assert [row.id for row in rows] == [first.headers["x-interaction-id"]]


@pytest.mark.parametrize("where", ["memory", "lookup", "restart"])
@pytest.mark.parametrize("user", ["alice", None], ids=["named", "anonymous"])
def test_a_request_id_replayed_by_the_same_end_user_gets_the_stored_answer(serve, where, user):
    request_id = uuid.uuid4().hex
    running, first = replayed_from(where, serve, request_id, user)
    replay = chat(running.web, "again", user=user, request_id=request_id)
    assert replay.status_code == 200, replay.text
    assert replay.headers["x-interaction-id"] == first.headers["x-interaction-id"]
    assert replay.json()["choices"][0]["message"]["content"] == "answer to private question"


def test_memory_vouches_for_fresh_ids_only_over_the_whole_window():
    requests = RequestIds(max_items=2, window_s=100.0)
    assert requests.might_exist(now=1_000.0)  # nothing loaded: anything may exist
    requests.load([("web", "old", "i0", "ok", 950.0, None)], loaded_from=900.0)
    assert not requests.might_exist(now=1_000.0)  # memory covers 900..now
    assert requests.get(("web", "old")).interaction_id == "i0"
    requests.put(("web", "a"), RequestEntry("i1", 990.0))
    requests.put(("web", "b"), RequestEntry("i2", 995.0))  # evicts "old" (created 950)
    assert requests.get(("web", "old")) is None
    assert requests.complete_since == 950.0
    assert requests.might_exist(now=1_000.0)  # 950 > 1000 - 100
    assert not requests.might_exist(now=1_060.0)  # the evicted id is out of the window


# ---- limits ------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_by_content_length(serve):
    running = serve(max_body_bytes=2_000)
    body = {**CHAT_BODY, "messages": [{"role": "user", "content": "x" * 3_000}]}
    response = running.web.post("/chat/completions", json=body)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "at most 2000 bytes" in error["message"]


def test_a_chunked_body_over_the_limit_is_413_too(serve):
    running = serve(max_body_bytes=2_000)
    payload = json.dumps({**CHAT_BODY, "messages": [
        {"role": "user", "content": "x" * 10_000}]}).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(payload), 500):
            yield payload[start:start + 500]

    response = running.web.post("/chat/completions", content=chunks(),
                                headers={"Content-Type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413, response.text
    assert "at most 2000 bytes" in response.json()["error"]["message"]


def test_a_reaction_body_over_the_limit_is_413(serve):
    running = serve(max_body_bytes=500)
    response = react(running.web, "abc", idempotency_key="k" * 255, user="u" * 256)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_too_many_messages_is_422_naming_the_field_and_the_limit(serve):
    running = serve(max_messages=3)
    body = {**CHAT_BODY, "messages": [{"role": "user", "content": "x"}] * 4}
    response = running.web.post("/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "at most 3 items" in error["message"] and "got 4" in error["message"]


def test_a_message_over_the_content_limit_is_422_naming_it(serve):
    running = serve(max_content_chars=10)
    body = {**CHAT_BODY, "messages": [{"role": "system", "content": "short"},
                                      {"role": "user", "content": "x" * 11}]}
    response = running.web.post("/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "messages.1.content"
    assert "at most 10 characters" in error["message"]


def test_the_openapi_document_advertises_the_message_limits(serve):
    running = serve(max_messages=5, max_content_chars=77)
    schema = httpx.get(running.url.removesuffix("/v1") + "/openapi.json").json()
    components = schema["components"]["schemas"]
    assert components["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 5
    assert components["ChatMessage"]["properties"]["content"]["maxLength"] == 77


# ---- reactions ---------------------------------------------------------------------------------


def test_a_reaction_is_stored_with_the_client_that_got_the_answer(serve, security_engine):
    running = serve()
    interaction_id = answered(running, running.web)
    response = react(running.web, interaction_id)
    assert response.status_code == 201, response.text
    with session_scope(security_engine) as session:
        reaction = session.get(Reaction, response.json()["id"])
        assert reaction.client_id == "web" and reaction.interaction_id == interaction_id


def test_another_clients_interaction_is_404_like_an_unknown_one(serve, security_engine):
    running = serve()
    interaction_id = answered(running, running.web)
    unknown_id = uuid.uuid4().hex
    theirs = react(running.app, interaction_id)
    unknown = react(running.app, unknown_id)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == "interaction_not_found"
    # Word for word the same answer: nothing tells the caller the interaction exists.
    assert theirs.json()["error"]["message"].replace(interaction_id, "<id>") == \
        unknown.json()["error"]["message"].replace(unknown_id, "<id>")
    with session_scope(security_engine) as session:
        assert session.execute(select(Reaction).where(
            Reaction.interaction_id == interaction_id)).first() is None


@pytest.mark.parametrize("user, headers", [("mallory", {}), (None, {}),
                                           (None, {"X-User-Id": "mallory"})],
                         ids=["other-user", "no-user", "other-user-header"])
def test_a_reaction_from_another_end_user_is_404(serve, user, headers):
    running = serve()
    interaction_id = answered(running, running.web, user="alice")
    response = react(running.web, interaction_id, user=user, headers=headers)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "interaction_not_found"


def test_the_end_user_may_come_from_the_x_user_id_header(serve):
    running = serve()
    interaction_id = answered(running, running.web, user="alice")
    response = react(running.web, interaction_id, user=None, headers={"X-User-Id": "alice"})
    assert response.status_code == 201, response.text


def test_an_anonymous_interaction_takes_a_reaction_from_its_client_only(serve):
    running = serve()
    interaction_id = answered(running, running.web, user=None)
    assert react(running.app, interaction_id, user=None).status_code == 404
    assert react(running.web, interaction_id, user=None).status_code == 201


def test_an_erased_users_interaction_takes_no_reaction(serve, security_engine):
    from tasks.signals.erasure import forget_user

    running = serve()
    interaction_id = answered(running, running.web, user="erin")
    assert react(running.web, interaction_id, user="erin").status_code == 201
    assert forget_user("erin", engine=security_engine, salt=SALT)["reactions_deleted"] == 1
    response = react(running.web, interaction_id, user="erin", idempotency_key="after")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "interaction_not_found"
    with session_scope(security_engine) as session:
        assert session.execute(select(Reaction).where(
            Reaction.interaction_id == interaction_id)).first() is None


def test_a_reaction_outside_the_window_is_refused(serve):
    running = serve(reaction_window_s=0.5)
    interaction_id = answered(running, running.web)
    time.sleep(1.0)
    response = react(running.web, interaction_id)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "reaction_window_closed"
    assert "accepted within" in error["message"]


def test_mirror_copies_cannot_be_reacted_to(serve, security_engine, model_name):
    deploy_challenger("2", champion_version="1", mode="mirror", share=1.0,
                      model_name=model_name, engine=security_engine)
    running = serve()
    wait_for_mode(running, "mirror")
    parent = answered(running, running.web)
    mirror_id = stable_id("mirror", parent)  # derivable by the client from its own id
    assert running.router.log.flush(10)
    mirror = stored(security_engine, mirror_id)
    assert mirror is not None and mirror.variant == "mirror" and mirror.client_id == "web"
    response = react(running.web, mirror_id)
    assert response.status_code == 404
    assert react(running.web, parent).status_code == 201


# ---- reactions while PostgreSQL is down --------------------------------------------------------


def test_while_the_database_is_down_a_checked_reaction_is_queued_then_written(
        serve, proxy, proxied_engine):
    engine = proxied_engine  # through the TCP proxy (tests/unit/serving/conftest.py)
    running = serve(engine=engine, db_wait_s=2.0)
    interaction_id = answered(running, running.web)
    proxy.down()
    try:
        queued = react(running.web, interaction_id)
        assert queued.status_code == 202, queued.text
        assert queued.json()["queued"] is True
        other_client = react(running.app, interaction_id)
        assert other_client.status_code == 404  # checked against memory too
        unknown = react(running.web, uuid.uuid4().hex)
        assert unknown.status_code == 503
        assert int(unknown.headers["retry-after"]) >= 1
    finally:
        proxy.up()
    assert running.router.log.flush(30)
    with session_scope(engine) as session:
        reaction = session.get(Reaction, queued.json()["id"])
        assert reaction is not None
        assert (reaction.client_id, reaction.interaction_id, reaction.reaction) == (
            "web", interaction_id, "done")
