"""The OpenAI wire format, as both services speak it: one definition of each body.

Requests (`POST /v1/chat/completions`): `ChatMessageBase` and `ChatRequestBase` are what the two
services share (a role and content per message, a model and a message list per request; fields
not declared are kept). Each service validates its own subclass, and they differ on purpose:

- the router (`ChatMessage`, `ChatCompletionRequest`) is strict and answers 422 before anything
  is forwarded: the types its OpenAPI document advertises are the types accepted (no `false` as
  0.0, no "12" as 12; only an integral float such as 256.0 passes for `max_tokens`, see
  `JsonInt`); ranges are schema constraints (temperature [0, 2], top_p [0, 1], max_tokens
  [1, 32768]); roles are OpenAI's five and content must be a string; `model` has at most 300
  characters and `messages` at least one item; it knows `user` (the sticky routing key, at most
  256 characters) and `metadata` (strings, logged). Every other field (stop, n, seed, ...) is
  passed through unvalidated: the backend judges it. How many messages and how long each may be
  is the router's configuration, checked after the schema (`message_limit_errors`, a 422 in the
  same shape) and advertised in its OpenAPI document.
- the model server (`ModelServerChatRequest`, messages are `ChatMessageBase`) coerces like
  pydantic's lax mode ("0.5" is a temperature, "12" a max_tokens) and answers 400: a wrong type
  is "invalid request body at <field>: ...", while ranges (temperature [0, 2], top_p (0, 1],
  max_tokens >= 1, at most 4 stop strings) are checked afterwards by
  `serving.chat_types.GenerationParams` with a message saying the fix; it declares what the
  local model honours or must refuse (max_completion_tokens, stop, seed, n, stream_options,
  logprobs) and takes any role and content parts, which it checks itself when it builds the
  prompt (400 naming `messages`), so an empty message list or an unknown role is a 400 raised
  after the model id was resolved (an unknown model is a 404 first). `user` and `metadata` are
  ignored.

The field order of each subclass is the order it reports errors in (the first error is the one
answered), which is why the base holds only the fields both services put first.

Responses: `ModelCard` / `ModelList` (`GET /v1/models`, both services), the error envelope
(`ErrorBody`, `ErrorResponse`, `error_content`, `error_response`; the model server adds
`available` model ids to a 404), and the chat completion, its streamed chunks and usage
(`ChatCompletion`, `ChatCompletionChunk`, `Usage`: built by the model server, read back by the
router with `completion_text` and `SSEText`), framed as SSE events by `sse_event` and `SSE_DONE`;
`stored_completion` is the router's answer to a replayed request, rebuilt from the stored one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Generic, Literal, NotRequired, TypedDict, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

OWNER = "tuneloop"  # `owned_by` of every model id either service lists


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema counts 256.0 as an integer; strict pydantic would not. Bools and strings
    # still fail the strict int check.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_float_to_int)]


# ---- chat requests -----------------------------------------------------------------------------
# Docstrings of these models are the `description` of their schemas in the services' OpenAPI
# documents: the router's models keep the ones they had, so its document does not change.
class ChatMessageBase(BaseModel):
    # One chat message: a role and its content (a string, OpenAI content parts, or none); other
    # fields (name, tool_calls, ...) are kept. The model server takes it as it is.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


MessageT = TypeVar("MessageT", bound=ChatMessageBase)


class ChatRequestBase(BaseModel, Generic[MessageT]):
    """The OpenAI chat request as both services read it: the model id and the conversation;
    fields not declared are kept (the router forwards them, the model server ignores them)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[MessageT]


class ChatMessage(ChatMessageBase):
    # The router's message: strict, one of OpenAI's roles, string content (always sent).
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(ChatRequestBase[ChatMessage]):
    """The OpenAI chat request; fields not listed here are passed through to the backend.

    Strict: the types the schema advertises are the types accepted (no `false` as 0.0).
    """

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(max_length=300)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: Annotated[int, Field(ge=1, le=32768),
                          BeforeValidator(_integral_float_to_int)] | None = None
    metadata: dict[str, str] | None = None


