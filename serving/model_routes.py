"""The model server's HTTP layer: request bodies, OpenAI-shaped responses and the route handlers.

`add_routes(app)` registers the handlers (and the OpenAI-style error handlers) on the app that
`serving.model_server.create_app` builds; each handler finds the loaded model through the
`ModelRuntime` that the app's lifespan stores in `app.state.runtime`. Generation itself runs on
the model's scheduler thread (`ModelRuntime.start`), so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from serving.generation import (
    ChatModel,
    Completion,
    GenerationParams,
    ModelServerError,
    PreparedChat,
    StreamEvent,
)

log = logging.getLogger(__name__)

OWNER = "tuneloop"


# ---- request bodies ------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions body; fields the local model cannot honour are rejected."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage]
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

    def generation_params(self) -> GenerationParams:
        if self.n not in (None, 1):
            raise ModelServerError(
                f"n={self.n} is not supported: the local model server returns one choice per "
                "request; send n=1 (or omit it) and repeat the request with different seeds",
                param="n",
            )
        if self.logprobs:
            raise ModelServerError("logprobs are not supported by the local model server; "
                                   "omit logprobs", param="logprobs")
        values: dict[str, Any] = {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "stop": self.stop,
            "seed": self.seed,
        }
        if self.temperature is not None:
            values["temperature"] = self.temperature
        if self.top_p is not None:
            values["top_p"] = self.top_p
        try:
            return GenerationParams(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ModelServerError(str(first["msg"]).removeprefix("Value error, "),
                                   param=str(first["loc"][0]) if first["loc"] else None) from None


class AdapterRegistration(BaseModel):
    name: str
    path: str
    load: bool = False


# ---- responses -----------------------------------------------------------------------------------
def _error_body(exc: ModelServerError) -> dict[str, Any]:
    kind = {404: "not_found_error", 503: "server_busy"}.get(exc.status_code,
                                                             "invalid_request_error")
    if exc.status_code >= 500 and exc.status_code != 503:
        kind = "server_error"
    error: dict[str, Any] = {"message": exc.message, "type": kind, "param": exc.param,
                             "code": exc.code}
    if exc.available:
        error["available"] = exc.available
    return {"error": error}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _openai_finish(reason: str | None) -> str | None:
    # "cancelled" only happens when the client has gone; report it as a stop if anyone listens.
    return "stop" if reason == "cancelled" else reason


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class ModelRuntime:
    """The loaded model and the accounting of requests handed to its scheduler."""

    def __init__(self, chat_model: ChatModel, max_pending: int) -> None:
        self.chat_model = chat_model
        self.max_pending = max_pending
        self.pending = 0  # chat requests queued or decoding; only touched on the event loop

    def admit(self) -> None:
        if self.pending >= self.max_pending:
            raise ModelServerError(
                f"{self.pending} requests are already queued for the local model; retry shortly "
                "or lower the client's concurrency", status_code=503, code="server_busy",
            )

    def start(self, prepared: PreparedChat,
              cancel: threading.Event) -> asyncio.Queue[StreamEvent | BaseException]:
        """Hand `prepared` to the model's scheduler; its events (or its error) arrive in the
        returned queue. `pending` counts the request until its last event or error."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()

        def deliver(item: StreamEvent | BaseException) -> None:
            events.put_nowait(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                self.pending -= 1

        def sink(item: StreamEvent | BaseException) -> None:
            # Raises RuntimeError once the loop is closed: the scheduler then cancels the request.
            loop.call_soon_threadsafe(deliver, item)

        self.chat_model.submit(prepared, sink, cancel)
        self.pending += 1
        return events


# ---- route handlers ------------------------------------------------------------------------------
def _runtime_of(request: Request) -> ModelRuntime:
    return request.app.state.runtime


async def _model_server_error(request: Request, exc: ModelServerError) -> JSONResponse:
    headers = {"Retry-After": "2"} if exc.status_code == 503 else None
    return JSONResponse(_error_body(exc), status_code=exc.status_code, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = f"invalid request body at {'.'.join(loc) or 'body'}: {first.get('msg')}"
    return JSONResponse(
        _error_body(ModelServerError(message, param=".".join(loc) or None)), status_code=400
    )


async def health(request: Request) -> dict[str, Any]:
    runtime = _runtime_of(request)
    model = runtime.chat_model
    return {
        "status": "ok",
        "model": model.model_name,
        "model_path": str(model.model_path),
        "loaded_adapters": model.loaded_adapters(),
        "pending": runtime.pending,
        "batching": model.batching_info(),
        "stats": dict(model.stats),
    }


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": OWNER}


async def list_models(request: Request) -> dict[str, Any]:
    ids = await asyncio.to_thread(_runtime_of(request).chat_model.model_ids)
    return {"object": "list", "data": [_model_card(i) for i in ids]}


async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    await asyncio.to_thread(_runtime_of(request).chat_model.resolve, model_id)
    return _model_card(model_id)


def _adapter_body(model: ChatModel, info: Any) -> dict[str, Any]:
    return {"id": f"{model.model_name}:{info.name}", "object": "adapter", "name": info.name,
            "path": str(info.path), "source": info.source, "loaded": info.loaded,
            **({"details": info.details} if info.details else {})}


async def list_adapters(request: Request) -> dict[str, Any]:
    model = _runtime_of(request).chat_model
    adapters = await asyncio.to_thread(model.adapters)
    return {"object": "list", "data": [_adapter_body(model, a) for a in adapters.values()]}


async def register_adapter(body: AdapterRegistration, request: Request) -> dict[str, Any]:
    runtime = _runtime_of(request)
    model = runtime.chat_model
    info = await asyncio.to_thread(model.register_adapter, body.name, Path(body.path))
    if body.load:  # load now (after the running batch) so errors surface here
        model_id = f"{model.model_name}:{body.name}"
        try:
            await asyncio.to_thread(model.load_adapter, model_id)
        except ModelServerError:
            await asyncio.to_thread(model.unregister_adapter, body.name)
            raise
        info.loaded = True
    return _adapter_body(model, info)


async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    model = _runtime_of(request).chat_model
    removed = await asyncio.to_thread(model.unregister_adapter, name)
    if not removed:
        raise ModelServerError(
            f"adapter {name!r} was not registered with POST /v1/adapters (adapters found "
            "under an adapter root are removed by deleting their folder)",
            status_code=404, param="name",
        )
    return {"id": f"{model.model_name}:{name}", "object": "adapter", "deleted": True}


async def chat_completions(body: ChatCompletionRequest,
                           request: Request) -> JSONResponse | StreamingResponse:
    runtime = _runtime_of(request)
    model = runtime.chat_model
    params = body.generation_params()
    messages = [m.model_dump() for m in body.messages]
    prepared = await asyncio.to_thread(model.prepare, body.model, messages, params)
    runtime.admit()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream_chunks(runtime, prepared, completion_id, created, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    cancel = threading.Event()
    try:
        completion = await _collect(runtime.start(prepared, cancel), prepared)
    finally:
        cancel.set()  # no-op when done; stops the work if this handler was cancelled
    return JSONResponse({
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": model.fingerprint,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": None,
            "finish_reason": _openai_finish(completion.finish_reason),
        }],
        "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
    })


def add_routes(app: FastAPI) -> None:
    """Register the error handlers and the routes (in this order, which the OpenAPI paths keep)."""
    app.add_exception_handler(ModelServerError, _model_server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.get("/health")(health)
    app.get("/v1/models")(list_models)
    app.get("/v1/models/{model_id:path}")(get_model)
    app.get("/v1/adapters")(list_adapters)
    app.post("/v1/adapters")(register_adapter)
    app.delete("/v1/adapters/{name}")(delete_adapter)
    app.post("/v1/chat/completions", response_model=None)(chat_completions)


# ---- generation events ---------------------------------------------------------------------------
async def _collect(events: asyncio.Queue[StreamEvent | BaseException],
                   prepared: PreparedChat) -> Completion:
    """Wait for a request's events and join them into one completion (errors are raised)."""
    parts: list[str] = []
    while True:
        item = await events.get()
        if isinstance(item, BaseException):
            raise item
        parts.append(item.delta)
        if item.finish_reason is not None:
            return Completion("".join(parts), item.finish_reason, item.prompt_tokens,
                              item.completion_tokens, prepared.model_id)


async def _stream_chunks(
    runtime: ModelRuntime, prepared: PreparedChat, completion_id: str, created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE lines for one streamed completion; generation runs on the model's scheduler thread."""
    cancel = threading.Event()
    model = runtime.chat_model

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": prepared.model_id, "system_fingerprint": model.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    queue = runtime.start(prepared, cancel)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                error = item if isinstance(item, ModelServerError) else ModelServerError(
                    f"generation failed: {type(item).__name__}: {item}", status_code=500)
                log.error("streamed generation failed: %s", error.message)
                yield _sse(_error_body(error))
                return
            if item.delta:
                yield chunk({"content": item.delta})
            if item.finish_reason is not None:
                yield chunk({}, _openai_finish(item.finish_reason))
                if include_usage:
                    yield _sse({
                        "id": completion_id, "object": "chat.completion.chunk",
                        "created": created, "model": prepared.model_id,
                        "system_fingerprint": model.fingerprint, "choices": [],
                        "usage": _usage(item.prompt_tokens, item.completion_tokens),
                    })
                break
        yield _sse("[DONE]")
    finally:
        cancel.set()  # the client disconnected or we are done: free the model either way
