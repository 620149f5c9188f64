"""The fake OpenAI-compatible server speaks the protocol the official client expects."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.fakes.fake_openai import FakeOpenAIServer

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "tell me about rivers"}]


def echo_upper(request: dict) -> str:
    """An importable responder for the subprocess test."""
    return request["messages"][-1]["content"].upper()


@pytest.fixture()
def sdk(fake_llm: FakeOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_llm.base_url, api_key="test", max_retries=0)


def test_models_endpoint_lists_model_ids() -> None:
    with FakeOpenAIServer(model_ids=("a-model", "b-model")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
        assert [m.id for m in client.models.list()] == ["a-model", "b-model"]


def test_default_reply_mirrors_the_last_user_message_with_word_usage(sdk, fake_llm) -> None:
    completion = sdk.chat.completions.create(model="fake-model", messages=MESSAGES)
    text = completion.choices[0].message.content
    assert text == "Fake reply from fake-model: you said tell me about rivers"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 6  # "be brief" + "tell me about rivers"
    assert completion.usage.completion_tokens == len(text.split())
    assert fake_llm.requests[0]["messages"] == MESSAGES
    assert fake_llm.stats()["ok"] == fake_llm.stats()["total"] == 1


def test_stream_deltas_join_to_the_plain_reply_and_end_with_done(sdk, fake_llm) -> None:
    plain = sdk.chat.completions.create(model="fake-model", messages=MESSAGES)
    chunks = list(sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens

    raw = httpx.post(f"{fake_llm.base_url}/chat/completions",
                     json={"model": "fake-model", "messages": MESSAGES, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_max_tokens_and_stop_shape_the_reply(sdk) -> None:
    cut = sdk.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
    assert cut.choices[0].message.content == "Fake reply from"
    assert cut.choices[0].finish_reason == "length"
    stopped = sdk.chat.completions.create(model="fake-model", messages=MESSAGES, stop=[" you"])
    assert stopped.choices[0].message.content == "Fake reply from fake-model:"
    assert stopped.choices[0].finish_reason == "stop"


def test_unknown_model_is_a_404(sdk) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.chat.completions.create(model="nope", messages=MESSAGES)


def test_rate_limit_fault_sends_retry_after() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("429",), retry_after_s=1.5) as server:
        response = httpx.post(f"{server.base_url}/chat/completions",
                              json={"model": "fake-model", "messages": MESSAGES})
        assert response.status_code == 429 and response.headers["retry-after"] == "1.5"
        assert server.stats()["429"] == 1


def test_malformed_fault_is_not_json_and_truncated_fault_is_cut() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("malformed",)) as server:
        response = httpx.post(f"{server.base_url}/chat/completions",
                              json={"model": "fake-model", "messages": MESSAGES})
        assert response.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.text)
    with FakeOpenAIServer(fault_rate=1.0, faults=("truncated",)) as server:
        body = httpx.post(f"{server.base_url}/chat/completions",
                          json={"model": "fake-model", "messages": MESSAGES}).json()
        full = "Fake reply from fake-model: you said tell me about rivers"
        assert body["choices"][0]["finish_reason"] == "length"
        assert full.startswith(body["choices"][0]["message"]["content"])
        assert len(body["choices"][0]["message"]["content"]) < len(full)


def test_hang_fault_outlasts_a_short_client_timeout() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("hang",), hang_s=5.0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0,
                               timeout=0.2)
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert server.stats()["hang"] == 1


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FakeOpenAIServer(faults=("teapot",))
    with pytest.raises(ValueError, match="fault_rate must be within"):
        FakeOpenAIServer(fault_rate=1.5)
    with pytest.raises(ValueError, match="import path"):
        FakeOpenAIServer(subprocess=True, responder=echo_upper)


def test_subprocess_mode_serves_an_imported_responder_and_reports_stats() -> None:
    with FakeOpenAIServer(subprocess=True, responder="tests.unit.core.test_llm_fake_server:echo_upper") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="t", max_retries=0)
        reply = client.chat.completions.create(
            model="fake-model", messages=MESSAGES, extra_headers={"X-Request-Id": "r-1"})
        assert reply.choices[0].message.content == "TELL ME ABOUT RIVERS"
        assert server.stats()["total"] == 1
        assert server.log[0]["request_id"] == "r-1"
        assert server.requests[0]["messages"] == MESSAGES
        server.reset()
        assert server.stats()["total"] == 0
