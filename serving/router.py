"""The serving router: an OpenAI-compatible front door that splits traffic champion/challenger.

`create_router_app(config)` builds a FastAPI app serving `GET /v1/models`,
`POST /v1/chat/completions` (JSON or SSE streaming passed through chunk by chunk, proxied through
one pooled client: aiohttp when installed — about a fifth of httpx's CPU per request — else
`httpx.AsyncClient`) and the reactions API (`serving.reactions`). Which model answers:

- versions come from the MLflow registry aliases `champion`/`challenger` of
  `registered_model_name` (refreshed every `alias_ttl_s`, and at once when the active deployment
  changes), unless the active deployment pins a version; the active row in `deployments` (mode,
  share) is re-read every `deployment_ttl_s`, so a new deployment — or a promotion, which ends
  it — takes effect within seconds and without a restart. Refreshes run in the background, never
  on the request path.
- modes: `canary` — users whose bucket (HMAC of the user id, mapped into [0, 1)) is below `share`
  are served by the challenger, sticky per user and monotone in `share` (ramping 5% → 10% keeps
  the first 5%); `mirror` — the champion answers and the challenger gets a background copy whose
  answer is logged as variant "mirror" (`mirror_of` = the champion interaction), never returned;
  `off` — champion only.
- a version maps to a backend model name through a template (`local`: the tuneloop model server's
  `<base>:<registered_model_name>-v<version>`; `vllm`, `ollama`, `openai` presets or any format
  string); the registry's base-model version (tag is_base=true) is served as the bare base model.

Every request becomes an `interactions` row (HMAC-hashed user, context, prompt messages, response
text, model version, variant, latency) written by a batch writer thread off the response path; the
id is returned in the `X-Interaction-Id` header (and `interaction_id` in JSON bodies). API-key
auth (Bearer) and token-bucket rate limits (per user, and per key for anonymous traffic) guard
every `/v1` route. Run it with `python -m serving.router --port 8400`.

The pieces live beside it: `serving.router_config` (settings), `serving.routing` (who answers,
rate limits), `serving.interactions` (the log), `serving.openai_schema` (the wire format),
`serving.upstream` (the backend client), `serving.api_common` (what every route shares) and
`serving.proxy` (forwarding with fallback); this module builds the app and runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api_common import (
    BEARER,
    Rejected,
    checked_header,
    http_error_response,
    rejected_response,
    unauthorized,
    validated_body,
    validation_error_response,
)
from serving.interactions import InteractionLog, interaction_row
from serving.openai_schema import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    completion_text,
    error_response,
)
from serving.proxy import proxy_completion, proxy_stream
from serving.reactions import ReactionIn, reactions_router
from serving.router_config import MODEL_TEMPLATES, RouterConfig, RouterError
from serving.routing import (
    RoutingState,
    StateResolver,
    TokenBucketLimiter,
    choose_variant,
    hash_user,
    user_bucket,
)
from serving.upstream import (
    AiohttpUpstream,
    HttpxUpstream,
    UpstreamResponse,
    UpstreamStream,
    make_upstream,
)
from tasks.core.ids import stable_id
from tasks.core.settings import get_settings

log = logging.getLogger(__name__)

# ---- the app -----------------------------------------------------------------------------------


class Router:
    """Per-app state: config, HTTP client, resolver, log, limiters, mirror tasks."""

    def __init__(self, config: RouterConfig, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self.resolver = StateResolver(config, engine)
        self.log = InteractionLog(engine, batch_size=config.log_batch_size,
                                  flush_interval_s=config.log_flush_interval_s,
                                  queue_max=config.log_queue_max)
        self.user_limiter = TokenBucketLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        self.key_limiter = TokenBucketLimiter(config.key_rate_limit_per_s,
                                              config.key_rate_limit_burst)
        self._keys = [(k.get_secret_value().encode(),
                       hashlib.sha256(k.get_secret_value().encode()).hexdigest()[:12])
                      for k in config.api_keys]
        self._salt = config.user_hash_salt.get_secret_value()
        self.upstream: HttpxUpstream | AiohttpUpstream | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mirror_slots = config.mirror_max_in_flight
        self.mirror_skipped = 0

    # -- lifecycle --
    async def start(self) -> None:
        self.upstream = make_upstream(self.config.http_backend, self.config.max_connections)
        self.log.start()
        if not await asyncio.to_thread(self.resolver.refresh_deployment):
            await asyncio.to_thread(self.resolver.refresh_aliases)  # else it just read them
        self._spawn(self._refresh_loop(self.config.deployment_ttl_s,
                                       self.resolver.refresh_deployment))
        if self.config.use_registry:
            self._spawn(self._refresh_loop(self.config.alias_ttl_s,
                                           self.resolver.refresh_aliases))

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            if getattr(task, "tuneloop_loop", False):
                task.cancel()
        # Let in-flight mirror copies finish (bounded), so their rows are flushed below.
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self.upstream is not None:
            await self.upstream.aclose()
        await asyncio.to_thread(self.log.close)

    def _spawn(self, coro: Any, *, loop_task: bool = True) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        task.tuneloop_loop = loop_task  # type: ignore[attr-defined]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refresh_loop(self, every_s: float, refresh: Any) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(refresh)
            except Exception:  # noqa: BLE001 - a refresh must never kill the loop
                log.exception("router: refresh failed")

    # -- auth and limits --
    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> str | None:
        """The key's short id when the bearer token matches a configured key, else None."""
        if credentials is None or credentials.scheme.lower() != "bearer":
            return None
        presented = credentials.credentials.encode()
        for secret, key_id in self._keys:
            if hmac.compare_digest(presented, secret):
                return key_id
        return None

    def authenticate_header(self, authorization: str | None) -> str | None:
        """`authenticate` for a raw Authorization header value."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        return self.authenticate(HTTPAuthorizationCredentials(scheme=scheme,
                                                              credentials=token.strip()))

    def rate_limited(self, key_id: str, user_hash: str | None) -> JSONResponse | None:
        """429 when the key's bucket (every request) or the user's bucket (requests naming a
        user) is empty; None when the request may go on."""
        wait = self.key_limiter.acquire(key_id)
        if wait <= 0 and user_hash is not None:
            wait = self.user_limiter.acquire(f"{key_id}:{user_hash}")
        if wait <= 0:
            return None
        return error_response(
            429, f"rate limit exceeded; retry after {wait:.2f} s", type_="rate_limit_error",
            code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    # -- proxying --
    def _backend_headers(self, variant: str) -> dict[str, str]:
        key = self.config.backends[variant].api_key.get_secret_value()
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def _url(self, variant: str) -> str:
        return f"{self.config.backends[variant].base_url}/chat/completions"

    async def post_json(self, variant: str, payload: dict[str, Any]) -> UpstreamResponse:
        assert self.upstream is not None
        return await self.upstream.post(self._url(variant), json.dumps(payload).encode(),
                                        self._backend_headers(variant),
                                        self.config.backends[variant].timeout_s)

    async def open_stream(self, variant: str, payload: dict[str, Any]) -> UpstreamStream:
        assert self.upstream is not None
        return await self.upstream.stream(self._url(variant), json.dumps(payload).encode(),
                                          self._backend_headers(variant),
                                          self.config.backends[variant].timeout_s)

    def start_mirror(self, *, payload: dict[str, Any], parent_id: str, user_hash: str,
                     state: RoutingState, context: dict[str, Any],
                     messages: list[Any]) -> None:
        if self._mirror_slots <= 0:
            self.mirror_skipped += 1
            return
        self._mirror_slots -= 1
        self._spawn(self._mirror(payload=payload, parent_id=parent_id, user_hash=user_hash,
                                 state=state, context=context, messages=messages),
                    loop_task=False)

    async def _mirror(self, *, payload: dict[str, Any], parent_id: str, user_hash: str,
                      state: RoutingState, context: dict[str, Any],
                      messages: list[Any]) -> None:
        started = time.perf_counter()
        copy = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
        copy["model"] = state.backend_models["challenger"]
        status, error, text = "ok", None, ""
        try:
            response = await self.post_json("challenger", copy)
            if response.status_code >= 400:
                status = "backend_error"
                error = f"HTTP {response.status_code}: {response.text[:500]}"
            else:
                text = completion_text(response.json())
        except Exception as exc:  # noqa: BLE001 - a failed mirror is logged, never raised
            status, error = "backend_error", f"{type(exc).__name__}: {exc}"
        finally:
            self._mirror_slots += 1
        self.log.submit(interaction_row(
            id=stable_id("mirror", parent_id), user_hash=user_hash,
            deployment_id=state.deployment_id, variant="mirror",
            model_name=copy["model"], model_version=state.versions["challenger"],
            context=context, request_messages=messages, response=text,
            latency_ms=(time.perf_counter() - started) * 1000.0, mirror_of=parent_id,
            status=status, error=error,
        ))


class _RouterApp(FastAPI):
    """FastAPI with a direct lane for the proxy hot path.

    `POST /v1/chat/completions` goes straight to its handler: Starlette's middleware stack,
    route matching and request/response wrappers were about a fifth of the router's CPU per
    request, and the handler needs none of them (it reads headers and validates the body
    itself). Its errors are answered exactly as the full stack would: the 422 handler for
    validation errors, a logged 500 for anything unexpected. Every other route, the lifespan
    and the OpenAPI document go through FastAPI as usual.
    """

    fast_routes: dict[tuple[str, str], Any]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        handler = (self.fast_routes.get((scope["method"], scope["path"]))
                   if scope["type"] == "http" and not scope.get("root_path") else None)
        if handler is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except RequestValidationError as exc:
            response = validation_error_response(request, exc)
        except Rejected as exc:
            response = exc.response
        except Exception:  # noqa: BLE001 - what ServerErrorMiddleware would do, as JSON
            log.exception("router: unhandled error in %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal router error; see the router log",
                                      type_="api_error", code="internal_error")
        await response(scope, receive, send)


async def _chat_completions(router: Router, request: Request) -> Any:
    """POST /v1/chat/completions: authenticate, validate, rate-limit, route, forward."""
    # The hot path reads headers and validates the body itself: FastAPI's per-request
    # parameter resolution cost about a third of the router's CPU per request. The OpenAPI
    # document still describes the body and headers (_CHAT_OPENAPI).
    started = time.perf_counter()
    headers = request.headers
    key_id = router.authenticate_header(headers.get("authorization"))
    if key_id is None:
        return unauthorized()
    data, body = await validated_body(request, ChatCompletionRequest)
    x_user_id = checked_header(headers, "x-user-id", 256)
    x_request_id = checked_header(headers, "x-request-id", 200)
    user_id = body.user or x_user_id
    user_hash = hash_user(user_id if user_id else f"anon:{_random_id()}", router._salt)
    limited = router.rate_limited(key_id, user_hash if user_id else None)
    if limited is not None:
        return limited
    public_model = router.config.public_model
    if body.model != public_model:
        return error_response(
            404, f"The model {body.model!r} does not exist; use {public_model!r}",
            param="model", code="model_not_found")

    state = router.resolver.state
    variant = choose_variant(user_hash, state.mode, state.share)
    interaction_id = (stable_id("interaction", key_id, x_request_id) if x_request_id
                      else _random_id())
    payload = dict(data)  # passed through as sent (unknown OpenAI fields included)
    payload.pop("user", None)  # never forward the raw user id to a backend
    if body.max_tokens is not None:
        payload["max_tokens"] = body.max_tokens  # 256.0 → 256
    messages = payload["messages"]
    context: dict[str, Any] = {
        "mode": state.mode, "share": state.share, "bucket": round(user_bucket(user_hash), 6),
        "params": {k: v for k, v in payload.items()
                   if k not in ("model", "messages", "metadata", "stream")},
    }
    if body.metadata:
        context["metadata"] = body.metadata
    row_base = {"id": interaction_id, "user_hash": user_hash,
                "deployment_id": state.deployment_id, "request_messages": messages,
                "context": context, "stream": body.stream}
    # Mirror copies the requests of users below `share` (share 1.0: every request).
    mirror = state.mode == "mirror" and user_bucket(user_hash) < state.share
    if body.stream:
        return await proxy_stream(router, state, variant, payload, row_base, started, mirror)
    return await proxy_completion(router, state, variant, payload, row_base, started, mirror)


def create_router_app(config: RouterConfig | None = None, *, engine: Any = None) -> FastAPI:
    """The router app. `engine`: a SQLAlchemy engine (default: from config.database_url)."""
    config = config or RouterConfig.from_settings()
    if engine is None:
        from tasks.core.db.engine import engine_for, get_engine

        engine = engine_for(config.database_url) if config.database_url else get_engine()
    router = Router(config, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        if config.gc_freeze:
            # Everything imported and built at start-up (FastAPI, pydantic, SQLAlchemy, MLflow's
            # client) is long-lived: move it out of the collector's reach, so a full collection
            # walks only per-request garbage instead of pausing every request for ~10 ms.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await router.stop()

    app = _RouterApp(title="tuneloop router", version="1.0", lifespan=lifespan,
                     description=__doc__.split("\n\n")[0])
    app.state.router = router
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    app.add_exception_handler(Rejected, rejected_response)

    api = APIRouter(prefix="/v1")

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, Any]:
        # Liveness only: it needs no key, so it names no deployment (GET /v1/router/state does,
        # behind the key).
        return {"status": "ok"}

    @api.get("/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]},
             tags=["openai"])
    async def list_models(
        credentials: HTTPAuthorizationCredentials | None = BEARER,
    ) -> Any:
        if router.authenticate(credentials) is None:
            return unauthorized()
        return ModelList(data=[ModelCard(id=config.public_model)])

    @api.get("/router/state", responses={401: ERROR_RESPONSES[401]}, tags=["ops"])
    async def router_state(
        credentials: HTTPAuthorizationCredentials | None = BEARER,
    ) -> Any:
        if router.authenticate(credentials) is None:
            return unauthorized()
        return {"routing": router.resolver.state.as_dict(), "log": router.log.stats(),
                "mirror_skipped": router.mirror_skipped}

    @api.post(
        "/chat/completions", tags=["openai"],
        responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "unknown model"},
                   200: {"description": "a chat completion (JSON) or an SSE stream",
                         "content": {"text/event-stream": {}}}},
        openapi_extra=_CHAT_OPENAPI,
    )
    async def chat_completions(request: Request) -> Any:
        return await _chat_completions(router, request)

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, str]:
        return {"service": "tuneloop router", "openapi": "/openapi.json"}

    api.include_router(reactions_router(router))
    app.include_router(api)
    app.fast_routes = {("POST", "/v1/chat/completions"): chat_completions}
    _pin_public_model_in_schema(app, config.public_model)
    return app


_ID_RANDOM = random.Random(int.from_bytes(os.urandom(16), "big"))


def _random_id() -> str:
    """A 128-bit random hex id (interaction ids are unique, not secret: no syscall per id)."""
    return f"{_ID_RANDOM.getrandbits(128):032x}"


_CHAT_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
    "parameters": [
        {"name": "x-user-id", "in": "header", "required": False,
         "description": "the end user (when the body has no `user`): sticky routing key",
         "schema": {"type": "string", "maxLength": 256}},
        {"name": "x-request-id", "in": "header", "required": False,
         "description": "a client retry with the same id is logged as the same interaction",
         "schema": {"type": "string", "maxLength": 200}},
    ],
    "security": [{"HTTPBearer": []}],
}


def _pin_public_model_in_schema(app: FastAPI, public_model: str) -> None:
    """Add the chat request schema (validated by hand, so FastAPI does not know it) and
    advertise the one accepted model id as an enum, so generated clients and fuzzers send it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            request_schema = ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(request_schema.pop("$defs", {}))
            components["ChatCompletionRequest"] = request_schema
            request_schema["properties"]["model"]["enum"] = [public_model]
            reaction_schema = ReactionIn.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(reaction_schema.pop("$defs", {}))
            components["ReactionIn"] = reaction_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- running it --------------------------------------------------------------------------------


