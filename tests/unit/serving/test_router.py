"""The router: routing function, canary/mirror/off over HTTP, the official openai client through
it, interaction logging, auth, rate limits and the reactions API — against two fake
OpenAI-compatible backends (champion and challenger give distinguishable answers). Which variant
served a request is read from its stored interaction row: the router never tells the client.
The hostile-client front door (keys, admin route, replays, limits, reaction ownership) is in
test_router_security.py."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from serving.openai_schema import SSEText
from serving.proxy import PublicModelRewriter
from serving.router import create_router_app
from serving.router_config import BackendConfig, RouterConfig, key_digest
from serving.router_server import RouterServer
from serving.routing import TokenBucketLimiter, choose_variant, hash_user, user_bucket
from tasks.core.db.engine import session_scope
from tasks.core.db.models import Interaction, Reaction
from tasks.shadow.stage import deploy_challenger, end_deployment
from tests.fakes.fake_openai import FakeOpenAIServer

API_KEY = "test-router-key"
ADMIN_KEY = "test-router-admin-key"
CLIENT = "tests"
SALT = "test-salt"
CHAMPION_MODEL = "champ-base"
CHALLENGER_MODEL = "chall-base"


def champion_says(request: dict) -> str:
    return f"CHAMPION answer to {request['messages'][-1]['content']}"


def challenger_says(request: dict) -> str:
    return f"CHALLENGER answer to {request['messages'][-1]['content']}"


@pytest.fixture(scope="module")
def router_engine(make_engine):
    return make_engine("tuneloop_router")


@pytest.fixture(scope="module")
def backends():
    with FakeOpenAIServer(responder=champion_says,
                          model_ids=(CHAMPION_MODEL, "reg-v1", "reg-v2")) as champion, \
            FakeOpenAIServer(responder=challenger_says,
                             model_ids=(CHALLENGER_MODEL, "reg-v1", "reg-v2")) as challenger:
        yield champion, challenger


def make_config(backends, model_name: str, **overrides) -> RouterConfig:
    champion, challenger = backends
    values = dict(
        backends={
            "champion": BackendConfig(base_url=champion.base_url, base_model=CHAMPION_MODEL,
                                      model_template="openai"),
            "challenger": BackendConfig(base_url=challenger.base_url,
                                        base_model=CHALLENGER_MODEL, model_template="openai"),
        },
        registered_model_name=model_name, public_model="tuneloop",
        clients={CLIENT: key_digest(API_KEY)}, admin_key_sha256=key_digest(ADMIN_KEY),
        user_hash_salt=SALT, use_registry=False, deployment_ttl_s=0.1,
        log_flush_interval_s=0.05, rate_limit_per_s=0, key_rate_limit_per_s=0,
    )
    values.update(overrides)
    return RouterConfig(**values)


@pytest.fixture()
def model_name() -> str:
    return f"model-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def serve(backends, router_engine, model_name):
    """Start a router for this test's model name; yields (server, http client)."""
    servers: list[RouterServer] = []
    clients: list[httpx.Client] = []

    def start(**overrides):
        app = create_router_app(make_config(backends, model_name, **overrides),
                                engine=router_engine)
        server = RouterServer(app).start()
        servers.append(server)
        client = httpx.Client(base_url=server.base_url, timeout=30,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        clients.append(client)
        return server, client

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


def chat(client: httpx.Client, text: str, user: str | None = None, **extra) -> httpx.Response:
    body = {"model": "tuneloop", "messages": [{"role": "user", "content": text}], **extra}
    if user is not None:
        body["user"] = user
    return client.post("/chat/completions", json=body)


def router_state(server: RouterServer) -> dict:
    """GET /v1/router/state with the admin key."""
    response = httpx.get(f"{server.base_url}/router/state", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def stored_rows(server: RouterServer, engine, responses: list[httpx.Response]
                ) -> list[Interaction]:
    """The interaction rows of `responses` (by their X-Interaction-Id), once written."""
    ids = [response.headers["x-interaction-id"] for response in responses]
    assert server.app.state.router.log.flush(10)
    with session_scope(engine) as session:
        rows = {row.id: row for row in session.execute(
            select(Interaction).where(Interaction.id.in_(ids))).scalars()}
    return [rows[interaction_id] for interaction_id in ids]


def variant_of(server: RouterServer, engine, response: httpx.Response) -> str:
    """Which variant served `response`, as its stored interaction says (never a header)."""
    assert "x-tuneloop-variant" not in response.headers
    interaction_id = response.headers["x-interaction-id"]
    assert server.app.state.router.log.wait_written(interaction_id, 10)
    with session_scope(engine) as session:
        return session.get(Interaction, interaction_id).variant


def wait_rows(engine, condition, expected: int, timeout_s: float = 10.0) -> list[Interaction]:
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(engine) as session:
            rows = list(session.execute(select(Interaction).where(condition)).scalars())
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# ---- the routing function ----------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.3])
def test_canary_share_is_within_tolerance_over_10k_users(share):
    users = [hash_user(f"user-{i}", SALT) for i in range(10_000)]
    served = [choose_variant(h, "canary", share) for h in users]
    fraction = served.count("challenger") / len(served)
    # binomial sd at n=10k is <= 0.0046: 0.015 is > 3 sd for both shares
    assert abs(fraction - share) < 0.015


def test_canary_is_sticky_per_user_and_monotone_in_share():
    users = [hash_user(f"user-{i}", SALT) for i in range(2_000)]
    first = [choose_variant(h, "canary", 0.05) for h in users]
    again = [choose_variant(h, "canary", 0.05) for h in users]
    assert first == again
    wider = [choose_variant(h, "canary", 0.10) for h in users]
    assert all(w == "challenger" for f, w in zip(first, wider, strict=True) if f == "challenger")
    assert wider.count("challenger") > first.count("challenger")


def test_mirror_and_off_always_answer_with_the_champion():
    users = [hash_user(f"user-{i}", SALT) for i in range(1_000)]
    assert {choose_variant(h, "mirror", 1.0) for h in users} == {"champion"}
    assert {choose_variant(h, "off", 1.0) for h in users} == {"champion"}


def test_user_hash_is_salted_hmac_and_bucket_in_unit_interval():
    a, b = hash_user("alice", "salt-1"), hash_user("alice", "salt-2")
    assert a != b and len(a) == 64 and "alice" not in a
    assert 0.0 <= user_bucket(a) < 1.0


def test_backend_model_names_follow_the_template():
    local = BackendConfig(base_url="http://x/v1", base_model="smollm2-135m-instruct")
    assert local.model_for("3", "tuneloop-assistant") == \
        "smollm2-135m-instruct:tuneloop-assistant-v3"
    assert local.model_for(None, "tuneloop-assistant") == "smollm2-135m-instruct"
    assert local.model_for("1", "tuneloop-assistant", is_base=True) == "smollm2-135m-instruct"
    ollama = BackendConfig(base_url="http://x/v1", model_template="ollama")
    assert ollama.model_for("7", "tip") == "tip:v7"
    custom = BackendConfig(base_url="http://x/v1", model_template="ft-{registered_model_name}@{version}")
    assert custom.model_for("2", "tip") == "ft-tip@2"


def test_backend_config_errors_say_the_fix():
    with pytest.raises(ValidationError, match="format string over"):
        BackendConfig(base_url="http://x/v1", model_template="{unknown}")
    with pytest.raises(ValidationError, match="http"):
        BackendConfig(base_url="localhost:8300")
    with pytest.raises(ValidationError, match="champion"):
        RouterConfig(backends={"challenger": {"base_url": "http://x/v1"}},
                     registered_model_name="m", api_keys=["k"], user_hash_salt="s")


def test_token_bucket_allows_a_burst_then_says_how_long_to_wait():
    limiter = TokenBucketLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.acquire("k", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k", now=100.0) == pytest.approx(0.5)
    assert limiter.acquire("other", now=100.0) == 0.0
    assert limiter.acquire("k", now=100.5) == 0.0  # one token refilled


def test_sse_text_reassembles_deltas_split_across_chunks():
    events = (b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
              b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: [DONE]\n\n')
    text = SSEText()
    for i in range(0, len(events), 7):
        text.feed(events[i:i + 7])
    assert text.text == "Hello"


BACKEND_EVENTS = (
    b'data: {"id":"c1","model":"smollm2-135m-instruct:reg-v2","choices":[{"delta":'
    b'{"content":"the \\"model\\": \\"reg-v2\\" field"}}]}\n\n'
    b'data: {"id": "c1", "model": "odd \\"name\\\\", "choices": []}\r\n\r\n'
    b': keep-alive\n\nevent: ping\ndata: {"model":"reg-v2","usage":null}\n\n'
    b"data: [DONE]\n\n")


def rewritten(chunks: list[bytes], public_model: str = "tune\"loop") -> list[bytes]:
    rewriter = PublicModelRewriter(public_model)
    return [*(rewriter.feed(chunk) for chunk in chunks), rewriter.flush()]


def with_public_model(raw: bytes) -> bytes:
    """BACKEND_EVENTS (or a prefix of it) as the client must get it."""
    for field in (b'"model":"smollm2-135m-instruct:reg-v2"', b'"model": "odd \\"name\\\\"',
                  b'"model":"reg-v2"'):
        raw = raw.replace(field, b'"model":"tune\\"loop"')
    return raw


# 1: a boundary at every byte (mid-line, mid-field, between \r and \n); the whole length: every
# event in one chunk.
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64, len(BACKEND_EVENTS)])
def test_every_streamed_model_field_is_rewritten_whatever_the_chunk_boundaries(size):
    chunks = [BACKEND_EVENTS[i:i + size] for i in range(0, len(BACKEND_EVENTS), size)]
    out = rewritten(chunks)
    body = b"".join(out)
    events = [json.loads(line[5:]) for line in body.splitlines()
              if line.startswith(b"data:") and line != b"data: [DONE]"]
    assert [event["model"] for event in events] == ['tune"loop'] * 3
    assert events[0]["choices"][0]["delta"]["content"] == 'the "model": "reg-v2" field'
    assert b"smollm2" not in body and b"odd" not in body
    assert body == with_public_model(BACKEND_EVENTS)
    # Whole lines only, each passed on with the chunk that completes it.
    received, passed = b"", b""
    for chunk, piece in zip(chunks, out, strict=False):
        received += chunk
        passed += piece
        complete = received[:max(received.rfind(b"\n"), received.rfind(b"\r")) + 1]
        assert passed == with_public_model(complete)
    assert out[-1] == b""


def test_whole_events_pass_in_the_chunk_they_came_in():
    events = [b'data: {"model":"reg-v1","choices":[]}\n\n', b"data: [DONE]\n\n"]
    assert rewritten(events, "tuneloop") == [b'data: {"model":"tuneloop","choices":[]}\n\n',
                                             b"data: [DONE]\n\n", b""]


def test_a_stream_ending_mid_line_is_rewritten_and_passed_at_the_end():
    assert b"".join(rewritten([b'data: {"model":', b'"reg-v1"}'], "tuneloop")) == (
        b'data: {"model":"tuneloop"}')


# ---- over HTTP ---------------------------------------------------------------------------------


def test_canary_over_http_routes_each_user_as_the_routing_function_says(
        serve, router_engine, model_name):
    deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=router_engine)
    server, client = serve()
    served: list[tuple[str, httpx.Response]] = []
    for round_ in range(3):
        for i in range(30):
            user = f"u{i}"
            response = chat(client, f"q{round_}", user=user)
            assert response.status_code == 200, response.text
            assert "x-tuneloop-variant" not in response.headers
            served.append((user, response))
    rows = stored_rows(server, router_engine, [response for _, response in served])
    seen: dict[str, set[str]] = {}
    for (user, response), row in zip(served, rows, strict=True):
        content = response.json()["choices"][0]["message"]["content"]
        assert content.startswith(row.variant.upper())
        assert row.variant == choose_variant(hash_user(user, SALT), "canary", 0.5)
        seen.setdefault(user, set()).add(row.variant)
    assert all(len(v) == 1 for v in seen.values())  # sticky
    assert {next(iter(v)) for v in seen.values()} == {"champion", "challenger"}


def test_user_id_can_come_from_the_x_user_id_header(serve, router_engine, model_name):
    deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=router_engine)
    server, client = serve()
    users = [f"header-user-{i}" for i in range(10)]
    responses = [client.post("/chat/completions", headers={"X-User-Id": user}, json={
        "model": "tuneloop", "messages": [{"role": "user", "content": "hi"}]}) for user in users]
    rows = stored_rows(server, router_engine, responses)
    for user, row in zip(users, rows, strict=True):
        assert row.user_hash == hash_user(user, SALT)
        assert row.variant == choose_variant(hash_user(user, SALT), "canary", 0.5)


