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
text, model version, variant, latency, the client's name and X-Request-Id) written by a batch
writer thread off the response path; its id (128 random bits from `secrets`) is returned in the
`X-Interaction-Id` header (and `interaction_id` in JSON bodies). Which variant answered is never
told to the client: the same headers whichever answered, no version, and the public model id as
`model` in bodies and streamed events (`serving.proxy`). The front door, for hostile clients:

- named API clients (`RouterConfig.clients`: name -> sha256 digest of its key; the one-key
  set-up's key is the client "default"): a Bearer token is looked up by its digest (a dict on
  the first 8 bytes, then a constant-time compare of all 32) and the request runs as that
  client's name, stored as `client_id`. `GET /v1/router/state` takes the admin key only (a
  client key is a 403, no or a wrong key a 401); every other `/v1` route takes a client key
  only. `/health`, `/` and the OpenAPI document are public: liveness, nothing about the state.
- token-bucket rate limits per client (all its requests) and per end user of a client.
- limits: a body over `max_body_bytes` is a 413 (by Content-Length, or by the bytes read: chunked
  bodies too); more than `max_messages` messages or a message over `max_content_chars` a 422
  naming the field.
- X-Request-Id names a request of one client (unique per (client_id, request_id)): a replay by
  that client and end user returns the stored answer with the same interaction id, or a 409
  while the first is still in flight or when it failed; a replay by another end user of the
  client is a 409 naming nothing of the first; it never overwrites. The last `request_ids_max`
  ids are held in memory (`serving.request_ids`, loaded from the database at start), so a fresh
  id costs no database read; one is made only when memory cannot vouch for the whole
  `request_id_window_s`.
  An id reused after that window is served anew, and the log's write of its row is refused by
  the unique index (logged as failed): the first row stays.
- reactions (`serving.reactions`) are accepted from the client, and end user, that got the
  answer; `RecentInteractions` lets them be checked while the database is down.

Run it with `python -m serving.router --port 8400`.

