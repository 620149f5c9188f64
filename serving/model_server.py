"""The local OpenAI-compatible model server: SmolLM2-135M-Instruct plus LoRA adapters over HTTP.

Endpoints (FastAPI, served by uvicorn):

- `GET  /v1/models`, `GET /v1/models/{id}`: the base model and every adapter as `<base>:<adapter>`.
- `POST /v1/chat/completions`: OpenAI chat completions, plain JSON or Server-Sent Events with
  `stream=true` (a role chunk, content deltas, a chunk with finish_reason, an optional usage chunk
  when `stream_options.include_usage`, then `data: [DONE]`). temperature (0 = greedy), top_p,
  max_tokens / max_completion_tokens, stop and seed are honoured; n must be 1.
- `POST /v1/adapters` `{"name", "path", "load"?}`, `GET /v1/adapters`, `DELETE /v1/adapters/{name}`:
  serve an adapter folder under a name at runtime (how champion and challenger get loaded).
- `GET /health`: the model, loaded adapters, the number of pending requests, the batching knobs
  and counters (`stats.decode_rows / stats.decode_steps` = mean requests per forward pass).

Generation runs on the model's scheduler thread (the model is shared and CPU-bound), so the event
loop stays free; concurrent requests for the same model id are batched dynamically (up to
`max_batch_size` rows share each forward pass, see `serving.generation`), and beyond
`max_pending` queued or running requests the server answers 503 with Retry-After. Errors use
OpenAI's `{"error": {...}}` shape, so the official client raises its usual exceptions
(404 → NotFoundError, 400 → BadRequestError).

Start it: `python -m serving.model_server --host 127.0.0.1 --port 8300`; in-process (demo,
tests): `with running_model_server() as base_url: OpenAI(base_url=base_url, api_key="x")`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from serving.generation import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    ChatModel,
    Completion,
    GenerationParams,
    ModelServerError,
    PreparedChat,
    StreamEvent,
    check_batching,
)

log = logging.getLogger(__name__)

OWNER = "tuneloop"
DEFAULT_MAX_PENDING = 64


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


class _Runtime:
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


def _default_adapter_root() -> Path:
    from tasks.core.settings import get_settings

    return get_settings().data_dir / "adapters"


def create_app(
    model_path: Path | None = None,
    *,
    adapter_roots: list[Path] | None = None,
    model_name: str | None = None,
    chat_model: ChatModel | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    max_pending: int = DEFAULT_MAX_PENDING,
    num_threads: int | None = None,
    max_batch_size: int | None = None,
    batch_window_ms: float | None = None,
    dtype: str | None = None,
) -> FastAPI:
    """The FastAPI app. The model loads at startup (lifespan) unless `chat_model` is given.

    `model_path` defaults to the converted SmolLM2 folder (`tasks.core.weights.smollm2_path()`);
    adapters are looked up under `<data_dir>/adapters/` and then each of `adapter_roots`.
    `model_name` is the base model id (default `smollm2-135m-instruct`); `dtype` is the compute
    dtype (auto | float32 | bfloat16; None = TUNELOOP_MODEL_DTYPE); `num_threads` sets
    torch's intra-op threads (see `ChatModel`). `max_batch_size` (default 8; 1 = no batching)
    and `batch_window_ms` (default 5) tune dynamic batching. A ready `chat_model` is served as it
    is (its own adapter roots apply; model_path, adapter_roots, model_name and num_threads are not
    used); max_batch_size / batch_window_ms, when given, are applied to it at startup.
    """
    check_batching(DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size,
                   DEFAULT_BATCH_WINDOW_MS if batch_window_ms is None else batch_window_ms)
    from tasks.core.weights import SMOLLM2_NAME

    name = model_name or SMOLLM2_NAME
    roots = [_default_adapter_root(), *(Path(p) for p in adapter_roots or [])]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = chat_model
        if model is None:
            try:
                model = await asyncio.to_thread(
                    _load_chat_model, model_path, name, roots, default_max_tokens, num_threads,
                    DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size,
                    DEFAULT_BATCH_WINDOW_MS if batch_window_ms is None else batch_window_ms,
                    dtype,
                )
            except Exception as exc:
                app.state.startup_error = exc
                log.exception("model server failed to load its model")
                raise
        else:
            model.configure_batching(max_batch_size=max_batch_size,
                                     batch_window_ms=batch_window_ms)
        runtime = _Runtime(model, max_pending)
        app.state.runtime = runtime
        yield
        if chat_model is None:  # ours to stop; a model passed in may serve another app
            model.close()

    app = FastAPI(title="tuneloop model server", lifespan=lifespan)
    app.state.startup_error = None

    def runtime_of(request: Request) -> _Runtime:
        return request.app.state.runtime

    @app.exception_handler(ModelServerError)
    async def _model_server_error(request: Request, exc: ModelServerError) -> JSONResponse:
        headers = {"Retry-After": "2"} if exc.status_code == 503 else None
        return JSONResponse(_error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"invalid request body at {'.'.join(loc) or 'body'}: {first.get('msg')}"
        return JSONResponse(
            _error_body(ModelServerError(message, param=".".join(loc) or None)), status_code=400
        )

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        runtime = runtime_of(request)
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

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": OWNER}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        ids = await asyncio.to_thread(runtime_of(request).chat_model.model_ids)
        return {"object": "list", "data": [model_card(i) for i in ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        await asyncio.to_thread(runtime_of(request).chat_model.resolve, model_id)
        return model_card(model_id)

    def adapter_body(model: ChatModel, info: Any) -> dict[str, Any]:
        return {"id": f"{model.model_name}:{info.name}", "object": "adapter", "name": info.name,
                "path": str(info.path), "source": info.source, "loaded": info.loaded,
                **({"details": info.details} if info.details else {})}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        model = runtime_of(request).chat_model
        adapters = await asyncio.to_thread(model.adapters)
        return {"object": "list", "data": [adapter_body(model, a) for a in adapters.values()]}

    @app.post("/v1/adapters")
    async def register_adapter(body: AdapterRegistration, request: Request) -> dict[str, Any]:
        runtime = runtime_of(request)
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
        return adapter_body(model, info)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
        model = runtime_of(request).chat_model
        removed = await asyncio.to_thread(model.unregister_adapter, name)
        if not removed:
            raise ModelServerError(
                f"adapter {name!r} was not registered with POST /v1/adapters (adapters found "
                "under an adapter root are removed by deleting their folder)",
                status_code=404, param="name",
            )
        return {"id": f"{model.model_name}:{name}", "object": "adapter", "deleted": True}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> JSONResponse | StreamingResponse:
        runtime = runtime_of(request)
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

    return app


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
    runtime: _Runtime, prepared: PreparedChat, completion_id: str, created: int,
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


def _load_chat_model(model_path: Path | None, model_name: str, adapter_roots: list[Path],
                     default_max_tokens: int, num_threads: int | None, max_batch_size: int,
                     batch_window_ms: float, dtype: str | None = None) -> ChatModel:
    if model_path is None:
        from tasks.core.weights import smollm2_path

        model_path = smollm2_path()
    return ChatModel(model_path, model_name=model_name, adapter_roots=adapter_roots,
                     default_max_tokens=default_max_tokens, num_threads=num_threads,
                     max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, dtype=dtype)


# ---- running it ----------------------------------------------------------------------------------
GRACEFUL_SHUTDOWN_S = 5.0


def serve(host: str | None = None, port: int | None = None, *, model_path: Path | None = None,
          adapter_roots: list[Path] | None = None, num_threads: int | None = None,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
          batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, log_level: str = "info",
          dtype: str | None = None) -> None:
    """Serve in the foreground (blocks); host/port default to TUNELOOP_MODEL_SERVER_HOST/_PORT."""
    import uvicorn

    from tasks.core.settings import get_settings

    settings = get_settings()
    app = create_app(model_path, adapter_roots=adapter_roots, num_threads=num_threads,
                     max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, dtype=dtype)
    # On SIGTERM, requests still decoding get a few seconds, then are cancelled (their rows leave
    # the batch): a stopped server must not keep the CPU busy finishing a queue nobody reads.
    uvicorn.run(app, host=host or settings.model_server_host,
                port=port or settings.model_server_port, log_level=log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


@contextlib.contextmanager
def running_model_server(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    model_path: Path | None = None,
    adapter_roots: list[Path] | None = None,
    startup_timeout_s: float = 600.0,
    **app_options: Any,
) -> Iterator[str]:
    """Run the server on a background thread; yields its OpenAI base URL `http://host:port/v1`.

    port=0 picks a free port. Returns once the model is loaded and the socket accepts requests;
    the server stops (and the port is released) when the block exits. `app_options` go to
    `create_app` (e.g. `chat_model=` to reuse an already loaded model).
    """
    import uvicorn

    app = create_app(model_path, adapter_roots=adapter_roots, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))

    def run() -> None:
        # uvicorn exits with SystemExit when startup fails; the cause is in app.state.
        with contextlib.suppress(SystemExit):
            server.run(sockets=[sock])

    thread = threading.Thread(target=run, daemon=True, name=f"tuneloop-model-server-{bound_port}")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        cause = app.state.startup_error
        raise ModelServerError(
            f"the model server on {host}:{bound_port} did not start"
            + (f": {type(cause).__name__}: {cause}" if cause else
               f" within {startup_timeout_s:.0f} s"),
            status_code=500,
        ) from cause
    log.info("model server listening on http://%s:%d/v1", host, bound_port)
    try:
        yield f"http://{host}:{bound_port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serving.model_server",
        description="Serve SmolLM2-135M-Instruct (+ LoRA adapters) with an OpenAI-compatible API.",
    )
    parser.add_argument("--host", default=None, help="default: TUNELOOP_MODEL_SERVER_HOST")
    parser.add_argument("--port", type=int, default=None,
                        help="default: TUNELOOP_MODEL_SERVER_PORT (8300)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a transformers model folder (default: converted SmolLM2)")
    parser.add_argument("--adapter-root", type=Path, action="append", default=[],
                        help="extra folder whose sub-folders are adapters (repeatable); "
                             "<data_dir>/adapters is always searched")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: one per core; use 1 on a busy "
                             "shared machine)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="requests decoded together per forward pass (default: "
                             f"{DEFAULT_MAX_BATCH_SIZE}; 1 turns batching off)")
    parser.add_argument("--batch-window-ms", type=float, default=DEFAULT_BATCH_WINDOW_MS,
                        help="how long a new batch waits for more requests (default: "
                             f"{DEFAULT_BATCH_WINDOW_MS:g} ms)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                        help="compute dtype (default: TUNELOOP_MODEL_DTYPE, auto = bfloat16 "
                             "where the CPU has native bf16, else float32)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        check_batching(args.max_batch_size, args.batch_window_ms)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.host, args.port, model_path=args.model_path, adapter_roots=args.adapter_root,
          num_threads=args.threads, max_batch_size=args.max_batch_size,
          batch_window_ms=args.batch_window_ms, log_level=args.log_level, dtype=args.dtype)


if __name__ == "__main__":
    main()