def test_mirror_never_returns_the_challenger_answer_and_logs_it(serve, router_engine,
                                                                  model_name):
    deployment = deploy_challenger("2", champion_version="1", mode="mirror", share=1.0,
                                   model_name=model_name, engine=router_engine)
    server, client = serve()
    ids = []
    for i in range(12):
        stream = i % 2 == 1
        response = chat(client, f"question {i}", user=f"m{i}", stream=stream)
        assert response.status_code == 200
        if stream:
            text = SSEText()
            text.feed(response.content)
            answer = text.text
        else:
            answer = response.json()["choices"][0]["message"]["content"]
        assert answer == f"CHAMPION answer to question {i}"
        assert "CHALLENGER" not in response.text
        assert "x-tuneloop-variant" not in response.headers
        assert variant_of(server, router_engine, response) == "champion"
        ids.append(response.headers["x-interaction-id"])
    mirrors = wait_rows(router_engine, (Interaction.variant == "mirror")
                        & (Interaction.deployment_id == deployment["deployment_id"]), 12)
    assert sorted(m.mirror_of for m in mirrors) == sorted(ids)
    assert all(m.response.startswith("CHALLENGER answer") for m in mirrors)
    assert all(m.model_version == "2" and m.status == "ok" for m in mirrors)


@pytest.mark.parametrize("http_backend", ["aiohttp", "httpx"])
def test_official_openai_client_non_streaming_through_the_router(serve, router_engine,
                                                                   model_name, http_backend):
    import openai

    server, _ = serve(http_backend=http_backend)
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="tuneloop", messages=[{"role": "user", "content": "hello there"}],
        user="alice", temperature=0.2, max_tokens=50, metadata={"surface": "tips"})
    completion = raw.parse()
    assert completion.choices[0].message.content == "CHAMPION answer to hello there"
    interaction_id = raw.headers["x-interaction-id"]
    assert completion.model_extra["interaction_id"] == interaction_id
    server.app.state.router.log.wait_written(interaction_id, 5)
    with session_scope(router_engine) as session:
        row = session.get(Interaction, interaction_id)
    assert row.user_hash == hash_user("alice", SALT)
    assert row.client_id == CLIENT and row.request_id is None
    assert row.variant == "champion" and row.model_name == CHAMPION_MODEL
    assert row.request_messages == [{"role": "user", "content": "hello there"}]
    assert row.response == "CHAMPION answer to hello there"
    assert row.context["params"] == {"temperature": 0.2, "max_tokens": 50}
    assert row.context["metadata"] == {"surface": "tips"}
    assert row.latency_ms > 0 and row.status == "ok" and row.stream is False