The pieces live beside it: `serving.router_config` (settings), `serving.routing` (who answers,
rate limits), `serving.request_ids` (callers, X-Request-Id scoping and replays),
`serving.interactions` (the log), `serving.openai_schema` (the wire format), `serving.upstream`
(the backend client), `serving.api_common` (what every route shares), `serving.proxy`
(forwarding with fallback) and `serving.router_server` (the app class with its chat fast lane,
uvicorn in a thread); this module builds the app and runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import secrets
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
    InteractionFacts,
    RecentInteractions,
    Rejected,
    checked_header,
    forbidden,
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
    message_limit_errors,
)
from serving.proxy import proxy_completion, proxy_stream
from serving.reactions import ReactionIn, reactions_router
from serving.request_ids import Caller, CallerKeys, RequestLedger
from serving.router_config import MODEL_TEMPLATES, RouterConfig
from serving.router_server import RouterApp, RouterServer
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
    """Per-app state: config, HTTP client, resolver, log, limiters, mirror tasks, the keys, and
    what it remembers of recent interactions (reactions) and request ids (replays)."""

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
        self.keys = CallerKeys(config.clients, config.admin_key_sha256)
        self._salt = config.user_hash_salt.get_secret_value()
        self.recent = RecentInteractions(config.recent_interactions_max)
        self.ledger = RequestLedger(config, engine, self.log)  # X-Request-Id scoping, replays
        self.requests = self.ledger.requests  # what it holds in memory
        self.upstream: HttpxUpstream | AiohttpUpstream | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mirror_slots = config.mirror_max_in_flight
        self.mirror_skipped = 0

    # -- lifecycle --
    async def start(self) -> None:
        self.upstream = make_upstream(self.config.http_backend, self.config.max_connections)
        self.log.start()
        try:
            await asyncio.to_thread(self.resolver.prepare)  # imports MLflow: local, no request
        except Exception:  # noqa: BLE001 - the registry read below reports it again
            log.exception("router: cannot make the MLflow client")
        # The deployment (Postgres, under its own connect and statement timeouts) first; then
        # the registry in the background with a bounded wait: an unreachable MLflow must not
        # hold start-up. Until it answers the resolver serves the last known good state it
        # loaded (or the base model when there is none).
        await asyncio.to_thread(self.resolver.refresh_deployment, read_registry=False)

        async def first_registry_read() -> None:
            try:
                await asyncio.to_thread(self.resolver.refresh_aliases)
            except Exception:  # noqa: BLE001 - the refresh loop below tries again
                log.exception("router: first registry read failed")

        if self.config.use_registry:
            first = self._spawn(first_registry_read())
            done, _ = await asyncio.wait({first}, timeout=self.resolver.start_wait_s)
            if not done:
                log.warning("router: MLflow has not answered after %.1f s; serving %s "
                            "meanwhile", self.resolver.start_wait_s,
                            dict(self.resolver.state.versions))
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
    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Caller | None:
        """The caller a Bearer credential names, else None (no credential, another scheme or
        an empty token)."""
        if (credentials is None or not credentials.credentials
                or credentials.scheme.lower() != "bearer"):
            return None
        return self.keys.identify(credentials.credentials)

    def authenticate_header(self, authorization: str | None) -> Caller | None:
        """`authenticate` for a raw Authorization header value (the chat hot path)."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        return self.authenticate(HTTPAuthorizationCredentials(scheme=scheme,
                                                              credentials=token.strip()))

    @staticmethod
    def client_of(caller: Caller | None) -> str:
        """The client name a client route runs as; raises Rejected (401 no or a wrong key,
        403 the admin key)."""
        if caller is None:
            raise Rejected(unauthorized())
        if caller.admin:
            raise Rejected(forbidden("the admin key opens the control routes only; send a "
                                     "client's API key"))
        return caller.name

    @staticmethod
    def require_admin(caller: Caller | None) -> None:
        """Raises Rejected unless the caller is the admin (401 no or a wrong key, 403 a client)."""
        if caller is None:
            raise Rejected(unauthorized())
        if not caller.admin:
            raise Rejected(forbidden("this control route takes the admin key "
                                     "(TUNELOOP_ROUTER_ADMIN_KEY), not a client's key"))

    def rate_limited(self, client_id: str, user_hash: str | None) -> JSONResponse | None:
        """429 when the client's bucket (every request) or its user's bucket (requests naming a
        user) is empty; None when the request may go on."""
        wait = self.key_limiter.acquire(client_id)
        if wait <= 0 and user_hash is not None:
            wait = self.user_limiter.acquire(f"{client_id}:{user_hash}")
        if wait <= 0:
            return None
        return error_response(
            429, f"rate limit exceeded; retry after {wait:.2f} s", type_="rate_limit_error",
            code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    # -- what the router remembers --
    def record(self, row: dict[str, Any]) -> None:
        """Submit an interaction row to the log and remember it: its facts for reactions, its
        status for a replay of its X-Request-Id."""
        if self.log.submit(row):
            self.recent.add(row["id"], InteractionFacts.of_row(row))
        self.ledger.recorded(row)

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
                     client_id: str | None, state: RoutingState, context: dict[str, Any],
                     messages: list[Any]) -> None:
        if self._mirror_slots <= 0:
            self.mirror_skipped += 1
            return
        self._mirror_slots -= 1
        self._spawn(self._mirror(payload=payload, parent_id=parent_id, user_hash=user_hash,
                                 client_id=client_id, state=state, context=context,
                                 messages=messages),
                    loop_task=False)

    async def _mirror(self, *, payload: dict[str, Any], parent_id: str, user_hash: str,
                      client_id: str | None, state: RoutingState, context: dict[str, Any],
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
        self.record(interaction_row(
            id=stable_id("mirror", parent_id), user_hash=user_hash,
            deployment_id=state.deployment_id, variant="mirror",
            model_name=copy["model"], model_version=state.versions["challenger"],
            context=context, request_messages=messages, response=text,
            latency_ms=(time.perf_counter() - started) * 1000.0, mirror_of=parent_id,
            status=status, error=error, client_id=client_id,
        ))


async def _chat_completions(router: Router, request: Request) -> Any:
    """POST /v1/chat/completions: authenticate, validate, rate-limit, replay or route, forward."""
    # The hot path reads headers and validates the body itself: FastAPI's per-request
    # parameter resolution cost about a third of the router's CPU per request. The OpenAPI
    # document still describes the body and headers (_CHAT_OPENAPI).
    started = time.perf_counter()
    headers = request.headers
    config = router.config
    client_id = router.client_of(router.authenticate_header(headers.get("authorization")))
    data, body = await validated_body(request, ChatCompletionRequest, config.max_body_bytes)
    over_limit = message_limit_errors(body, max_messages=config.max_messages,
                                      max_content_chars=config.max_content_chars)
    if over_limit:
        raise RequestValidationError(over_limit)
    x_user_id = checked_header(headers, "x-user-id", 256)
    request_id = checked_header(headers, "x-request-id", 200) or None
    user_id = body.user or x_user_id
    user_hash = hash_user(user_id if user_id else f"anon:{secrets.token_hex(16)}", router._salt)
    limited = router.rate_limited(client_id, user_hash if user_id else None)
    if limited is not None:
        return limited
    public_model = config.public_model
    if body.model != public_model:
        return error_response(
            404, f"The model {body.model!r} does not exist; use {public_model!r}",
            param="model", code="model_not_found")

    # Never derived from X-Request-Id (a client-chosen value): unguessable, whoever asks.
    interaction_id = secrets.token_hex(16)
    if request_id is not None:
        replay = await router.ledger.claim_request_id(
            client_id, request_id, interaction_id, user_hash=user_hash if user_id else None,
            stream=body.stream)
        if replay is not None:
            return replay
    state = router.resolver.state
    variant = choose_variant(user_hash, state.mode, state.share)
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
    if not user_id:
        context["anonymous"] = True  # its user_hash is random: reactions cannot name the user
    if body.metadata:
        context["metadata"] = body.metadata
    row_base = {"id": interaction_id, "user_hash": user_hash,
                "deployment_id": state.deployment_id, "request_messages": messages,
                "context": context, "stream": body.stream, "client_id": client_id,
                "request_id": request_id}
    # Mirror copies the requests of users below `share` (share 1.0: every request).
    mirror = state.mode == "mirror" and user_bucket(user_hash) < state.share
    try:
        if body.stream:
            return await proxy_stream(router, state, variant, payload, row_base, started,
                                      mirror)
        return await proxy_completion(router, state, variant, payload, row_base, started,
                                      mirror)
    except BaseException:
        # Nothing was recorded for it (cancelled, or a bug): a retry may run it afresh.
        if request_id is not None:
            router.requests.forget((client_id, request_id), interaction_id)
        raise


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
        router._spawn(router.ledger.load_request_ids())  # in the background: never holds start-up
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

    app = RouterApp(title="tuneloop router", version="1.0", lifespan=lifespan,
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

    @api.get("/models", response_model=ModelList,
             responses={401: ERROR_RESPONSES[401], 403: ERROR_RESPONSES[403]}, tags=["openai"])
    async def list_models(
        credentials: HTTPAuthorizationCredentials | None = BEARER,
    ) -> Any:
        router.client_of(router.authenticate(credentials))
        return ModelList(data=[ModelCard(id=config.public_model)])

    @api.get("/router/state", responses={401: ERROR_RESPONSES[401], 403: ERROR_RESPONSES[403]},
             tags=["ops"])
    async def router_state(
        credentials: HTTPAuthorizationCredentials | None = BEARER,
    ) -> Any:
        """What the router serves (deployment, versions, routing), its log counters and its
        clients' names: the admin key only."""
        router.require_admin(router.authenticate(credentials))
        return {"routing": router.resolver.state.as_dict(), "log": router.log.stats(),
                "mirror_skipped": router.mirror_skipped, "clients": sorted(config.clients),
                "request_ids_held": len(router.requests),
                "recent_interactions_held": len(router.recent)}

    @api.post(
        "/chat/completions", tags=["openai"],
        responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "unknown model"},
                   409: {"model": ErrorResponse, "description": "a replayed X-Request-Id whose "
                         "first request is still in flight, or failed, or came from another "
                         "end user"},
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
    _pin_public_model_in_schema(app, config)
    return app


