"""The local OpenAI-compatible model server: SmolLM2-135M-Instruct plus LoRA adapters over HTTP.

Endpoints (FastAPI, served by uvicorn; the handlers live in `serving.model_routes`):

- `GET  /v1/models`, `GET /v1/models/{id}`: the base model and every adapter as `<base>:<adapter>`.
- `POST /v1/chat/completions`: OpenAI chat completions, plain JSON or Server-Sent Events with
  `stream=true` (a role chunk, content deltas, a chunk with finish_reason, an optional usage chunk
  when `stream_options.include_usage`, then `data: [DONE]`). temperature (0 = greedy), top_p,
  max_tokens / max_completion_tokens, stop and seed are honoured; n must be 1.
- `POST /v1/adapters` `{"name", "path", "load"?}`, `GET /v1/adapters`, `DELETE /v1/adapters/{name}`:
  serve an adapter folder under a name at runtime; `path` must lie inside an adapter root
  (`<data_dir>/adapters` and each `--adapter-root`), best given relative to it.
- `GET /v1/status`: the model, loaded adapters, the number of pending requests, the batching knobs
  and counters (`stats.decode_rows / stats.decode_steps` = mean requests per forward pass).
- `GET /health`: liveness only, `{"status": "ok"}`.

Every route but `/health` needs `Authorization: Bearer <key>`: the API key
(TUNELOOP_MODEL_SERVER_API_KEY; LLM clients send it as TUNELOOP_LLM_API_KEY, and the two dev
defaults are equal) for chat and reads, the admin key (TUNELOOP_MODEL_SERVER_ADMIN_KEY) for
registering and removing adapters; see `serving.model_routes`. Responses show adapter folders
relative to their root, never the server's absolute paths.

Generation runs on the model's scheduler thread (the model is shared and CPU-bound), so the event
loop stays free; concurrent requests for the same model id are batched dynamically (up to
`max_batch_size` rows share each forward pass, see `serving.generation`), and beyond
`max_pending` queued or running requests the server answers 503 with Retry-After. Errors use
OpenAI's `{"error": {...}}` shape, so the official client raises its usual exceptions
(401 → AuthenticationError, 403 → PermissionDeniedError, 404 → NotFoundError,
400 → BadRequestError).

Start it: `python -m serving.model_server --host 127.0.0.1 --port 8300`; in-process (demo,
tests): `with running_model_server() as base_url: OpenAI(base_url=base_url, api_key=<the
API key>)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from serving.generation import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    ChatModel,
    ModelServerError,
    check_batching,
)
from serving.model_routes import ModelRuntime, ServerKeys, add_routes

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 64


def _default_adapter_root() -> Path:
    from tasks.core.settings import get_settings

    return get_settings().data_dir / "adapters"


def _server_keys(api_key: str | None, admin_key: str | None) -> ServerKeys:
    from tasks.core.settings import get_settings

    settings = get_settings()
    return ServerKeys(
        settings.model_server_api_key.get_secret_value() if api_key is None else api_key,
        settings.model_server_admin_key.get_secret_value() if admin_key is None else admin_key,
    )


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
    api_key: str | None = None,
    admin_key: str | None = None,
) -> FastAPI:
    """The FastAPI app. The model loads at startup (lifespan) unless `chat_model` is given.

    `api_key` (chat and reads) and `admin_key` (adapter registration and removal) default to
    TUNELOOP_MODEL_SERVER_API_KEY and TUNELOOP_MODEL_SERVER_ADMIN_KEY; they must differ.

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
    keys = _server_keys(api_key, admin_key)
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
        runtime = ModelRuntime(model, max_pending)
        app.state.runtime = runtime
        yield
        if chat_model is None:  # ours to stop; a model passed in may serve another app
            model.close()

    app = FastAPI(title="tuneloop model server", lifespan=lifespan)
    app.state.startup_error = None

    add_routes(app, keys)
    return app


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
    host = host or settings.model_server_host
    _warn_about_dev_keys(host)
    app = create_app(model_path, adapter_roots=adapter_roots, num_threads=num_threads,
                     max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, dtype=dtype)
    # On SIGTERM, requests still decoding get a few seconds, then are cancelled (their rows leave
    # the batch): a stopped server must not keep the CPU busy finishing a queue nobody reads.
    uvicorn.run(app, host=host, port=port or settings.model_server_port, log_level=log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _warn_about_dev_keys(host: str) -> None:
    """The dev keys are in the source for anyone to read: fine on loopback, a warning elsewhere."""
    from tasks.core.secrets import DEV_MODEL_SERVER_ADMIN_KEY, DEV_MODEL_SERVER_API_KEY
    from tasks.core.settings import get_settings

    settings = get_settings()
    dev_defaults = [name for name, secret, dev in (
        ("TUNELOOP_MODEL_SERVER_API_KEY", settings.model_server_api_key, DEV_MODEL_SERVER_API_KEY),
        ("TUNELOOP_MODEL_SERVER_ADMIN_KEY", settings.model_server_admin_key,
         DEV_MODEL_SERVER_ADMIN_KEY),
    ) if secret.get_secret_value() == dev]
    if dev_defaults and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the model server listens on %s with the development default of %s; set "
                    "them to secrets of your own", host, " and ".join(dev_defaults))


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
    `create_app` (e.g. `chat_model=` to reuse an already loaded model, `api_key=` /
    `admin_key=`; by default the TUNELOOP_MODEL_SERVER_* keys, whose dev default the LLM
    clients' TUNELOOP_LLM_API_KEY equals).
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
        description="Serve SmolLM2-135M-Instruct (+ LoRA adapters) with an OpenAI-compatible API. "
                    "Clients send TUNELOOP_MODEL_SERVER_API_KEY as a bearer token; adapter "
                    "registration and removal need TUNELOOP_MODEL_SERVER_ADMIN_KEY (both read "
                    "from the environment, never from the command line).",
    )
    parser.add_argument("--host", default=None, help="default: TUNELOOP_MODEL_SERVER_HOST")
    parser.add_argument("--port", type=int, default=None,
                        help="default: TUNELOOP_MODEL_SERVER_PORT (8300)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a transformers model folder (default: converted SmolLM2)")
    parser.add_argument("--adapter-root", type=Path, action="append", default=[],
                        help="extra folder whose sub-folders are adapters (repeatable); "
                             "<data_dir>/adapters is always searched. POST /v1/adapters only "
                             "accepts folders inside these roots")
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
        _server_keys(None, None)  # an empty or shared key fails here, not in uvicorn's startup
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.host, args.port, model_path=args.model_path, adapter_roots=args.adapter_root,
          num_threads=args.threads, max_batch_size=args.max_batch_size,
          batch_window_ms=args.batch_window_ms, log_level=args.log_level, dtype=args.dtype)


if __name__ == "__main__":
    main()