@pytest.mark.parametrize("http_backend", ["aiohttp", "httpx"])
def test_official_openai_client_streaming_through_the_router(serve, router_engine, model_name,
                                                               http_backend):
    import openai

    server, _ = serve(http_backend=http_backend)
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY)
    with client.chat.completions.with_streaming_response.create(
            model="tuneloop", messages=[{"role": "user", "content": "stream me"}],
            stream=True, user="bob") as response:
        interaction_id = response.headers["x-interaction-id"]
        pieces = [chunk.choices[0].delta.content or "" for chunk in response.parse()
                  if chunk.choices]
    assert "".join(pieces) == "CHAMPION answer to stream me"
    assert len(pieces) > 3  # really streamed as several events
    rows = wait_rows(router_engine, Interaction.id == interaction_id, 1)
    assert rows[0].response == "CHAMPION answer to stream me"
    assert rows[0].stream is True and rows[0].ttft_ms is not None


def test_new_deployment_is_picked_up_without_restart(serve, router_engine, model_name):
    server, client = serve()
    assert variant_of(server, router_engine, chat(client, "before", user="x")) == "champion"
    deploy_challenger("2", champion_version="1", mode="canary", share=1.0,
                      model_name=model_name, engine=router_engine)
    deadline = time.monotonic() + 5
    variant = "champion"
    while variant != "challenger" and time.monotonic() < deadline:
        time.sleep(0.1)
        variant = variant_of(server, router_engine, chat(client, "after", user="x"))
    assert variant == "challenger"
    assert router_state(server)["routing"]["mode"] == "canary"