_CHAT_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
    "parameters": [
        {"name": "x-user-id", "in": "header", "required": False,
         "description": "the end user (when the body has no `user`): sticky routing key",
         "schema": {"type": "string", "maxLength": 256}},
        {"name": "x-request-id", "in": "header", "required": False,
         "description": "names this request among the client's own: a retry with the same id "
         "returns the stored answer (same X-Interaction-Id) to the same end user, or 409 while "
         "the first is in flight, when it failed, or for another end user",
         "schema": {"type": "string", "maxLength": 200}},
    ],
    "security": [{"HTTPBearer": []}],
}


def _pin_public_model_in_schema(app: FastAPI, config: RouterConfig) -> None:
    """Add the chat request schema (validated by hand, so FastAPI does not know it), advertise
    the one accepted model id as an enum, so generated clients and fuzzers send it, and the
    configured message limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            request_schema = ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(request_schema.pop("$defs", {}))
            components["ChatCompletionRequest"] = request_schema
            request_schema["properties"]["model"]["enum"] = [config.public_model]
            request_schema["properties"]["messages"]["maxItems"] = config.max_messages
            message = components["ChatMessage"]["properties"]
            message["content"]["maxLength"] = config.max_content_chars
            reaction_schema = ReactionIn.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(reaction_schema.pop("$defs", {}))
            components["ReactionIn"] = reaction_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- running it --------------------------------------------------------------------------------


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