def message_limit_errors(request: ChatCompletionRequest, *, max_messages: int,
                         max_content_chars: int) -> list[dict[str, Any]]:
    """Pydantic-shaped errors (loc, msg, type) for a request over the router's configured
    limits: more than `max_messages` messages, or a message longer than `max_content_chars`."""
    count = len(request.messages)
    if count > max_messages:
        return [{"type": "too_long", "loc": ("body", "messages"),
                 "msg": f"List should have at most {max_messages} items (the router's limit, "
                        f"TUNELOOP_ROUTER_MAX_MESSAGES), got {count}",
                 "input": None, "ctx": {"max_length": max_messages, "actual_length": count}}]
    for index, message in enumerate(request.messages):
        length = len(message.content)
        if length > max_content_chars:
            return [{"type": "string_too_long", "loc": ("body", "messages", index, "content"),
                     "msg": f"String should have at most {max_content_chars} characters (the "
                            f"router's limit, TUNELOOP_ROUTER_MAX_CONTENT_CHARS), got {length}",
                     "input": None, "ctx": {"max_length": max_content_chars}}]
    return []


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ModelServerChatRequest(ChatRequestBase[ChatMessageBase]):
    """The OpenAI chat-completions body; fields the local model cannot honour are rejected."""

    # Lax types; what the local model cannot honour is declared so that it can be refused
    # (n > 1, logprobs) rather than silently ignored.

    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None


# ---- GET /v1/models ------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNER


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- errors ------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    # {"error": {"message", "type", "param", "code"}}, which the official client raises from. The
    # router's 422 adds "detail" (pydantic's error list) beside "error"; the model server's 404
    # for a model adds "available" (the ids it serves) inside it.
    error: ErrorBody


def error_content(message: str, *, type_: str = "invalid_request_error",
                  param: str | None = None, code: str | None = None,
                  **extra: Any) -> dict[str, Any]:
    """An OpenAI error body as a dict; `extra` fields follow the four standard ones."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def error_response(status: int, message: str, *, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """`error_content` answered with `status` (and `headers`)."""
    return JSONResponse(status_code=status,
                        content=error_content(message, type_=type_, param=param, code=code),
                        headers=dict(headers or {}))


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {  # for the router's OpenAPI `responses`
    400: {"model": ErrorResponse, "description": "the body is not valid JSON, or a backend "
          "rejected the request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    403: {"model": ErrorResponse, "description": "a valid key that does not open this route "
          "(the admin key on a client route, a client key on a control route)"},
    413: {"model": ErrorResponse, "description": "the body is larger than the router accepts"},
    422: {"model": ErrorResponse, "description": "a field is invalid (`param` names it)"},
    429: {"model": ErrorResponse, "description": "rate limited; see Retry-After"},
}


# ---- chat completions and their streamed chunks ------------------------------------------------
# TypedDicts rather than models: the model server builds one per generated piece of text and
# the router reads backends' answers, which may carry more (or fewer) fields.
class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class CompletionChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ChunkDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str


class ChunkChoice(TypedDict):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: NotRequired[Usage | None]  # sent only when stream_options.include_usage


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(*, completion_id: str, created: int, model: str, fingerprint: str,
                    text: str, finish_reason: str | None, token_usage: Usage) -> ChatCompletion:
    """A whole (one-choice) chat completion."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": token_usage,
    }


def stored_completion(*, interaction_id: str, created: int, model: str,
                      text: str) -> dict[str, Any]:
    """A stored answer as a (one-choice) chat completion, for a replayed request: the text as it
    was served, no token usage (not stored), and the interaction id the first answer carried."""
    return {
        "id": f"chatcmpl-{interaction_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": None,
        "interaction_id": interaction_id,
    }


def completion_chunk(*, completion_id: str, created: int, model: str, fingerprint: str,
                     choices: list[ChunkChoice], include_usage: bool = False,
                     token_usage: Usage | None = None) -> ChatCompletionChunk:
    """One streamed chunk; `usage` is present (null until the last chunk) when the client
    asked for it, and always when `token_usage` is given."""
    chunk: ChatCompletionChunk = {
        "id": completion_id, "object": "chat.completion.chunk", "created": created,
        "model": model, "system_fingerprint": fingerprint, "choices": choices,
    }
    if include_usage or token_usage is not None:
        chunk["usage"] = token_usage
    return chunk


def chunk_choice(delta: ChunkDelta, finish_reason: str | None = None) -> ChunkChoice:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


SSE_DONE = "[DONE]"  # the data of a stream's last event


def sse_event(payload: Mapping[str, Any] | str) -> str:
    """One Server-Sent Event: `data: <JSON or SSE_DONE>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def completion_text(data: Any) -> str:
    """The first choice's message content of a chat completion body ('' when absent)."""
    try:
        content = data["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


class SSEText:
    """Accumulates `choices[0].delta.content` from raw SSE bytes as they pass through."""

    _DONE = SSE_DONE.encode()

    def __init__(self) -> None:
        self._buffer = b""
        self.parts: list[str] = []

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if not data or data == self._DONE:
                continue
            try:
                delta = json.loads(data)["choices"][0]["delta"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                self.parts.append(content)

    @property
    def text(self) -> str:
        return "".join(self.parts)
