"""The OpenAI wire format both services share (`serving.openai_schema`): the documented
per-service differences of the chat request, and the model server's bodies read back by the
router's readers."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serving.generation import ModelServerError
from serving.model_routes import generation_params
from serving.openai_schema import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatRequestBase,
    ModelCard,
    ModelList,
    ModelServerChatRequest,
    SSEText,
    chat_completion,
    chunk_choice,
    completion_chunk,
    completion_text,
    error_content,
    sse_event,
    usage,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def test_both_requests_share_the_base():
    assert issubclass(ChatCompletionRequest, ChatRequestBase)
    assert issubclass(ModelServerChatRequest, ChatRequestBase)


@pytest.mark.parametrize("fields", [
    {"temperature": "0.5"},  # lax: a numeric string
    {"max_tokens": "12"},
    {"messages": [{"role": "wizard", "content": "x"}]},  # roles are checked at prompt time
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
    {"messages": []},  # a 400 from the model once the model id is resolved
    {"user": 5, "metadata": {"a": 1}},  # not declared: ignored
])
def test_the_router_rejects_what_the_model_server_takes_and_checks_later(fields):
    body = {"model": "m", "messages": MESSAGES, **fields}
    ModelServerChatRequest.model_validate(body)
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_ranges_are_schema_constraints_on_the_router_and_400s_on_the_model_server():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES,
                                              "temperature": 3})
    assert info.value.errors()[0]["loc"] == ("temperature",)
    lax = ModelServerChatRequest.model_validate({"model": "m", "messages": MESSAGES,
                                                 "temperature": 3})
    with pytest.raises(ModelServerError, match=r"temperature must be in \[0, 2\]"):
        generation_params(lax)
    # top_p 0 is in the router's [0, 1] but not in the local model's (0, 1].
    ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "top_p": 0})
    with pytest.raises(ModelServerError, match=r"top_p must be in \(0, 1\]"):
        generation_params(ModelServerChatRequest.model_validate(
            {"model": "m", "messages": MESSAGES, "top_p": 0}))


def test_the_router_passes_unknown_fields_through_and_takes_integral_floats():
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "max_tokens": 256.0, "n": "anything"})
    assert body.max_tokens == 256 and body.model_extra == {"n": "anything"}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES,
                                              "max_tokens": True})


def test_model_list_and_error_bodies_have_the_openai_shape():
    assert ModelList(data=[ModelCard(id="a")]).model_dump() == {
        "object": "list", "data": [{"id": "a", "object": "model", "created": 0,
                                    "owned_by": "tuneloop"}]}
    assert error_content("no", param="model", available=["a"]) == {"error": {
        "message": "no", "type": "invalid_request_error", "param": "model", "code": None,
        "available": ["a"]}}


def test_the_model_servers_bodies_are_read_back_by_the_routers_readers():
    ids = {"completion_id": "c", "created": 1, "model": "m", "fingerprint": "f"}
    whole = chat_completion(**ids, text="hello", finish_reason="stop", token_usage=usage(2, 3))
    assert completion_text(json.loads(json.dumps(whole))) == "hello"
    assert whole["usage"]["total_tokens"] == 5
    stream = "".join([
        sse_event(completion_chunk(**ids, choices=[chunk_choice({"role": "assistant",
                                                                 "content": ""})],
                                   include_usage=True)),
        sse_event(completion_chunk(**ids, choices=[chunk_choice({"content": "hé"})])),
        sse_event(completion_chunk(**ids, choices=[chunk_choice({"content": "llo"})])),
        sse_event(completion_chunk(**ids, choices=[], token_usage=usage(2, 3))),
        sse_event(SSE_DONE),
    ]).encode()
    reader = SSEText()
    for i in range(0, len(stream), 5):  # split anywhere, even inside a UTF-8 character
        reader.feed(stream[i:i + 5])
    assert reader.text == "héllo"
    first = json.loads(stream.split(b"\n\n")[0].removeprefix(b"data: "))
    assert "usage" in first and first["usage"] is None
    second = json.loads(stream.split(b"\n\n")[1].removeprefix(b"data: "))
    assert "usage" not in second
