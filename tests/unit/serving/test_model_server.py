"""The local model server through the official `openai` client, with real SmolLM2 tokens.

One server per module (port 0) on one SmolLM2 load, with keys of its own; a LoRA adapter with
random non-zero weights is made from a copy of that model and saved under a temporary adapter root
(adapters a test must not see served by the root scan go to a `staging/` sub-folder, which only a
registration serves). Completions stay short (~15 tokens/s on 2 CPU cores). The batching tests drive `ChatModel.submit` directly with a long
batch window that closes when the batch is full, so which requests share a batch is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.batching import PREFILL_PADDING_SLACK, prefill_groups, stop_holdback
from serving.generation import GenerationParams, ModelServerError

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
ADAPTER = "random-lora"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
API_KEY = "test-model-server-key"
ADMIN_KEY = "test-model-server-admin-key"
KEYS = {"api_key": API_KEY, "admin_key": ADMIN_KEY}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


API = _bearer(API_KEY)
ADMIN = _bearer(ADMIN_KEY)


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def chat_model(adapter_root: Path):
    from serving.generation import ChatModel
    from tasks.core.weights import smollm2_path

    # float32: batched greedy output equals unbatched bit for bit only without bf16 rounding
    # (tests below); the bfloat16 path has its own tests at the end of this file.
    return ChatModel(smollm2_path(), model_name=BASE, adapter_roots=[adapter_root],
                     dtype="float32")


def _save_random_lora(model, folder: Path, *, r: int = 8) -> Path:
    """A LoRA adapter whose A and B are both random (init_lora_weights=False), so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1234)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapter_dir(chat_model, adapter_root: Path) -> Path:
    return _save_random_lora(chat_model.model, adapter_root / ADAPTER)


@pytest.fixture(scope="module")
def server_url(chat_model, adapter_dir: Path):
    from serving.model_server import running_model_server

    with running_model_server(port=0, chat_model=chat_model, **KEYS) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server_url: str):
    from openai import OpenAI

    with OpenAI(base_url=server_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def staging(adapter_root: Path, request) -> Iterator[Path]:
    """A folder inside the adapter root that the root scan does not serve (not an adapter)."""
    import shutil

    folder = adapter_root / "staging" / request.node.name[:60].replace("[", "-").strip("]")
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tasks.core.weights import smollm2_path

    return AutoTokenizer.from_pretrained(str(smollm2_path()))


def _greedy(client, model: str = BASE, messages=MESSAGES, **params):
    return client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          **{"max_tokens": 12, **params})


@pytest.fixture(scope="module")
def greedy_base(client):
    return _greedy(client)


def _root(server_url: str) -> str:
    return server_url.removesuffix("/v1")


# ---- completions ---------------------------------------------------------------------------------
def test_non_streaming_returns_real_text_and_token_usage(greedy_base, tokenizer):
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    choice = greedy_base.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert greedy_base.usage.prompt_tokens == len(prompt)
    # The reply's own tokens (plus an end-of-turn token when it stopped) are what was counted.
    reply_tokens = len(tokenizer(choice.message.content, add_special_tokens=False)["input_ids"])
    assert greedy_base.usage.completion_tokens in (reply_tokens, reply_tokens + 1)
    assert greedy_base.usage.total_tokens == len(prompt) + greedy_base.usage.completion_tokens
    assert greedy_base.model == BASE and greedy_base.object == "chat.completion"