@pytest.mark.parametrize("http_backend", ["aiohttp", "httpx"])
def test_failed_challenger_falls_back_to_champion_and_failures_are_logged(
        backends, router_engine, model_name, http_backend):
    config = make_config(backends, model_name, http_backend=http_backend)
    config.backends["challenger"] = BackendConfig(base_url="http://127.0.0.1:9/v1",
                                                  base_model=CHALLENGER_MODEL,
                                                  model_template="openai", timeout_s=2)
    deploy_challenger("2", champion_version="1", mode="canary", share=1.0,
                      model_name=model_name, engine=router_engine)
    with RouterServer(create_router_app(config, engine=router_engine)) as server, \
            httpx.Client(base_url=server.base_url,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        response = chat(client, "fallback please", user="y")
        assert response.status_code == 200
        assert "x-tuneloop-variant" not in response.headers
        assert response.json()["choices"][0]["message"]["content"].startswith("CHAMPION")
        streamed = chat(client, "fallback stream", user="y", stream=True)
        assert streamed.status_code == 200 and "CHAMPION" in streamed.text
        served = [response.headers["x-interaction-id"], streamed.headers["x-interaction-id"]]
        for interaction_id in served:
            server.app.state.router.log.wait_written(interaction_id, 5)
    for interaction_id in served:
        with session_scope(router_engine) as session:
            row = session.get(Interaction, interaction_id)
        assert row.context["fallback_from"] == "challenger" and row.variant == "champion"
        assert row.status == "ok"
        # The failed challenger attempt is a row of its own, so the challenger's error rate
        # (what the shadow report's rollback guard tests) counts it.
        failed = wait_rows(router_engine, Interaction.context["fallback_to"].astext
                           == interaction_id, 1)
        assert [(r.variant, r.status) for r in failed] == [("challenger", "backend_error")]
        assert failed[0].error and failed[0].model_version == "2"


def test_champion_backend_down_is_a_502_with_a_logged_row(backends, router_engine, model_name):
    config = make_config(backends, model_name)
    config.backends["champion"] = BackendConfig(base_url="http://127.0.0.1:9/v1",
                                                base_model=CHAMPION_MODEL,
                                                model_template="openai", timeout_s=2)
    with RouterServer(create_router_app(config, engine=router_engine)) as server, \
            httpx.Client(base_url=server.base_url,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        response = chat(client, "anyone?", user="z")
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "backend_error"
        interaction_id = response.headers["x-interaction-id"]
        server.app.state.router.log.wait_written(interaction_id, 5)
    with session_scope(router_engine) as session:
        assert session.get(Interaction, interaction_id).status == "backend_error"


def test_unknown_model_is_404_naming_the_right_one(serve):
    _, client = serve()
    response = client.post("/chat/completions", json={
        "model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert "tuneloop" in response.json()["error"]["message"]


def test_retried_request_id_is_logged_once_and_answered_alike(serve, router_engine, model_name):
    server, client = serve()
    request_id = uuid.uuid4().hex
    responses = [client.post("/chat/completions", headers={"X-Request-Id": request_id}, json={
        "model": "tuneloop", "user": "r", "messages": [{"role": "user", "content": "again"}],
    }) for _ in range(3)]
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {
        "CHAMPION answer to again"}
    ids = {response.headers["x-interaction-id"] for response in responses}
    assert len(ids) == 1
    server.app.state.router.log.wait_written(ids.pop(), 5)
    with session_scope(router_engine) as session:
        rows = session.execute(select(Interaction).where(
            Interaction.request_messages[0]["content"].astext == "again")).scalars().all()
    assert len(rows) == 1


# ---- auth and limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_every_v1_route_needs_the_api_key(serve, headers):
    server, _ = serve()
    with httpx.Client(base_url=server.base_url, headers=headers) as anonymous:
        assert anonymous.get("/models").status_code == 401
        assert anonymous.get("/router/state").status_code == 401
        response = anonymous.post("/chat/completions", json={
            "model": "tuneloop", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/reactions", json={
            "interaction_id": "abc", "reaction": "done", "dwell_ms": 1}).status_code == 401


def test_health_needs_no_key_and_names_no_deployment(serve, router_engine, model_name):
    server, client = serve()
    deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                      model_name=model_name, engine=router_engine)
    root = server.base_url.removesuffix("/v1")
    deadline = time.monotonic() + 5
    while router_state(server)["routing"]["mode"] != "canary" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert router_state(server)["routing"]["mode"] == "canary"
    response = httpx.get(f"{root}/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_models_lists_the_public_model(serve):
    _, client = serve()
    assert [m["id"] for m in client.get("/models").json()["data"]] == ["tuneloop"]


def test_the_key_limit_holds_whatever_user_the_requests_name(serve):
    _, client = serve(key_rate_limit_per_s=0.1, key_rate_limit_burst=3)
    codes = [chat(client, "hi", user=f"user-{i}").status_code for i in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.post("/reactions", json={"interaction_id": "abc", "reaction": "done",
                                           "dwell_ms": 1}).status_code == 429


def test_reactions_are_rate_limited_per_key(serve):
    _, client = serve(key_rate_limit_per_s=0.1, key_rate_limit_burst=2)
    body = {"interaction_id": uuid.uuid4().hex, "reaction": "done", "dwell_ms": 20_000}
    codes = [client.post("/reactions", json=body).status_code for _ in range(3)]
    assert codes == [404, 404, 429]
    assert int(client.post("/reactions", json=body).headers["retry-after"]) >= 1


def test_reactions_check_the_key_before_the_body(serve):
    """A caller without a valid key learns nothing from validation: 401, never 422."""
    server, _ = serve()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server.base_url}/reactions", headers=headers,
                              json={"reaction": "love", "dwell_ms": -1})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_rate_limit_per_user_answers_429_with_retry_after(serve):
    _, client = serve(rate_limit_per_s=0.1, rate_limit_burst=2)
    codes = [chat(client, "hi", user="greedy").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = chat(client, "hi", user="greedy")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert chat(client, "hi", user="patient").status_code == 200


# ---- reactions ---------------------------------------------------------------------------------


def _one_interaction(client: httpx.Client, user: str = "react") -> str:
    response = chat(client, "tip please", user=user)
    assert response.status_code == 200
    return response.headers["x-interaction-id"]


@pytest.mark.parametrize("body, field", [
    ({"interaction_id": "abc", "reaction": "done", "dwell_ms": -1}, "dwell_ms"),
    ({"interaction_id": "abc", "reaction": "love", "dwell_ms": 10}, "reaction"),
    ({"reaction": "done", "dwell_ms": 10}, "interaction_id"),
    ({"interaction_id": "abc", "reaction": "done", "dwell_ms": "soon"}, "dwell_ms"),
    ({"interaction_id": "abc", "reaction": "done", "dwell_ms": 1, "mood": "x"}, "mood"),
])
def test_invalid_reaction_is_422_naming_the_field(serve, body, field):
    _, client = serve()
    response = client.post("/reactions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_reaction_body_that_is_not_json_is_400_and_the_schema_still_describes_it(serve):
    server, client = serve()
    response = client.post("/reactions", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    schema = httpx.get(server.base_url.removesuffix("/v1") + "/openapi.json").json()
    body = schema["paths"]["/v1/reactions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ReactionIn"}
    assert {"interaction_id", "reaction", "dwell_ms"} <= set(
        schema["components"]["schemas"]["ReactionIn"]["properties"])


def test_reaction_to_unknown_interaction_is_404(serve):
    _, client = serve()
    response = client.post("/reactions", json={"interaction_id": uuid.uuid4().hex,
                                               "reaction": "done", "dwell_ms": 20_000})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "interaction_not_found"


def test_reaction_right_after_the_answer_waits_for_the_queued_interaction(serve):
    _, client = serve(log_flush_interval_s=1.0)
    interaction_id = _one_interaction(client)
    response = client.post("/reactions", json={"interaction_id": interaction_id,
                                               "reaction": "done", "dwell_ms": 30_000,
                                               "user": "react"})
    assert response.status_code == 201, response.text


def test_idempotency_key_returns_the_same_reaction(serve, router_engine):
    _, client = serve()
    interaction_id = _one_interaction(client)
    body = {"interaction_id": interaction_id, "reaction": "dismiss", "dwell_ms": 1_200,
            "user": "react"}
    first = client.post("/reactions", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/reactions", json=body, headers={"Idempotency-Key": "k-1"})
    in_body = client.post("/reactions", json={**body, "idempotency_key": "k-1"})
    assert (first.status_code, again.status_code, in_body.status_code) == (201, 200, 200)
    assert first.json()["id"] == again.json()["id"] == in_body.json()["id"]
    assert first.json()["created"] is True and again.json()["created"] is False
    other = client.post("/reactions", json=body, headers={"Idempotency-Key": "k-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    with session_scope(router_engine) as session:
        stored = session.execute(select(Reaction).where(
            Reaction.interaction_id == interaction_id)).scalars().all()
    assert len(stored) == 2 and {r.idempotency_key for r in stored} == {"k-1", "k-2"}
    assert {r.client_id for r in stored} == {CLIENT}


def test_idempotency_key_reused_with_another_payload_is_409(serve):
    _, client = serve()
    interaction_id = _one_interaction(client)
    headers = {"Idempotency-Key": "same"}
    first = client.post("/reactions", headers=headers, json={
        "interaction_id": interaction_id, "reaction": "done", "dwell_ms": 20_000,
        "user": "react"})
    assert first.status_code == 201, first.text
    response = client.post("/reactions", headers=headers, json={
        "interaction_id": interaction_id, "reaction": "dismiss", "dwell_ms": 100,
        "user": "react"})
    assert response.status_code == 409
    assert response.json()["error"]["param"] == "idempotency_key"


def test_identical_reaction_without_a_key_is_a_replay(serve):
    _, client = serve()
    interaction_id = _one_interaction(client)
    body = {"interaction_id": interaction_id, "reaction": "thumbs_up", "dwell_ms": 0,
            "user": "react"}
    codes = [client.post("/reactions", json=body).status_code for _ in range(2)]
    assert codes == [201, 200]


def test_end_deployment_returns_router_to_champion_only(serve, router_engine, model_name):
    deployment = deploy_challenger("2", champion_version="1", mode="canary", share=1.0,
                                   model_name=model_name, engine=router_engine)
    server, client = serve()
    assert variant_of(server, router_engine, chat(client, "a", user="w")) == "challenger"
    assert end_deployment(deployment["deployment_id"], engine=router_engine) is True
    deadline = time.monotonic() + 5
    variant = "challenger"
    while variant != "champion" and time.monotonic() < deadline:
        time.sleep(0.1)
        variant = variant_of(server, router_engine, chat(client, "b", user="w"))
    assert variant == "champion"


@pytest.mark.parametrize("body, headers, field", [
    ({"model": "tuneloop", "messages": []}, {}, "messages"),
    ({"model": "tuneloop", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
     {}, "temperature"),
    ({"model": "tuneloop", "messages": [{"role": "user", "content": "x"}], "top_p": False},
     {}, "top_p"),
    ({"model": "tuneloop", "messages": [{"role": "wizard", "content": "x"}]}, {},
     "messages.0.role"),
    ({"model": "tuneloop", "messages": [{"role": "user", "content": "x"}]},
     {"X-User-Id": "u" * 300}, "x-user-id"),
])
def test_invalid_chat_request_is_422_naming_the_field(serve, body, headers, field):
    _, client = serve()
    response = client.post("/chat/completions", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == field


def test_malformed_json_is_400_and_auth_comes_before_validation(serve):
    server, client = serve()
    response = client.post("/chat/completions", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with httpx.Client(base_url=server.base_url) as anonymous:
        assert anonymous.post("/chat/completions", json={"messages": []}).status_code == 401


def test_text_postgres_cannot_store_is_cleaned_not_lost(serve, router_engine):
    """NUL characters and lone surrogates (found by schemathesis) used to poison a whole batch."""
    server, client = serve()
    ids = []
    for content in ("nul \\u0000 inside", "lone \\ud800 surrogate", "plain"):  # JSON escapes
        raw = ('{"model": "tuneloop", "user": "c", "messages": [{"role": "user", "content": "'
               + content + '"}]}').encode()
        response = client.post("/chat/completions", content=raw,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-interaction-id"])
    assert server.app.state.router.log.flush(10)
    with session_scope(router_engine) as session:
        rows = {row.id: row for row in session.execute(
            select(Interaction).where(Interaction.id.in_(ids))).scalars()}
    assert len(rows) == 3
    assert rows[ids[0]].request_messages[0]["content"] == "nul \ufffd inside"
    assert rows[ids[1]].request_messages[0]["content"] == "lone ? surrogate"
    assert server.app.state.router.log.stats()["failed"] == 0


# ---- the direct lane for POST /v1/chat/completions ---------------------------------------------


def test_chat_route_bypasses_the_middleware_stack_but_keeps_its_answers(serve, monkeypatch):
    """The hot path skips Starlette's stack; its 422s, 401s and other routes look the same."""
    server, client = serve()
    stack_calls = []
    original = type(server.app).__mro__[1].__call__  # FastAPI.__call__

    async def counting(self, scope, receive, send):
        stack_calls.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(type(server.app).__mro__[1], "__call__", counting)
    assert chat(client, "hello", user="lane-user").status_code == 200
    bad = client.post("/chat/completions", json={"model": "tuneloop", "messages": "nope"})
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "messages"
    anonymous = httpx.post(f"{server.base_url}/chat/completions", json={"model": "tuneloop"})
    assert anonymous.status_code == 401
    assert stack_calls == []  # none of the three went through FastAPI's stack
    assert client.get("/models").status_code == 200
    assert stack_calls == ["/v1/models"]


def test_unexpected_error_on_the_chat_route_is_a_logged_json_500(serve, caplog):
    server, client = serve()

    def broken(*args, **kwargs):
        raise RuntimeError("limiter exploded")

    server.app.state.router.rate_limited = broken
    with caplog.at_level("ERROR", logger="serving.router"):
        response = chat(client, "hello", user="u-500")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "limiter exploded" in caplog.text
    assert chat(client, "hello again", user="u-500").status_code == 500  # still serving
    assert client.get("/models").status_code == 200


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_a_stream_whose_client_left_before_the_first_chunk_still_closes_and_logs(spec_version):
    """Starlette never starts the body generator when the client is gone before the first
    chunk (2.4: the first send fails; older servers: a disconnect message cancels the stream),
    so the generator's `finally` cannot log or release the backend; on_close runs regardless."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from serving.proxy import ClosingStream

    started, closed = [], []

    async def body():
        started.append(True)
        yield b"data: never\n\n"

    async def on_close():
        closed.append(True)

    async def send(message):
        if spec_version == "2.4":
            raise OSError("client went away")
        await asyncio.sleep(3600)  # a stalled client: only the disconnect message ends it

    async def receive():
        return {"type": "http.disconnect"}

    response = ClosingStream(body(), on_close, media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"spec_version": spec_version}, "method": "POST",
             "path": "/"}
    if spec_version == "2.4":
        with pytest.raises(ClientDisconnect):
            asyncio.run(response(scope, receive, send))
    else:
        asyncio.run(asyncio.wait_for(response(scope, receive, send), 10))
    assert started == [] and closed == [True]
