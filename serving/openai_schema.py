"""The OpenAI wire format as the router speaks it: the chat completion request it validates
(strict, unknown fields passed through), the model list it answers, the OpenAI-shaped error
body (`error_response`, and `_ERRORS` for the OpenAPI document), and the readers of backend
answers: `completion_text` for a JSON completion and `SSEText` for a streamed one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema counts 256.0 as an integer; strict pydantic would not. Bools and strings
    # still fail the strict int check.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_float_to_int)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatCompletionRequest(BaseModel):
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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tuneloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, message: str, *, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error body: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
        headers=dict(headers or {}),
    )


_ERRORS = {
    400: {"model": ErrorResponse, "description": "the body is not valid JSON, or a backend "
          "rejected the request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    422: {"model": ErrorResponse, "description": "a field is invalid (`param` names it)"},
    429: {"model": ErrorResponse, "description": "rate limited; see Retry-After"},
}


def completion_text(data: Any) -> str:
    """The first choice's message content of a chat completion body ('' when absent)."""
    try:
        content = data["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


class SSEText:
    """Accumulates `choices[0].delta.content` from raw SSE bytes as they pass through."""

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
            if not data or data == b"[DONE]":
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