def test_streaming_chunks_concatenate_to_the_non_streaming_greedy_reply(client, greedy_base):
    stream = client.chat.completions.create(
        model=BASE, messages=MESSAGES, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(content_chunks) > 1
    assert "".join(c.choices[0].delta.content for c in content_chunks) == \
        greedy_base.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == greedy_base.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == greedy_base.usage.model_dump()


def test_stream_without_include_usage_ends_with_done_and_no_usage_chunk(server_url):
    body = {"model": BASE, "messages": MESSAGES, "temperature": 0, "max_tokens": 3,
            "stream": True}
    with httpx.stream("POST", f"{server_url}/chat/completions", json=body, headers=API,
                      timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["choices"] for p in payloads)
    assert all("usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_reached_reports_length(client):
    response = _greedy(client, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured_like_max_tokens(client):
    response = client.chat.completions.create(model=BASE, messages=MESSAGES, temperature=0,
                                              max_completion_tokens=2)
    assert response.usage.completion_tokens == 2


def test_stop_string_cuts_the_text_and_reports_stop(client, greedy_base):
    full = greedy_base.choices[0].message.content
    words = full.split()
    assert len(words) >= 3, f"greedy reply too short to pick a stop word from: {full!r}"
    # A stop string spanning several tokens (a word, the space, part of the next word).
    start = full.index(words[len(words) // 2])
    stop = full[start: start + len(words[len(words) // 2]) + 3]
    expected = full[:start]
    response = _greedy(client, stop=[stop, "never-occurs-xyz"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in _greedy(client, stop=stop, stream=True) if c.choices
    )
    assert streamed == expected  # no part of the stop string leaks across token boundaries


def test_same_seed_reproduces_sampled_text_and_other_seeds_differ(client):
    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model=BASE, messages=MESSAGES, temperature=1.2, top_p=0.95, max_tokens=10, seed=seed,
        ).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_n_above_one_is_rejected_with_a_clear_400(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=MESSAGES, n=2, max_tokens=2)
    assert "n=2 is not supported" in str(info.value)


def test_out_of_range_temperature_is_a_400_naming_the_fix(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=MESSAGES, temperature=3,
                                       max_tokens=2)
    assert "temperature must be in [0, 2]" in str(info.value)


def test_text_content_parts_and_developer_role_are_accepted(client, greedy_base):
    response = _greedy(client, messages=[
        {"role": "user", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]},
    ])
    assert response.choices[0].message.content == greedy_base.choices[0].message.content
    with_developer = _greedy(client, max_tokens=2, messages=[
        {"role": "developer", "content": "Answer briefly."}, *MESSAGES,
    ])
    assert with_developer.usage.prompt_tokens != greedy_base.usage.prompt_tokens


# ---- models and adapters -------------------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == BASE
    assert f"{BASE}:{ADAPTER}" in ids
    assert client.models.retrieve(f"{BASE}:{ADAPTER}").id == f"{BASE}:{ADAPTER}"


def test_unknown_model_is_404_listing_available_models(client):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert BASE in str(info.value) and f"{BASE}:{ADAPTER}" in str(info.value)
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model=f"{BASE}:missing", messages=MESSAGES, max_tokens=2)


def test_adapter_by_name_changes_greedy_output_and_base_stays_unchanged(client, greedy_base):
    adapted = _greedy(client, model=f"{BASE}:{ADAPTER}")
    assert adapted.model == f"{BASE}:{ADAPTER}"
    assert adapted.choices[0].message.content != greedy_base.choices[0].message.content
    # Once an adapter is loaded, the base is served with adapters disabled: same text as before.
    assert _greedy(client).choices[0].message.content == greedy_base.choices[0].message.content


def test_adapter_registered_at_runtime_is_listed_and_served(client, server_url, adapter_dir):
    adapted = _greedy(client, model=f"{BASE}:{ADAPTER}", max_tokens=6)
    response = httpx.post(f"{server_url}/adapters", headers=ADMIN,
                          json={"name": "champion", "path": str(adapter_dir), "load": True},
                          timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == f"{BASE}:champion" and response.json()["loaded"] is True
    assert f"{BASE}:champion" in [m.id for m in client.models.list()]
    served = _greedy(client, model=f"{BASE}:champion", max_tokens=6)
    assert served.choices[0].message.content == adapted.choices[0].message.content
    deleted = httpx.delete(f"{server_url}/adapters/champion", headers=ADMIN, timeout=60)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert f"{BASE}:champion" not in [m.id for m in client.models.list()]


def test_adapter_rewritten_in_place_is_reloaded(client, adapter_root, adapter_dir):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    folder = adapter_root / "retrained"
    shutil.copytree(adapter_dir, folder)
    before = _greedy(client, model=f"{BASE}:retrained", max_tokens=6).choices[0].message.content
    weights_file = folder / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    # "Retrain": flip the sign of every LoRA B matrix, i.e. the adapter's delta, in place.
    save_file({k: -v if ".lora_B." in k else v for k, v in weights.items()}, str(weights_file))
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = _greedy(client, model=f"{BASE}:retrained", max_tokens=6).choices[0].message.content
    assert after != before


def test_adapter_that_fails_to_load_is_an_error_and_the_base_keeps_serving(
        client, adapter_root, adapter_dir, greedy_base):
    import shutil

    from openai import APIError, InternalServerError

    folder = adapter_root / "broken"
    shutil.copytree(adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]  # peft cannot inject it into the base model
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InternalServerError) as info:
        _greedy(client, model=f"{BASE}:broken", max_tokens=2)
    assert "could not be loaded" in str(info.value)
    # Streaming has already answered 200 when the worker fails: the error arrives as an event.
    with pytest.raises(APIError) as info:
        list(_greedy(client, model=f"{BASE}:broken", max_tokens=2, stream=True))
    assert "could not be loaded" in str(info.value)
    # Registered with load=true, the same failure is the admin call's answer, not a later user's.
    response = httpx.post(f"{client.base_url}adapters", timeout=60, headers=ADMIN,
                          json={"name": "broken2", "path": "broken", "load": True})
    assert response.status_code == 500 and "could not be loaded" in response.text
    assert f"{BASE}:broken2" not in [m.id for m in client.models.list()]
    assert _greedy(client).choices[0].message.content == greedy_base.choices[0].message.content


def test_truncated_adapter_weights_are_a_400(server_url, adapter_dir, staging):
    import shutil

    folder = staging / "truncated"
    shutil.copytree(adapter_dir, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    response = httpx.post(f"{server_url}/adapters", json={"name": "t", "path": str(folder)},
                          headers=ADMIN, timeout=30)
    assert response.status_code == 400
    assert "unreadable weights" in response.json()["error"]["message"]
    assert str(folder) not in response.text


def test_registering_a_folder_without_an_adapter_is_a_400(server_url, staging):
    response = httpx.post(f"{server_url}/adapters", headers=ADMIN, timeout=30,
                          json={"name": "x", "path": str(staging)})
    assert response.status_code == 400
    assert "adapter_config.json" in response.json()["error"]["message"]


def test_adapter_trained_on_another_base_model_is_rejected_with_the_reason(server_url, staging):
    from transformers import AutoModelForCausalLM

    from tasks.core.weights import tinycoder_path

    tiny = AutoModelForCausalLM.from_pretrained(str(tinycoder_path()))
    folder = _save_random_lora(tiny, staging / "tiny-lora", r=2)
    response = httpx.post(f"{server_url}/adapters", json={"name": "tiny", "path": str(folder)},
                          headers=ADMIN, timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "does not fit smollm2-135m-instruct" in message
    # peft records the folder the base was loaded from; only its name is shown.
    assert str(tinycoder_path()) not in message and tinycoder_path().name in message


# ---- keys ----------------------------------------------------------------------------------------
def _every_route(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, its path parameters filled in."""
    import re

    from starlette.routing import Route

    return [(method, re.sub(r"\{[^}]+\}", "x", route.path))
            for route in app.routes if isinstance(route, Route)
            for method in sorted(route.methods or ()) if method != "HEAD"]


def test_every_route_but_health_answers_401_without_the_key_or_with_a_wrong_one(
        server_url, chat_model):
    from serving.model_server import create_app

    routes = _every_route(create_app(chat_model=chat_model, **KEYS))
    assert ("POST", "/v1/adapters") in routes and ("GET", "/v1/status") in routes
    credentials = {"no key": {}, "wrong key": _bearer("not-the-key"),
                   "not bearer": {"Authorization": f"Basic {API_KEY}"}}
    answers = {}
    for method, path in routes:
        if path == "/health":
            continue
        for label, headers in credentials.items():
            response = httpx.request(method, f"{_root(server_url)}{path}", headers=headers,
                                     json={"model": BASE, "messages": MESSAGES}, timeout=10)
            answers[f"{label} {method} {path}"] = (
                response.status_code, response.json()["error"]["type"],
                response.headers.get("www-authenticate"))
    assert set(answers.values()) == {(401, "authentication_error", "Bearer")}, answers


def test_a_request_without_the_key_is_refused_before_its_body_is_read(server_url):
    response = httpx.post(f"{server_url}/adapters", content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 401


def test_the_openai_client_with_a_wrong_key_raises_authentication_error(server_url):
    from openai import AuthenticationError, OpenAI

    with OpenAI(base_url=server_url, api_key="wrong", max_retries=0) as wrong, \
            pytest.raises(AuthenticationError) as info:
        wrong.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=2)
    assert "TUNELOOP_MODEL_SERVER_API_KEY" in str(info.value)


def test_health_is_liveness_only_and_needs_no_key(server_url):
    response = httpx.get(f"{_root(server_url)}/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}  # no model, adapter or path


def test_status_shows_the_model_and_adapters_but_no_path(server_url, adapter_root, chat_model):
    response = httpx.get(f"{_root(server_url)}/v1/status", headers=API, timeout=10)
    assert response.status_code == 200
    assert response.json()["model"] == BASE and "loaded_adapters" in response.json()
    for secret_path in (adapter_root, chat_model.model_path, Path.home()):
        assert str(secret_path) not in response.text


def test_the_admin_key_also_passes_where_the_api_key_does(server_url):
    assert httpx.get(f"{server_url}/models", headers=ADMIN, timeout=10).status_code == 200


def test_equal_or_empty_keys_are_refused_with_the_fix(chat_model):
    from serving.model_server import create_app

    with pytest.raises(ValueError, match="give the admin key a value of its own"):
        create_app(chat_model=chat_model, api_key="same", admin_key="same")
    with pytest.raises(ValueError, match="TUNELOOP_MODEL_SERVER_API_KEY is empty"):
        create_app(chat_model=chat_model, api_key="", admin_key=ADMIN_KEY)


def _registered_names(server_url: str) -> list[str]:
    response = httpx.get(f"{server_url}/adapters", headers=API, timeout=10)
    return [a["name"] for a in response.json()["data"] if a["source"] == "registered"]


def test_the_api_key_cannot_register_or_remove_adapters(server_url, client):
    from openai import PermissionDeniedError

    with pytest.raises(PermissionDeniedError) as info:  # what the openai client makes of it
        client.post("/adapters", body={"name": "intruder", "path": ADAPTER}, cast_to=object)
    assert "TUNELOOP_MODEL_SERVER_ADMIN_KEY" in str(info.value)
    assert "intruder" not in _registered_names(server_url)
    registered = httpx.post(f"{server_url}/adapters", headers=ADMIN, timeout=60,
                            json={"name": "keeper", "path": ADAPTER})
    assert registered.status_code == 200, registered.text
    try:
        refused = httpx.delete(f"{server_url}/adapters/keeper", headers=API, timeout=10)
        assert refused.status_code == 403
        assert refused.json()["error"]["type"] == "permission_denied_error"
        assert "keeper" in _registered_names(server_url)
    finally:
        httpx.delete(f"{server_url}/adapters/keeper", headers=ADMIN, timeout=10)


# ---- adapter paths -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outside_adapter(adapter_dir: Path, tmp_path_factory) -> Path:
    """A valid adapter outside every adapter root: registering it would work but for the rule."""
    import shutil

    folder = tmp_path_factory.mktemp("outside") / "evil"
    shutil.copytree(adapter_dir, folder)
    return folder


@pytest.fixture
def escaping_link(adapter_root: Path, outside_adapter: Path) -> Iterator[str]:
    link = adapter_root / "escapee"
    link.symlink_to(outside_adapter, target_is_directory=True)
    yield link.name
    link.unlink()


@pytest.mark.parametrize("how", ["absolute /etc", "absolute outside", "../ escape",
                                 "symlink escape"])
def test_a_path_outside_the_adapter_roots_is_rejected_and_nothing_registered(
        how, server_url, client, adapter_root, outside_adapter, escaping_link):
    import os

    path = {"absolute /etc": "/etc", "absolute outside": str(outside_adapter),
            "../ escape": os.path.relpath(outside_adapter, adapter_root),
            "symlink escape": escaping_link}[how]
    response = httpx.post(f"{server_url}/adapters", headers=ADMIN, timeout=30,
                          json={"name": "smuggled", "path": path, "load": True})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "path" and error["code"] == "path_outside_adapter_roots"
    assert "adapter roots" in error["message"] and "--adapter-root" in error["message"]
    assert str(outside_adapter) not in response.text and str(adapter_root) not in response.text
    assert "smuggled" not in _registered_names(server_url)
    assert f"{BASE}:smuggled" not in [m.id for m in client.models.list()]


def test_a_root_entry_whose_symlink_escapes_the_root_is_not_served(client, adapter_root,
                                                                   adapter_dir, escaping_link):
    from openai import NotFoundError

    inner_link = adapter_root / "alias-inside"
    inner_link.symlink_to(adapter_dir, target_is_directory=True)
    try:
        ids = [m.id for m in client.models.list()]
        assert f"{BASE}:{escaping_link}" not in ids
        assert f"{BASE}:alias-inside" in ids  # a link that stays inside its root is fine
        with pytest.raises(NotFoundError):
            client.chat.completions.create(model=f"{BASE}:{escaping_link}", messages=MESSAGES,
                                           max_tokens=2)
    finally:
        inner_link.unlink()


def test_an_adapter_registered_by_its_path_in_the_root_is_shown_without_absolute_paths(
        server_url, client, adapter_root, adapter_dir, staging):
    import shutil

    shutil.copytree(adapter_dir, staging / "run-12")
    relative = (staging / "run-12").relative_to(adapter_root).as_posix()
    response = httpx.post(f"{server_url}/adapters", headers=ADMIN, timeout=60,
                          json={"name": "staged", "path": relative})
    try:
        assert response.status_code == 200, response.text
        assert response.json()["path"] == relative
        assert f"{BASE}:staged" in [m.id for m in client.models.list()]
        listing = httpx.get(f"{server_url}/adapters", headers=API, timeout=10)
        for body in (response.text, listing.text):
            assert str(adapter_root) not in body and str(Path.home()) not in body
        assert {a["path"] for a in listing.json()["data"]} >= {relative, ADAPTER}
    finally:
        httpx.delete(f"{server_url}/adapters/staged", headers=ADMIN, timeout=10)


def test_an_invalid_adapter_name_is_a_400_naming_the_field(server_url):
    response = httpx.post(f"{server_url}/adapters", headers=ADMIN, timeout=10,
                          json={"name": "../champion", "path": ADAPTER})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "name"


# ---- serving behaviour ---------------------------------------------------------------------------
def _status(server_url: str) -> dict:
    response = httpx.get(f"{_root(server_url)}/v1/status", headers=API, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_until_idle(server_url: str, timeout_s: float = 60) -> dict:
    """Wait for queued/cancelled generations of earlier tests to finish; returns /v1/status."""
    deadline = time.monotonic() + timeout_s
    while (status := _status(server_url))["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def test_event_loop_stays_responsive_while_generating(client, server_url):
    stream = client.chat.completions.create(
        model=BASE, temperature=0, max_tokens=48, stream=True,
        messages=[{"role": "user", "content": "Write a long story about a dragon and a knight."}],
    )
    try:
        next(c for c in stream if c.choices and c.choices[0].delta.content)
        status = _status(server_url)
        # The generation is still running on the worker thread, yet /v1/status answered.
        assert status["status"] == "ok" and status["pending"] == 1
    finally:
        stream.close()
        _wait_until_idle(server_url)


def test_client_disconnect_cancels_the_generation(client, server_url):
    def stats() -> dict:
        return _status(server_url)["stats"]

    before = _wait_until_idle(server_url)["stats"]["cancelled"]
    stream = client.chat.completions.create(
        model=BASE, temperature=0, max_tokens=400, stream=True,
        messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
    )
    next(c for c in stream if c.choices and c.choices[0].delta.content)
    stream.close()
    deadline = time.monotonic() + 60
    while stats()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    after = stats()
    assert after["cancelled"] == before + 1
    assert _wait_until_idle(server_url)["pending"] == 0


def test_full_queue_answers_503_with_retry_after(chat_model):
    from openai import OpenAI

    from serving.model_server import running_model_server

    with running_model_server(port=0, chat_model=chat_model, max_pending=1, **KEYS) as url, \
            OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120) as small_client:
        stream = small_client.chat.completions.create(
            model=BASE, temperature=0, max_tokens=48, stream=True,
            messages=[{"role": "user", "content": "Write a long story about a dragon and a knight."}],
        )
        try:
            next(c for c in stream if c.choices and c.choices[0].delta.content)
            busy = httpx.post(f"{url}/chat/completions", timeout=30, headers=API,
                              json={"model": BASE, "messages": MESSAGES, "max_tokens": 2})
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "2"
            assert "already queued" in busy.json()["error"]["message"]
        finally:
            stream.close()
            _wait_until_idle(url)


def test_concurrent_requests_queue_and_all_complete(client, greedy_base):
    results: list[str] = []

    def call() -> None:
        results.append(_greedy(client).choices[0].message.content)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [greedy_base.choices[0].message.content] * 3


def test_startup_failure_names_the_cause(tmp_path):
    from serving.model_server import running_model_server

    with pytest.raises(ModelServerError) as info:
        with running_model_server(port=0, model_path=tmp_path / "no-model"):
            pass
    assert "did not start" in str(info.value) and "no-model" in str(info.value)


# ---- pure helpers --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "stops", "held"), [
    ("Hello wor", ["world"], 3),
    ("Hello", ["world"], 0),
    ("ab\n", ["\n\n", "xyz"], 1),
    ("abc", [], 0),
    ("the end", ["end"], 0),  # a complete stop is cut, not held back
])
def test_stop_holdback_keeps_possible_stop_prefixes(text, stops, held):
    assert stop_holdback(text, stops) == held


@pytest.mark.parametrize(("params", "message"), [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
])
def test_generation_params_errors_say_the_fix(params, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        GenerationParams(**params)
    assert message in str(info.value)


# ---- dynamic batching ----------------------------------------------------------------------------
PROMPTS = [  # different lengths, so rows are left-padded differently
    [{"role": "user", "content": "Hi"}],
    MESSAGES,
    [{"role": "system", "content": "You are a patient teacher who explains things step by step."},
     {"role": "user", "content": "Explain why the sky is blue, and why sunsets are red, to a "
                                 "ten year old who loves football and dinosaurs."}],
    [{"role": "user", "content": "What is 2+2? Answer with the number only."}],
]


@contextlib.contextmanager
def _batching(chat_model, **options):
    before = {"max_batch_size": chat_model.max_batch_size,
              "batch_window_ms": chat_model.batch_window_ms}
    chat_model.configure_batching(**options)
    try:
        yield
    finally:
        chat_model.configure_batching(**before)


def _drain(events: queue.SimpleQueue):
    """Join one submitted request's events into (text, finish_reason, completion_tokens)."""
    parts = []
    while True:
        item = events.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        parts.append(item.delta)
        if item.finish_reason is not None:
            return "".join(parts), item.finish_reason, item.completion_tokens


def _stats_delta(chat_model, before: dict) -> dict:
    return {key: chat_model.stats[key] - before[key] for key in before}


def _in_one_batch_each(chat_model, prepared: list, *, per_batch: int | None = None):
    """Submit all at once; the batch window only closes when `per_batch` requests are queued."""
    before = dict(chat_model.stats)
    queues = [queue.SimpleQueue() for _ in prepared]
    with _batching(chat_model, max_batch_size=per_batch or len(prepared), batch_window_ms=10_000):
        for request, events in zip(prepared, queues, strict=True):
            chat_model.submit(request, events.put)
        results = [_drain(events) for events in queues]
    return results, _stats_delta(chat_model, before)


def _solo(chat_model, request):
    completion = chat_model.generate(request)  # nothing else queued: a batch of one
    return completion.text, completion.finish_reason, completion.completion_tokens


def _prepare(chat_model, messages, model: str = BASE, **params):
    return chat_model.prepare(model, messages, GenerationParams(**{"temperature": 0,
                                                                   "max_tokens": 8, **params}))


@pytest.fixture(scope="module")
def solo_greedy(chat_model, server_url):
    _wait_until_idle(server_url)
    return [_solo(chat_model, _prepare(chat_model, messages)) for messages in PROMPTS]


def test_batched_greedy_equals_unbatched_greedy_for_prompts_of_different_lengths(
        chat_model, solo_greedy):
    requests = [_prepare(chat_model, m) for m in PROMPTS]
    lengths = [r.prompt_tokens for r in requests]
    assert len(set(lengths)) == len(PROMPTS)
    # The longest prompt pads the others; the shortest is prefilled apart and spliced in.
    assert len(prefill_groups(lengths, PREFILL_PADDING_SLACK)) == 2
    results, delta = _in_one_batch_each(chat_model, requests)
    assert results == solo_greedy
    assert delta["batches"] == 1 and delta["requests"] == len(PROMPTS)
    assert delta["prefills"] == 2
    assert delta["decode_rows"] > delta["decode_steps"]  # the rows really shared forward passes


def test_requests_joining_a_running_batch_match_their_unbatched_output(chat_model, solo_greedy):
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    running = _prepare(chat_model, story, max_tokens=20)
    running_solo = _solo(chat_model, running)
    before = dict(chat_model.stats)
    running_events: queue.SimpleQueue = queue.SimpleQueue()
    chat_model.submit(running, running_events.put)
    first = running_events.get(timeout=120)  # the batch is decoding now
    # Shorter and longer than the running batch's cache, so either side gets padded on splicing.
    joiners = [_prepare(chat_model, m) for m in PROMPTS]
    queues = [queue.SimpleQueue() for _ in joiners]
    for request, events in zip(joiners, queues, strict=True):
        chat_model.submit(request, events.put)
    assert [_drain(events) for events in queues] == solo_greedy
    text, finish, tokens = _drain(running_events)
    assert (first.delta + text, finish, tokens) == running_solo
    delta = _stats_delta(chat_model, before)
    assert delta["batches"] == 1 and delta["joined"] == len(joiners)


def test_each_row_keeps_its_own_max_tokens_and_stop_strings(chat_model, solo_greedy):
    full_text = solo_greedy[1][0]
    words = full_text.split()
    assert len(words) >= 3, f"greedy reply too short to pick a stop word from: {full_text!r}"
    stop = words[len(words) // 2]
    results, delta = _in_one_batch_each(chat_model, [
        _prepare(chat_model, PROMPTS[1], max_tokens=2),
        _prepare(chat_model, PROMPTS[1], stop=[stop]),
        _prepare(chat_model, PROMPTS[1], max_tokens=5, stop=["never-occurs-xyz"]),
        _prepare(chat_model, PROMPTS[2]),
    ])
    short, stopped, five, untouched = results
    assert short[1:] == ("length", 2) and full_text.startswith(short[0])
    assert stopped[0] == full_text[:full_text.index(stop)] and stopped[1] == "stop"
    assert five[1:] == ("length", 5) and full_text.startswith(five[0])
    assert untouched == solo_greedy[2]  # rows leaving the batch did not disturb the others
    assert delta["batches"] == 1


def test_seeded_sampling_in_a_batch_is_reproducible_and_matches_solo(chat_model):
    sampled = {"temperature": 1.2, "top_p": 0.95, "max_tokens": 10}
    requests = [
        _prepare(chat_model, PROMPTS[1], **sampled, seed=7),
        _prepare(chat_model, PROMPTS[1], **sampled, seed=8),
        _prepare(chat_model, PROMPTS[2], max_tokens=10),
        _prepare(chat_model, PROMPTS[2], **sampled, seed=7),
    ]
    first, _ = _in_one_batch_each(chat_model, requests)
    second, _ = _in_one_batch_each(chat_model, requests)
    assert first == second
    assert first[0][0] != first[1][0]  # each row samples from its own generator
    for index in (0, 3):  # a seed gives the same text whatever shares the batch
        assert first[index] == _solo(chat_model, requests[index])


def test_base_and_adapter_requests_batch_by_model_and_get_their_own_output(
        chat_model, adapter_dir, solo_greedy):
    adapter_model = f"{BASE}:{ADAPTER}"
    adapter_solo = [_solo(chat_model, _prepare(chat_model, PROMPTS[i], model=adapter_model))
                    for i in (1, 2)]
    requests = [_prepare(chat_model, PROMPTS[1]),
                _prepare(chat_model, PROMPTS[1], model=adapter_model),
                _prepare(chat_model, PROMPTS[2]),
                _prepare(chat_model, PROMPTS[2], model=adapter_model)]
    results, delta = _in_one_batch_each(chat_model, requests, per_batch=2)
    assert delta["batches"] == 2  # one batch per model id, never mixed
    assert [results[0], results[2]] == [solo_greedy[1], solo_greedy[2]]
    assert [results[1], results[3]] == adapter_solo
    assert adapter_solo[0][0] != solo_greedy[1][0]


def test_disconnecting_one_stream_leaves_its_batch_mates_intact(client, server_url, greedy_base):
    before = _wait_until_idle(server_url)["stats"]
    stream = client.chat.completions.create(
        model=BASE, temperature=0, max_tokens=200, stream=True,
        messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
    )
    next(c for c in stream if c.choices and c.choices[0].delta.content)
    results: list[str] = []
    mate = threading.Thread(target=lambda: results.append(
        _greedy(client).choices[0].message.content))
    mate.start()
    deadline = time.monotonic() + 60
    while _status(server_url)["batching"]["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stream.close()
    mate.join(timeout=120)
    after = _wait_until_idle(server_url)["stats"]
    assert results == [greedy_base.choices[0].message.content]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["joined"] >= before["joined"] + 1


def test_status_reports_the_batching_options(server_url):
    batching = _status(server_url)["batching"]
    assert batching["max_batch_size"] == 8 and batching["batch_window_ms"] == 5.0
    assert batching["queued"] == 0


def test_out_of_range_batching_options_are_rejected_with_the_fix(chat_model):
    from serving.model_server import create_app, main

    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        chat_model.configure_batching(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_window_ms must be in"):
        create_app(chat_model=chat_model, batch_window_ms=-1)
    with pytest.raises(SystemExit):
        main(["--max-batch-size", "0"])
    assert chat_model.max_batch_size == 8


@pytest.mark.parametrize(("lengths", "groups"), [
    ([40, 38, 42], [[2, 0, 1]]),  # similar lengths: one padded prefill
    ([50, 500, 45, 48], [[1], [0, 3, 2]]),  # one long prompt would triple the padded work
    ([], []),
])
def test_prefill_groups_bound_padding(lengths, groups):
    assert prefill_groups(lengths, PREFILL_PADDING_SLACK) == groups


def test_sigterm_stops_a_busy_server_within_the_grace_period(tmp_path):
    """A server stopped mid-generation cancels its work instead of decoding a queue no one reads."""
    import signal
    import socket
    import subprocess
    import sys

    from serving.model_server import GRACEFUL_SHUTDOWN_S

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    import os

    # The keys reach `python -m serving.model_server` through its settings, as in production.
    env = {**os.environ, "TUNELOOP_MODEL_SERVER_API_KEY": API_KEY,
           "TUNELOOP_MODEL_SERVER_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "serving.model_server", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "the model server exited during startup"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the model server did not start"
            time.sleep(0.3)

        def long_request() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/v1/chat/completions", timeout=300, headers=API, json={
                    "model": BASE, "max_tokens": 4000, "temperature": 1.0, "seed": 1,
                    "messages": [{"role": "user", "content": "Write a very long story."}]})

        workers = [threading.Thread(target=long_request, daemon=True) for _ in range(4)]
        for worker in workers:
            worker.start()
        while _status(url)["pending"] < 4:
            time.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=GRACEFUL_SHUTDOWN_S + 20)
        assert time.monotonic() - started < GRACEFUL_SHUTDOWN_S + 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- compute dtype ------------------------------------------------------------------------------


def test_auto_dtype_follows_the_cpu_and_names_are_validated(monkeypatch):
    import torch

    from tasks.core import weights as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("auto") is torch.float32
    assert models.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="TUNELOOP_MODEL_DTYPE=float32"):
        models.resolve_dtype("float16")


def test_bfloat16_model_chats_and_serves_an_adapter(adapter_root, adapter_dir, chat_model):
    """bf16 (the default where the CPU has it): coherent greedy text, a fingerprint of its own,
    and a float32 LoRA adapter applied on the bf16 base changes the output."""
    from serving.generation import ChatModel
    from tasks.core.weights import smollm2_path

    bf16 = ChatModel(smollm2_path(), model_name=BASE, adapter_roots=[adapter_root],
                     dtype="bfloat16")
    try:
        assert bf16.batching_info()["dtype"] == "bfloat16"
        assert bf16.fingerprint != chat_model.fingerprint
        paris = bf16.complete(BASE, [{"role": "user", "content": "What is the capital of France?"}],
                              temperature=0, max_tokens=12)
        assert "Paris" in paris.text
        base = bf16.complete(BASE, MESSAGES, temperature=0, max_tokens=12)
        tuned = bf16.complete(f"{BASE}:{adapter_dir.name}", MESSAGES, temperature=0,
                              max_tokens=12)
        assert tuned.text and tuned.text != base.text
        assert bf16.complete(BASE, MESSAGES, temperature=0, max_tokens=12).text == base.text
    finally:
        bf16.close()