class RouterServer:
    """Run an app under uvicorn in a background thread on an ephemeral port (tests, demos)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.base_url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> RouterServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                http="httptools", lifespan="on", backlog=2048,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"router-{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RouterError("the router did not start within 30 s (see the log above)")
            time.sleep(0.01)
        self.base_url = f"http://{self.host}:{port}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=30)
            self._server = None

    def __enter__(self) -> RouterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_router(config: RouterConfig | None = None, *, engine: Any = None
                   ) -> Iterator[RouterServer]:
    """`with running_router(cfg) as server:` → `server.base_url` is the router's /v1 URL."""
    with RouterServer(create_router_app(config, engine=engine)) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    settings = get_settings()
    parser = argparse.ArgumentParser(description="tuneloop router (OpenAI-compatible)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=settings.router_port)
    parser.add_argument("--champion-url", help="champion backend base URL (…/v1)")
    parser.add_argument("--challenger-url", help="challenger backend base URL (…/v1)")
    parser.add_argument("--model-template", help=f"preset ({', '.join(MODEL_TEMPLATES)}) or "
                        "format string over {base_model}, {registered_model_name}, {version}")
    parser.add_argument("--no-registry", action="store_true",
                        help="do not read MLflow aliases (versions from deployments only)")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the start-up heap to the garbage collector (for comparison)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per proxied request
    base = RouterConfig.from_settings(settings)
    backends = dict(base.backends)
    for variant, url in (("champion", args.champion_url), ("challenger", args.challenger_url)):
        if url or args.model_template:
            backends[variant] = backends[variant].model_copy(update={
                **({"base_url": url.rstrip("/")} if url else {}),
                **({"model_template": MODEL_TEMPLATES.get(args.model_template,
                                                          args.model_template)}
                   if args.model_template else {}),
            })
    config = base.model_copy(update={"backends": backends,
                                     "use_registry": not args.no_registry,
                                     "gc_freeze": not args.no_gc_freeze})
    uvicorn.run(create_router_app(RouterConfig.model_validate(config.model_dump())),
                host=args.host, port=args.port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop")


if __name__ == "__main__":
    # Run the canonical module's main: `python -m` executes this file as __main__, and the
    # reactions routes import serving.router, which must not be a second copy.
    from serving import router as _canonical

    _canonical.main()
