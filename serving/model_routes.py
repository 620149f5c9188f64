"""The model server's HTTP layer: the route handlers and its OpenAI-shaped answers.

The OpenAI bodies (the chat request, completions, chunks, model cards, the error envelope) are
defined once in `serving.openai_schema`, shared with the router; this module turns a chat
request into `GenerationParams` (`generation_params`) and answers errors the model server's way:
400 for an invalid request body ("invalid request body at <field>: ...", where the router says
422), and an error type that follows the status (see `_error_body`).

`add_routes(app, keys)` registers the handlers (and the OpenAI-style error handlers) on the app
that `serving.model_server.create_app` builds, behind `KeyGate`; each handler finds the loaded
model through the `ModelRuntime` that the app's lifespan stores in `app.state.runtime`.
Generation itself runs on the model's scheduler thread (`ModelRuntime.start`), so the event loop
stays free.

Access (`required_access`): `GET /health` is liveness and open; chat and every read need the API
key (`Authorization: Bearer <key>`); every other write — registering and removing adapters — needs
the admin key, which also passes wherever the API key does. The gate is ASGI middleware in front of
routing, so a refused request never reaches a handler, its body is never read, and a route added
later is closed by default. A missing or wrong key is a 401 (`authentication_error`), the API key
on an admin route a 403 (`permission_denied_error`): the openai client raises AuthenticationError
and PermissionDeniedError.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.generation import (
    ADAPTER_NAME_RE,
    ChatModel,
    Completion,
    GenerationParams,
    ModelServerError,
    PreparedChat,
    StreamEvent,
)
from serving.openai_schema import (
    SSE_DONE,
    ChunkDelta,
    ModelCard,
    ModelList,
    ModelServerChatRequest,
    chat_completion,
    chunk_choice,
    completion_chunk,
    error_content,
    error_response,
    sse_event,
    usage,
)
from tasks.core.secrets import MAKE_A_SECRET, key_digest

log = logging.getLogger(__name__)


# ---- request bodies ------------------------------------------------------------------------------
def generation_params(body: ModelServerChatRequest) -> GenerationParams:
    """The sampling parameters of a chat request; what the local model cannot do (n > 1,
    logprobs) or an out-of-range value is a 400 naming the field and the fix."""
    if body.n not in (None, 1):
        raise ModelServerError(
            f"n={body.n} is not supported: the local model server returns one choice per "
            "request; send n=1 (or omit it) and repeat the request with different seeds",
            param="n",
        )
    if body.logprobs:
        raise ModelServerError("logprobs are not supported by the local model server; "
                               "omit logprobs", param="logprobs")
    values: dict[str, Any] = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "stop": body.stop,
        "seed": body.seed,
    }
    if body.temperature is not None:
        values["temperature"] = body.temperature
    if body.top_p is not None:
        values["top_p"] = body.top_p
    try:
        return GenerationParams(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ModelServerError(str(first["msg"]).removeprefix("Value error, "),
                               param=str(first["loc"][0]) if first["loc"] else None) from None


class AdapterRegistration(BaseModel):
    """`POST /v1/adapters`: serve the folder `path` (relative to an adapter root, or absolute
    inside one) as `<base>:<name>`; `load` loads it now so a bad adapter fails this call."""

    name: str = Field(pattern=ADAPTER_NAME_RE.pattern,
                      description="letters, digits, '.', '_' or '-' (e.g. champion)")
    path: str = Field(min_length=1, max_length=4096,
                      description="the adapter folder, relative to an adapter root")
    load: bool = False


# ---- access --------------------------------------------------------------------------------------
Access = Literal["open", "api", "admin"]
API_KEY_SETTING = "TUNELOOP_MODEL_SERVER_API_KEY"
ADMIN_KEY_SETTING = "TUNELOOP_MODEL_SERVER_ADMIN_KEY"


def required_access(method: str, path: str) -> Access:
    """The key a request needs: none for liveness (`GET /health`), the API key for chat and any
    read, the admin key for any other write. Unknown paths fall in the same classes, so nothing
    is open, or writable with the API key, by accident."""
    if method in ("GET", "HEAD") and path == "/health":
        return "open"
    if method in ("GET", "HEAD", "OPTIONS") or (method == "POST"
                                                and path == "/v1/chat/completions"):
        return "api"
    return "admin"


class ServerKeys:
    """The model server's API and admin keys, kept as digests and compared in constant time."""

    def __init__(self, api_key: str, admin_key: str) -> None:
        if not api_key or not admin_key:
            missing = API_KEY_SETTING if not api_key else ADMIN_KEY_SETTING
            raise ValueError(f"{missing} is empty; set it to a secret, e.g. the output of "
                             f"{MAKE_A_SECRET}")
        if hmac.compare_digest(key_digest(api_key), key_digest(admin_key)):
            raise ValueError(f"{ADMIN_KEY_SETTING} equals {API_KEY_SETTING}, so every client could "
                             "register adapters; give the admin key a value of its own")
        self._api = key_digest(api_key)
        self._admin = key_digest(admin_key)

    def __repr__(self) -> str:
        return "ServerKeys(<hidden>)"

    def granted(self, authorization: str | None) -> Access | None:
        """What an Authorization header grants: admin, api, or None (no bearer token, or a
        wrong one). Both digests are compared every time (equal lengths, `hmac.compare_digest`),
        so the answer's timing says nothing about either key."""
        scheme, _, token = (authorization or "").partition(" ")
        presented = key_digest(token.strip())
        is_admin = hmac.compare_digest(presented, self._admin)
        is_api = hmac.compare_digest(presented, self._api)
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return "admin" if is_admin else "api" if is_api else None


