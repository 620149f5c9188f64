"""The public records and errors of chat generation, shared by `ChatModel` and the HTTP server.

`ModelServerError` is a request the server cannot serve (with the HTTP status, the offending field
and what to change); `GenerationParams` holds one request's OpenAI-style sampling parameters and
validates them; `PreparedChat` is a validated request ready to queue; `StreamEvent` is one piece of
generated text (the last one carries the finish reason and token counts), `Completion` a whole
answer and `AdapterInfo` describes one servable LoRA adapter. These are plain data: the model, the
adapters and the batching engine live in `serving.generation`, `serving.adapters` and
`serving.batching`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

FinishReason = Literal["stop", "length", "cancelled"]

MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 512


class ModelServerError(Exception):
    """A request the model server cannot serve, with the HTTP status and what to change.

    `status_code` is the HTTP status the server answers with (400 bad parameter, 404 unknown
    model or adapter, 503 busy); `param` names the offending request field; `available` lists the
    model ids that can be asked for when the model was the problem.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        param: str | None = None,
        code: str | None = None,
        available: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.available = list(available)


class GenerationParams(BaseModel):
    """Sampling parameters of one request (OpenAI names and defaults)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be >= 1, got {value}; e.g. max_tokens: 64")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not 0.0 <= value <= 2.0:
            raise ValueError(
                f"temperature must be in [0, 2], got {value}; use 0 for greedy or e.g. 0.7"
            )
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {value}; e.g. top_p: 0.9")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError('stop must be a string or a list of strings; e.g. stop: ["\\n\\n"]')
        stops = [s for s in value if s]
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}"
            )
        return stops


@dataclass(frozen=True)
class PreparedChat:
    """A validated request: the resolved adapter, the prompt token ids and the token budget."""

    model_id: str
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    params: GenerationParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class StreamEvent:
    """A piece of generated text; the last event also carries finish_reason and token counts."""

    delta: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_id: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class AdapterInfo:
    """One servable adapter. `path` is the resolved folder, for the server's own use;
    `location` is that folder relative to its adapter root, what responses show."""

    name: str
    path: Path
    source: Literal["registered", "root"]
    location: str = ""
    loaded: bool = False
    details: dict[str, Any] = field(default_factory=dict)