def _refusal(needed: Access, granted: Access | None) -> JSONResponse | None:
    if needed == "open" or granted == "admin" or (needed == "api" and granted == "api"):
        return None
    if granted is None:
        return error_response(
            401, "missing or invalid API key; send Authorization: Bearer <key>, the model "
            f"server's {API_KEY_SETTING} (clients send it as TUNELOOP_LLM_API_KEY)",
            type_="authentication_error", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"})
    return error_response(
        403, "registering and removing adapters needs the model server's admin key "
        f"({ADMIN_KEY_SETTING}); the API key may chat and read only",
        type_="permission_denied_error", code="admin_key_required")


class KeyGate:
    """ASGI middleware answering 401/403 before routing for a request without the key it needs."""

    def __init__(self, app: ASGIApp, keys: ServerKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            needed = required_access(scope["method"], path)
            if needed != "open":
                refusal = _refusal(needed, self.keys.granted(
                    Headers(scope=scope).get("authorization")))
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)


# ---- responses -----------------------------------------------------------------------------------
def _error_body(exc: ModelServerError) -> dict[str, Any]:
    """The OpenAI error body of `exc`; its type follows the status (401 authentication_error,
    403 permission_denied_error, 404 not_found_error, 503 server_busy, other 5xx server_error,
    else invalid_request_error), and a 404 for a model lists the `available` ids."""
    kind = {401: "authentication_error", 403: "permission_denied_error", 404: "not_found_error",
            503: "server_busy"}.get(exc.status_code, "invalid_request_error")
    if exc.status_code >= 500 and exc.status_code != 503:
        kind = "server_error"
    extra = {"available": exc.available} if exc.available else {}
    return error_content(exc.message, type_=kind, param=exc.param, code=exc.code, **extra)


def _openai_finish(reason: str | None) -> str | None:
    # "cancelled" only happens when the client has gone; report it as a stop if anyone listens.
    return "stop" if reason == "cancelled" else reason


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


async def health() -> dict[str, str]:
    """Liveness (open): the server is up and its model loaded. Nothing else, so it tells an
    anonymous caller nothing about the model, its adapters or the machine."""
    return {"status": "ok"}


async def status(request: Request) -> dict[str, Any]:
    """The detailed view (API key): the model, the loaded adapters, pending requests, the
    batching knobs and counters (`stats.decode_rows / stats.decode_steps` = mean requests per
    forward pass). No filesystem paths."""
    runtime = _runtime_of(request)
    model = runtime.chat_model
    return {
        "status": "ok",
        "model": model.model_name,
        "loaded_adapters": model.loaded_adapters(),
        "pending": runtime.pending,
        "batching": model.batching_info(),
        "stats": dict(model.stats),
    }


async def list_models(request: Request) -> dict[str, Any]:
    ids = await asyncio.to_thread(_runtime_of(request).chat_model.model_ids)
    return ModelList(data=[ModelCard(id=i) for i in ids]).model_dump()


async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    await asyncio.to_thread(_runtime_of(request).chat_model.resolve, model_id)
    return ModelCard(id=model_id).model_dump()


def _adapter_body(model: ChatModel, info: Any) -> dict[str, Any]:
    # "path" is the folder relative to its adapter root: the server's own paths stay inside.
    return {"id": f"{model.model_name}:{info.name}", "object": "adapter", "name": info.name,
            "path": info.location, "source": info.source, "loaded": info.loaded,
            **({"details": info.details} if info.details else {})}


async def list_adapters(request: Request) -> dict[str, Any]:
    model = _runtime_of(request).chat_model
    adapters = await asyncio.to_thread(model.adapters)
    return {"object": "list", "data": [_adapter_body(model, a) for a in adapters.values()]}


async def register_adapter(body: AdapterRegistration, request: Request) -> dict[str, Any]:
    runtime = _runtime_of(request)
    model = runtime.chat_model
    info = await asyncio.to_thread(model.register_adapter, body.name, body.path)
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


async def chat_completions(body: ModelServerChatRequest,
                           request: Request) -> JSONResponse | StreamingResponse:
    runtime = _runtime_of(request)
    model = runtime.chat_model
    params = generation_params(body)
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
    return JSONResponse(chat_completion(
        completion_id=completion_id, created=created, model=body.model,
        fingerprint=model.fingerprint, text=completion.text,
        finish_reason=_openai_finish(completion.finish_reason),
        token_usage=usage(completion.prompt_tokens, completion.completion_tokens),
    ))


def add_routes(app: FastAPI, keys: ServerKeys) -> None:
    """Register the key gate, the error handlers and the routes (in this order, which the
    OpenAPI paths keep)."""
    app.add_middleware(KeyGate, keys=keys)
    app.add_exception_handler(ModelServerError, _model_server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.get("/health")(health)
    app.get("/v1/status")(status)
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

    def chunk(delta: ChunkDelta, finish_reason: str | None = None) -> str:
        return sse_event(completion_chunk(
            completion_id=completion_id, created=created, model=prepared.model_id,
            fingerprint=model.fingerprint, choices=[chunk_choice(delta, finish_reason)],
            include_usage=include_usage))

    queue = runtime.start(prepared, cancel)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                error = item if isinstance(item, ModelServerError) else ModelServerError(
                    f"generation failed: {type(item).__name__}: {item}", status_code=500)
                log.error("streamed generation failed: %s", error.message)
                yield sse_event(_error_body(error))
                return
            if item.delta:
                yield chunk({"content": item.delta})
            if item.finish_reason is not None:
                yield chunk({}, _openai_finish(item.finish_reason))
                if include_usage:
                    yield sse_event(completion_chunk(
                        completion_id=completion_id, created=created, model=prepared.model_id,
                        fingerprint=model.fingerprint, choices=[],
                        token_usage=usage(item.prompt_tokens, item.completion_tokens)))
                break
        yield sse_event(SSE_DONE)
    finally:
        cancel.set()  # the client disconnected or we are done: free the model either way
