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
import queue
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import anyio
import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.core.ids import stable_id
from tasks.core.settings import DEFAULT_LOCAL_MODEL, Settings, get_settings

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)

VARIANTS = ("champion", "challenger")
MODES = ("canary", "mirror", "off")
Mode = Literal["canary", "mirror", "off"]
Variant = Literal["champion", "challenger"]

# Presets for how a registered version is named on a backend.
MODEL_TEMPLATES = {
    "local": "{base_model}:{registered_model_name}-v{version}",  # serving.model_server
    "vllm": "{registered_model_name}-v{version}",  # --lora-modules <name>-v<version>=<path>
    "ollama": "{registered_model_name}:v{version}",  # ollama create <name>:v<version>
    "openai": "{base_model}",  # hosted: one fixed (fine-tuned) model id per backend
}
_TEMPLATE_FIELDS = {"base_model": "b", "registered_model_name": "m", "version": "1"}

HEADER_INTERACTION = "X-Interaction-Id"
HEADER_VARIANT = "X-Tuneloop-Variant"
HEADER_VERSION = "X-Tuneloop-Model-Version"


class RouterError(RuntimeError):
    """The router cannot start or serve; the message names the setting or backend to fix."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


# ---- configuration -----------------------------------------------------------------------------


class BackendConfig(BaseModel):
    """One OpenAI-compatible backend and how registered versions are named on it."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    base_url: str
    api_key: SecretStr = SecretStr("tuneloop-local")
    base_model: str = DEFAULT_LOCAL_MODEL
    model_template: str = "local"
    timeout_s: float = 120.0

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url {value!r} is not an http(s) URL; use e.g. http://127.0.0.1:8300/v1"
            )
        return value.rstrip("/")

    @field_validator("model_template")
    @classmethod
    def _template(cls, value: str) -> str:
        template = MODEL_TEMPLATES.get(value, value)
        try:
            template.format(**_TEMPLATE_FIELDS)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"model_template {value!r} is not a preset ({', '.join(MODEL_TEMPLATES)}) nor a "
                "format string over {base_model}, {registered_model_name}, {version}; e.g. "
                "model_template: '{registered_model_name}-v{version}'"
            ) from exc
        return template

    @field_validator("timeout_s")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("timeout_s must be > 0; e.g. timeout_s: 120")
        return value

    def model_for(self, version: str | None, registered_model_name: str, *,
                  is_base: bool = False) -> str:
        """The backend model name serving `version` (the bare base model for None/base)."""
        if version is None or is_base:
            return self.base_model
        return self.model_template.format(
            base_model=self.base_model, registered_model_name=registered_model_name,
            version=version,
        )


class RouterConfig(BaseModel):
    """Everything the router needs; `RouterConfig.from_settings()` fills it from the env."""

    model_config = ConfigDict(extra="forbid")

    backends: dict[str, BackendConfig]
    registered_model_name: str
    public_model: str = ""  # the model id clients send; defaults to registered_model_name
    api_keys: list[SecretStr]
    user_hash_salt: SecretStr
    database_url: str | None = None  # None: tasks.core.db.engine.get_engine()
    tracking_uri: str | None = None  # None: settings.resolved_mlflow_tracking_uri
    use_registry: bool = True
    alias_ttl_s: float = 30.0
    deployment_ttl_s: float = 2.0
    rate_limit_per_s: float = 20.0  # per user; 0 disables
    rate_limit_burst: int = 40
    # Per API key over all its requests (chat with or without a user, reactions): varying
    # `user` cannot lift it. 0 disables.
    key_rate_limit_per_s: float = 1000.0
    key_rate_limit_burst: int = 2000
    log_batch_size: int = 256
    log_flush_interval_s: float = 0.2
    log_queue_max: int = 100_000
    mirror_max_in_flight: int = 32
    max_connections: int = 512
    http_backend: Literal["auto", "aiohttp", "httpx"] = "auto"  # auto: aiohttp if installed
    gc_freeze: bool = True  # freeze the start-up heap out of the garbage collector (tail latency)

    @field_validator("backends")
    @classmethod
    def _variants(cls, value: dict[str, BackendConfig]) -> dict[str, BackendConfig]:
        unknown = set(value) - set(VARIANTS)
        if unknown:
            raise ValueError(
                f"unknown backend variant(s) {sorted(unknown)}; use champion and challenger, "
                "e.g. backends: {champion: {base_url: http://127.0.0.1:8300/v1}}"
            )
        if "champion" not in value:
            raise ValueError(
                "backends needs a champion entry; e.g. backends: "
                "{champion: {base_url: http://127.0.0.1:8300/v1}}"
            )
        value.setdefault("challenger", value["champion"])
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if not value or any(not k.get_secret_value() for k in value):
            raise ValueError("api_keys needs at least one non-empty key; set "
                             "TUNELOOP_ROUTER_API_KEY=<a long random string>")
        return value

    @field_validator("alias_ttl_s", "deployment_ttl_s", "log_flush_interval_s")
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be > 0 seconds, got {value}; e.g. 2.0")
        return value

    @field_validator("rate_limit_per_s", "key_rate_limit_per_s")
    @classmethod
    def _rate(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"a rate limit must be >= 0 (0 disables it), got {value}; e.g. 20")
        return value

    @field_validator("rate_limit_burst", "key_rate_limit_burst", "log_batch_size",
                     "log_queue_max", "mirror_max_in_flight", "max_connections")
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}; e.g. 40")
        return value

    @model_validator(mode="after")
    def _public_model(self) -> RouterConfig:
        if not self.public_model:
            self.public_model = self.registered_model_name
        return self

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> RouterConfig:
        """Backends from TUNELOOP_ROUTER_{CHAMPION,CHALLENGER}_BASE_URL (default: the local
        model server), keys/salt/registered model from settings; `overrides` win."""
        settings = settings or get_settings()
        template = settings.router_model_template
        champion_url = settings.router_champion_base_url or settings.local_model_server_url
        challenger_url = settings.router_challenger_base_url
        values: dict[str, Any] = {
            "backends": {
                "champion": BackendConfig(base_url=champion_url, model_template=template,
                                          base_model=settings.llm_model),
                "challenger": BackendConfig(base_url=challenger_url or champion_url,
                                            model_template=template,
                                            base_model=settings.llm_model),
            },
            "registered_model_name": settings.registered_model_name,
            "api_keys": [settings.router_api_key],
            "user_hash_salt": settings.user_hash_salt,
            "database_url": settings.database_url,
            "tracking_uri": settings.resolved_mlflow_tracking_uri,
            "rate_limit_per_s": settings.router_user_rate_limit_per_s,
            "rate_limit_burst": settings.router_user_rate_limit_burst,
            "key_rate_limit_per_s": settings.router_key_rate_limit_per_s,
            "key_rate_limit_burst": settings.router_key_rate_limit_burst,
        }
        values.update(overrides)
        return cls(**values)


# ---- routing (pure) ----------------------------------------------------------------------------


def hash_user(user_id: str, salt: str) -> str:
    """HMAC-SHA256 of a user id (hex, 64 chars): what is stored and what routing hashes."""
    return hmac.new(salt.encode(), user_id.encode("utf-8", "surrogatepass"),
                    hashlib.sha256).hexdigest()


def user_bucket(user_hash: str) -> float:
    """A user's fixed position in [0, 1): the first 64 bits of the hash over 2**64."""
    return int(user_hash[:16], 16) / 2.0**64


def choose_variant(user_hash: str, mode: str, share: float) -> Variant:
    """Canary: the challenger serves users whose bucket is below `share`; otherwise champion.

    Deterministic per user (sticky) and monotone in share: a user served by the challenger at
    5% is still served by it at 10%. Mirror and off always answer with the champion.
    """
    if mode == "canary" and user_bucket(user_hash) < share:
        return "challenger"
    return "champion"


@dataclass(frozen=True)
class RoutingState:
    """What the router serves right now; replaced atomically on every refresh."""

    deployment_id: str | None = None
    mode: str = "off"
    share: float = 0.0
    versions: Mapping[str, str | None] = field(
        default_factory=lambda: {"champion": None, "challenger": None})
    backend_models: Mapping[str, str] = field(default_factory=dict)
    source: str = "default"  # where versions came from: registry | deployment | default

    def as_dict(self) -> dict[str, Any]:
        return {"deployment_id": self.deployment_id, "mode": self.mode, "share": self.share,
                "versions": dict(self.versions), "backend_models": dict(self.backend_models),
                "source": self.source}


class StateResolver:
    """Reads the active deployment (Postgres) and the aliases (MLflow) into a RoutingState.

    Both `refresh_*` methods are blocking and meant for a worker thread; `state` is a plain
    attribute read by request handlers without locking.
    """

    def __init__(self, config: RouterConfig, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self._lock = threading.Lock()
        self._aliases: dict[str, str | None] = {"champion": None, "challenger": None}
        self._deployment: dict[str, Any] | None = None
        self._is_base: dict[str, bool] = {}
        self._client: Any = None
        self.state = self._compute()

    # -- registry --
    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            uri = self.config.tracking_uri or get_settings().resolved_mlflow_tracking_uri
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def _lookup_alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._mlflow().get_model_version_by_alias(self.config.registered_model_name,
                                                           alias)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                                  "INVALID_PARAMETER_VALUE"):
                return None
            raise
        self._is_base[str(mv.version)] = (mv.tags or {}).get("is_base") == "true"
        return str(mv.version)

    def _lookup_is_base(self, version: str) -> None:
        if version in self._is_base or not self.config.use_registry:
            return
        try:
            mv = self._mlflow().get_model_version(self.config.registered_model_name, version)
            self._is_base[version] = (mv.tags or {}).get("is_base") == "true"
        except Exception as exc:  # noqa: BLE001 - an unknown version is served as an adapter
            log.warning("router: cannot read version %s from the registry: %s", version, exc)

    def refresh_aliases(self) -> None:
        if not self.config.use_registry:
            return
        try:
            aliases = {variant: self._lookup_alias(variant) for variant in VARIANTS}
        except Exception as exc:  # noqa: BLE001 - keep serving the last known versions
            log.warning("router: registry refresh failed, keeping %s: %s", self._aliases, exc)
            return
        with self._lock:
            if aliases != self._aliases:
                log.info("router: registry aliases now %s", aliases)
            self._aliases = aliases
            self.state = self._compute()

    # -- deployments --
    def refresh_deployment(self) -> bool:
        """Re-read the active deployment; True when it changed (the aliases were re-read too)."""
        from sqlalchemy import select

        from tasks.core.db.engine import session_scope
        from tasks.core.db.models import Deployment

        try:
            with session_scope(self.engine) as session:
                row = session.execute(
                    select(Deployment)
                    .where(Deployment.active.is_(True),
                           Deployment.model_name == self.config.registered_model_name)
                    .order_by(Deployment.started_at.desc(), Deployment.id)
                    .limit(1)
                ).scalar_one_or_none()
                deployment = None if row is None else {
                    "id": row.id, "mode": row.mode, "share": float(row.share),
                    "champion_version": row.champion_version,
                    "challenger_version": row.challenger_version,
                }
        except Exception as exc:  # noqa: BLE001 - keep serving the last known deployment
            log.warning("router: deployment refresh failed, keeping the last one: %s", exc)
            return False
        for key in ("champion_version", "challenger_version"):
            if deployment and deployment[key]:
                self._lookup_is_base(str(deployment[key]))
        with self._lock:
            changed = deployment != self._deployment
            if changed:
                log.info("router: active deployment now %s", deployment)
            self._deployment = deployment
            self.state = self._compute()
        if changed:
            # A deployment starting or ending is when the aliases move (registration sets
            # challenger; applying a decision moves champion, then ends the deployment): read
            # them now rather than up to alias_ttl_s later.
            self.refresh_aliases()
        return changed

    def _compute(self) -> RoutingState:
        deployment = self._deployment
        versions: dict[str, str | None] = dict(self._aliases)
        source = "registry" if any(versions.values()) else "default"
        mode, share, deployment_id = "off", 0.0, None
        if deployment is not None:
            deployment_id = deployment["id"]
            mode, share = deployment["mode"], deployment["share"]
            # A version pinned by the deployment wins over the alias: the comparison of a
            # deployment must be about the versions it names.
            for variant in VARIANTS:
                pinned = deployment[f"{variant}_version"]
                if pinned:
                    if versions[variant] and versions[variant] != pinned:
                        log.warning("router: deployment %s pins %s=%s, registry alias says %s",
                                    deployment_id, variant, pinned, versions[variant])
                    versions[variant] = str(pinned)
                    source = "deployment"
        if mode in ("canary", "mirror") and not versions["challenger"]:
            log.warning("router: mode %s without a challenger version; serving champion only",
                        mode)
            mode = "off"
        name = self.config.registered_model_name
        backend_models = {
            variant: self.config.backends[variant].model_for(
                versions[variant], name, is_base=self._is_base.get(versions[variant] or "", False)
            )
            for variant in VARIANTS
        }
        return RoutingState(deployment_id=deployment_id, mode=mode, share=share,
                            versions=versions, backend_models=backend_models, source=source)


# ---- rate limiting -----------------------------------------------------------------------------


class TokenBucketLimiter:
    """Token buckets keyed by string: `rate` tokens/s refill up to `burst`; LRU-bounded keys."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str, now: float | None = None) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


# ---- interaction log ---------------------------------------------------------------------------

_ROW_KEYS = ("id", "user_hash", "deployment_id", "variant", "model_name", "model_version",
             "context", "request_messages", "response", "latency_ms", "mirror_of", "status",
             "error", "stream", "ttft_ms", "created_at")


_SQL_TYPES = {"id": "text", "user_hash": "text", "deployment_id": "text", "variant": "text",
              "model_name": "text", "model_version": "text", "context": "jsonb",
              "request_messages": "jsonb", "response": "text", "latency_ms": "float8",
              "mirror_of": "text", "status": "text", "error": "text", "stream": "boolean",
              "ttft_ms": "float8", "created_at": "timestamptz"}


def interaction_row(**values: Any) -> dict[str, Any]:
    """A complete interactions row (every column present, so batches insert as one statement)."""
    unknown = set(values) - set(_ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown interaction columns {sorted(unknown)}")
    row: dict[str, Any] = {"deployment_id": None, "model_version": None, "context": {},
                           "request_messages": [], "response": "", "latency_ms": 0.0,
                           "mirror_of": None, "status": "ok", "error": None, "stream": False,
                           "ttft_ms": None, "created_at": datetime.now(UTC)}
    row.update(values)
    return row


class InteractionLog:
    """A bounded queue drained by one writer thread into `interactions` in batched upserts.

    `submit` never blocks the caller (a full queue drops the row and counts it); `wait_written`
    lets the reactions API wait for an interaction that is still queued; `close` flushes.
    """

    _STOP = object()

    def __init__(self, engine: Any, *, batch_size: int = 256, flush_interval_s: float = 0.2,
                 queue_max: int = 100_000) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._insert_stmt: Any = None
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.batches = 0

    def start(self) -> InteractionLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="interaction-log",
                                            daemon=True)
            self._thread.start()
        return self

    def submit(self, row: dict[str, Any]) -> bool:
        with self._cond:
            self._pending.add(row["id"])
        try:
            self._queue.put_nowait(row)
            return True
        except queue.Full:
            with self._cond:
                self._pending.discard(row["id"])
                self.dropped += 1
            log.error("interaction log queue full; dropped interaction %s", row["id"])
            return False

    def is_pending(self, interaction_id: str) -> bool:
        return interaction_id in self._pending

    def wait_written(self, interaction_id: str, timeout_s: float = 5.0) -> bool:
        """Block until `interaction_id` is no longer queued; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: interaction_id not in self._pending, timeout_s)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything submitted so far is written (or dropped); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout_s)

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "failed": self.failed,
                "batches": self.batches, "queued": self._queue.qsize()}

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush everything queued, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("interaction log did not flush within %.0f s", timeout_s)
        self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is self._STOP:
                break
            batch: list[dict[str, Any]] = [first]
            # Linger up to flush_interval_s for more rows: under load a batch fills up and one
            # statement carries many rows; when idle a row waits at most flush_interval_s.
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = (self._queue.get(timeout=remaining) if remaining > 0
                            else self._queue.get_nowait())
                except queue.Empty:
                    break
                if item is self._STOP:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
        # Whatever is still queued after the stop marker (late mirror copies) is written too.
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not self._STOP:
                rest.append(item)
        for start in range(0, len(rest), self.batch_size):
            self._write(rest[start:start + self.batch_size])

    def _write(self, batch: list[dict[str, Any]]) -> None:
        # A client retry with the same X-Request-Id lands on the same id: keep the last.
        rows = list({row["id"]: row for row in batch}.values())
        if not self._insert(rows) and len(rows) > 1:
            # One unstorable row must not cost the whole batch: write the rows one by one.
            for row in rows:
                self._insert([row])
        with self._cond:
            self._pending.difference_update(row["id"] for row in batch)
            self._cond.notify_all()

    def _statement(self) -> Any:
        """INSERT ... SELECT FROM jsonb_to_recordset(:rows) ON CONFLICT (id) DO UPDATE.

        The whole batch travels as one JSON document (one C-speed json.dumps here, parsed by
        PostgreSQL) in one constant statement, where the generic `upsert` helper compiles a new
        multi-VALUES statement per batch and an executemany runs one INSERT per row.
        """
        if self._insert_stmt is None:
            from sqlalchemy import text

            columns = ", ".join(_ROW_KEYS)
            record = ", ".join(f"{key} {_SQL_TYPES[key]}" for key in _ROW_KEYS)
            updates = ", ".join(f"{key} = EXCLUDED.{key}" for key in _ROW_KEYS if key != "id")
            self._insert_stmt = text(
                f"INSERT INTO interactions ({columns}) SELECT {columns} "
                f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS u({record}) "
                f"ON CONFLICT (id) DO UPDATE SET {updates}")
        return self._insert_stmt

    def _insert(self, rows: list[dict[str, Any]], attempts: int = 3) -> bool:
        from sqlalchemy.exc import InterfaceError, OperationalError

        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    conn.execute(self._statement(), {"rows": batch_json(rows)})
                self.written += len(rows)
                self.batches += 1
                return True
            except (OperationalError, InterfaceError) as exc:  # the database went away: retry
                if attempt + 1 == attempts:
                    error: Exception = exc
                    break
                time.sleep(0.2 * (attempt + 1))
            except Exception as exc:  # noqa: BLE001 - data errors do not heal on retry
                error = exc
                break
        if len(rows) == 1:
            self.failed += 1
            log.error("interaction log: dropping interaction %s: %s", rows[0]["id"],
                      str(error).splitlines()[0])
        return False


def _clean_text(value: str) -> str:
    """Text PostgreSQL can store: no NUL characters, no lone UTF-16 surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in an interaction row")


def batch_json(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON array PostgreSQL can store: client text may carry NUL characters
    or lone surrogates, which PostgreSQL rejects; those (rare) batches are cleaned first."""
    encoded = json.dumps(rows, default=_json_default, ensure_ascii=False)
    try:
        encoded.encode("utf-8")
        clean = "\\u0000" not in encoded
    except UnicodeEncodeError:
        clean = False
    if not clean:
        encoded = json.dumps(_clean(rows), default=_json_default, ensure_ascii=False)
    return encoded


# ---- request/response models -------------------------------------------------------------------


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


# ---- upstream transport ------------------------------------------------------------------------


class BackendUnavailable(Exception):
    """A backend could not be reached or broke off (network error or timeout)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class UpstreamResponse:
    """A complete (non-streamed) backend response."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class UpstreamStream:
    """An open streamed backend response: `status_code`, `aiter_raw()`, `aread()`, `aclose()`."""

    def __init__(self, status_code: int, chunks: AsyncIterator[bytes], close: Any) -> None:
        self.status_code = status_code
        self._chunks = chunks
        self._close = close
        self._closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - normalise the client library's errors
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Release the backend connection; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        result = self._close()
        if asyncio.iscoroutine(result):
            await result


class HttpxUpstream:
    """Pooled `httpx.AsyncClient`."""

    name = "httpx"

    def __init__(self, max_connections: int) -> None:
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=min(64, max_connections),
                              keepalive_expiry=60)
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0, connect=5.0))

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> UpstreamResponse:
        try:
            response = await self.client.post(url, content=body, headers=headers,
                                              timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, httpx.TimeoutException)) from exc
        return UpstreamResponse(response.status_code, response.content)

    async def stream(self, url: str, body: bytes, headers: dict[str, str],
                     timeout_s: float) -> UpstreamStream:
        request = self.client.build_request("POST", url, content=body, headers=headers,
                                            timeout=timeout_s)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, httpx.TimeoutException)) from exc
        return UpstreamStream(response.status_code, response.aiter_raw(), response.aclose)

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpUpstream:
    """Pooled `aiohttp.ClientSession`: the same job for a fraction of httpcore's CPU per request
    (its pool scans every connection per request; see bench/router.py)."""

    name = "aiohttp"

    def __init__(self, max_connections: int) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    def _timeout(self, timeout_s: float, *, stream: bool) -> Any:
        if stream:  # a long answer may stream for a while: bound the gaps, not the total
            return self._aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=timeout_s)
        return self._aiohttp.ClientTimeout(total=timeout_s, connect=5.0)

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> UpstreamResponse:
        try:
            async with self.session.post(url, data=body, headers=headers,
                                         timeout=self._timeout(timeout_s, stream=False)) as resp:
                return UpstreamResponse(resp.status, await resp.read())
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, TimeoutError)) from exc

    async def stream(self, url: str, body: bytes, headers: dict[str, str],
                     timeout_s: float) -> UpstreamStream:
        try:
            resp = await self.session.post(url, data=body, headers=headers,
                                           timeout=self._timeout(timeout_s, stream=True))
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, TimeoutError)) from exc
        return UpstreamStream(resp.status, resp.content.iter_any(), resp.release)

    async def aclose(self) -> None:
        await self.session.close()


def make_upstream(http_backend: str, max_connections: int) -> HttpxUpstream | AiohttpUpstream:
    """`auto`: aiohttp when installed, else httpx."""
    if http_backend == "auto":
        import importlib.util

        http_backend = "aiohttp" if importlib.util.find_spec("aiohttp") else "httpx"
    if http_backend == "aiohttp":
        return AiohttpUpstream(max_connections)
    return HttpxUpstream(max_connections)


# ---- the app -----------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <router API key>")
BEARER = Depends(_bearer)  # the credentials dependency of every /v1 route


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


def _validation_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ())][1:]  # drop "body" / "header"
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
    return JSONResponse(status_code=422, content={
        "error": {"message": message, "type": "invalid_request_error", "param": param,
                  "code": "invalid_value"},
        "detail": json.loads(json.dumps(errors, default=str)),
    })


def _http_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


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
            response = _validation_error_response(request, exc)
        except Rejected as exc:
            response = exc.response
        except Exception:  # noqa: BLE001 - what ServerErrorMiddleware would do, as JSON
            log.exception("router: unhandled error in %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal router error; see the router log",
                                      type_="api_error", code="internal_error")
        await response(scope, receive, send)


def create_router_app(config: RouterConfig | None = None, *, engine: Any = None) -> FastAPI:
    """The router app. `engine`: a SQLAlchemy engine (default: from config.database_url)."""
    config = config or RouterConfig.from_settings()
    if engine is None:
        from tasks.core.db.engine import _engine_for, get_engine

        engine = _engine_for(config.database_url) if config.database_url else get_engine()
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
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(Rejected, _rejected_response)

    api = APIRouter(prefix="/v1")

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, Any]:
        # Liveness only: it needs no key, so it names no deployment (GET /v1/router/state does,
        # behind the key).
        return {"status": "ok"}

    @api.get("/models", response_model=ModelList, responses={401: _ERRORS[401]},
             tags=["openai"])
    async def list_models(
        credentials: HTTPAuthorizationCredentials | None = BEARER,
    ) -> Any:
        if router.authenticate(credentials) is None:
            return _unauthorized()
        return ModelList(data=[ModelCard(id=config.public_model)])

    @api.get("/router/state", responses={401: _ERRORS[401]}, tags=["ops"])
    async def router_state(
        credentials: HTTPAuthorizationCredentials | None = BEARER,
    ) -> Any:
        if router.authenticate(credentials) is None:
            return _unauthorized()
        return {"routing": router.resolver.state.as_dict(), "log": router.log.stats(),
                "mirror_skipped": router.mirror_skipped}

    @api.post(
        "/chat/completions", tags=["openai"],
        responses={**_ERRORS, 404: {"model": ErrorResponse, "description": "unknown model"},
                   200: {"description": "a chat completion (JSON) or an SSE stream",
                         "content": {"text/event-stream": {}}}},
        openapi_extra=_CHAT_OPENAPI,
    )
    async def chat_completions(request: Request) -> Any:
        # The hot path reads headers and validates the body itself: FastAPI's per-request
        # parameter resolution cost about a third of the router's CPU per request. The OpenAPI
        # document still describes the body and headers (_CHAT_OPENAPI).
        started = time.perf_counter()
        headers = request.headers
        key_id = router.authenticate_header(headers.get("authorization"))
        if key_id is None:
            return _unauthorized()
        data, body = await validated_body(request, ChatCompletionRequest)
        try:
            x_user_id = _header(headers, "x-user-id", 256)
            x_request_id = _header(headers, "x-request-id", 200)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]) from None
        user_id = body.user or x_user_id
        user_hash = hash_user(user_id if user_id else f"anon:{_random_id()}", router._salt)
        limited = router.rate_limited(key_id, user_hash if user_id else None)
        if limited is not None:
            return limited
        if body.model != config.public_model:
            return error_response(
                404, f"The model {body.model!r} does not exist; use {config.public_model!r}",
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
            return await _stream(router, state, variant, payload, row_base, started, mirror)
        return await _complete(router, state, variant, payload, row_base, started, mirror)

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, str]:
        return {"service": "tuneloop router", "openapi": "/openapi.json"}

    from serving.reactions import reactions_router

    api.include_router(reactions_router(router))
    app.include_router(api)
    app.fast_routes = {("POST", "/v1/chat/completions"): chat_completions}
    _pin_public_model_in_schema(app, config.public_model)
    return app


class Rejected(Exception):  # noqa: N818 - it carries the response, it is not an error
    """Raised by a route dependency (auth, rate limit) to answer `response` at once: FastAPI
    calls dependencies before it validates the body, so a bad key is a 401 whatever it sent."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _rejected_response(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Rejected)
    return exc.response


async def validated_body(request: Request, model: type[ModelT]) -> tuple[Any, ModelT]:
    """(the JSON as sent, `model` validated from it) for routes that read their body by hand,
    after authentication: invalid JSON is a 400, an invalid field a 422 naming it."""
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise Rejected(error_response(400, f"the body is not valid JSON: {exc}",
                                      code="invalid_json")) from None
    try:
        return data, model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]) from None


def _unauthorized() -> JSONResponse:
    return error_response(401, "missing or invalid API key; send Authorization: Bearer <key>",
                          type_="authentication_error", code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})


_ID_RANDOM = random.Random(int.from_bytes(os.urandom(16), "big"))


def _random_id() -> str:
    """A 128-bit random hex id (interaction ids are unique, not secret: no syscall per id)."""
    return f"{_ID_RANDOM.getrandbits(128):032x}"


def _header(headers: Mapping[str, str], name: str, max_length: int) -> str | None:
    value = headers.get(name)
    if value is not None and len(value) > max_length:
        raise RequestValidationError([{
            "type": "string_too_long", "loc": ("header", name),
            "msg": f"String should have at most {max_length} characters",
            "input": value[:50], "ctx": {"max_length": max_length}}])
    return value


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
            from serving.reactions import ReactionIn

            reaction_schema = ReactionIn.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(reaction_schema.pop("$defs", {}))
            components["ReactionIn"] = reaction_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _response_headers(interaction_id: str, variant: str, version: str | None) -> dict[str, str]:
    headers = {HEADER_INTERACTION: interaction_id, HEADER_VARIANT: variant}
    if version:
        headers[HEADER_VERSION] = version
    return headers


def _backend_failed(response: UpstreamResponse | UpstreamStream | None,
                    exc: Exception | None) -> bool:
    return exc is not None or (response is not None and response.status_code >= 500)


def _log_failed_attempt(router: Router, state: RoutingState, row_base: dict[str, Any],
                        variant: str, model: str, detail: str, started: float) -> None:
    """A challenger attempt that failed before the champion answered in its place gets its own
    `backend_error` row (id derived from the served interaction's, which its context names), so
    the challenger's error rate counts it and the shadow report's error guard can roll back."""
    router.log.submit(interaction_row(
        **{**row_base, "id": stable_id(row_base["id"], "failed-attempt", variant),
           "context": {**row_base["context"], "fallback_to": row_base["id"]}},
        variant=variant, model_name=model, model_version=state.versions[variant],
        latency_ms=(time.perf_counter() - started) * 1000.0, status="backend_error",
        error=detail[:2000]))


async def _complete(router: Router, state: RoutingState, variant: str, payload: dict[str, Any],
                    row_base: dict[str, Any], started: float, mirror: bool) -> Response:
    """Non-streaming: forward, fall back to the champion if the challenger fails, log, answer."""
    response: UpstreamResponse | None = None
    error: BackendUnavailable | None = None
    for attempt_variant in ((variant, "champion") if variant == "challenger" else (variant,)):
        payload["model"] = state.backend_models[attempt_variant]
        response, error = None, None
        try:
            response = await router.post_json(attempt_variant, payload)
        except BackendUnavailable as exc:
            error = exc
        if not _backend_failed(response, error):
            if attempt_variant != variant:
                row_base["context"]["fallback_from"] = variant
            variant = attempt_variant
            break
        detail = str(error) if error else f"HTTP {response.status_code if response else '?'}"
        log.warning("router: %s backend failed (%s)", attempt_variant, detail)
        if attempt_variant != "champion":
            _log_failed_attempt(router, state, row_base, attempt_variant, payload["model"],
                                detail, started)
    latency_ms = (time.perf_counter() - started) * 1000.0
    row = interaction_row(**row_base, variant=variant, model_name=payload["model"],
                          model_version=state.versions[variant], latency_ms=latency_ms)
    headers = _response_headers(row["id"], variant, state.versions[variant])
    if response is None or response.status_code >= 500:
        detail = str(error) if error else f"HTTP {response.status_code}"
        row.update(status="backend_error", error=detail[:2000])
        router.log.submit(row)
        timed_out = error is not None and error.timed_out
        return error_response(504 if timed_out else 502, f"backend {variant} failed: {detail}",
                              type_="api_error", code="backend_error", headers=headers)
    if response.status_code >= 400:
        row.update(status="rejected", error=response.text[:2000])
        router.log.submit(row)
        return Response(response.content, status_code=response.status_code,
                        media_type="application/json", headers=headers)
    try:
        data = response.json()
    except ValueError:
        row.update(status="backend_error", error="backend returned invalid JSON")
        router.log.submit(row)
        return error_response(502, f"backend {variant} returned invalid JSON", type_="api_error",
                              code="backend_error", headers=headers)
    row["response"] = completion_text(data)
    router.log.submit(row)
    if mirror:
        router.start_mirror(payload=payload, parent_id=row["id"], user_hash=row["user_hash"],
                            state=state, context=row_base["context"],
                            messages=row_base["request_messages"])
    if isinstance(data, dict):
        data["interaction_id"] = row["id"]
    return Response(json.dumps(data).encode(), media_type="application/json", headers=headers)


async def _stream(router: Router, state: RoutingState, variant: str, payload: dict[str, Any],
                  row_base: dict[str, Any], started: float, mirror: bool) -> Response:
    """Streaming: open the backend stream (falling back before the first byte), pass it through."""
    upstream: UpstreamStream | None = None
    error: BackendUnavailable | None = None
    for attempt_variant in ((variant, "champion") if variant == "challenger" else (variant,)):
        payload["model"] = state.backend_models[attempt_variant]
        upstream, error = None, None
        try:
            upstream = await router.open_stream(attempt_variant, payload)
        except BackendUnavailable as exc:
            error = exc
        if not _backend_failed(upstream, error):
            if attempt_variant != variant:
                row_base["context"]["fallback_from"] = variant
            variant = attempt_variant
            break
        if upstream is not None:
            await upstream.aclose()
        if attempt_variant != "champion":
            detail = str(error) if error else f"HTTP {upstream.status_code if upstream else '?'}"
            _log_failed_attempt(router, state, row_base, attempt_variant, payload["model"],
                                detail, started)
    row = interaction_row(**row_base, variant=variant, model_name=payload["model"],
                          model_version=state.versions[variant])
    headers = _response_headers(row["id"], variant, state.versions[variant])
    if upstream is None or upstream.status_code >= 400:
        if upstream is not None and upstream.status_code < 500:
            body = await upstream.aread()
            await upstream.aclose()
            row.update(status="rejected", error=body[:2000].decode(errors="replace"),
                       latency_ms=(time.perf_counter() - started) * 1000.0)
            router.log.submit(row)
            return Response(body, status_code=upstream.status_code,
                            media_type="application/json", headers=headers)
        detail = str(error) if error else (
            f"HTTP {upstream.status_code}" if upstream is not None else "no response")
        row.update(status="backend_error", error=detail[:2000],
                   latency_ms=(time.perf_counter() - started) * 1000.0)
        router.log.submit(row)
        timed_out = error is not None and error.timed_out
        return error_response(504 if timed_out else 502, f"backend {variant} failed: {detail}",
                              type_="api_error", code="backend_error", headers=headers)
    if mirror:
        router.start_mirror(payload=payload, parent_id=row["id"], user_hash=row["user_hash"],
                            state=state, context=row_base["context"],
                            messages=row_base["request_messages"])

    text = SSEText()
    logged = False

    def log_once(status: str, error_text: str | None) -> None:
        nonlocal logged
        if not logged:
            logged = True
            row.update(response=text.text, status=status, error=error_text,
                       latency_ms=(time.perf_counter() - started) * 1000.0)
            router.log.submit(row)

    async def passthrough() -> AsyncIterator[bytes]:
        status, error_text = "client_disconnected", None
        try:
            async for chunk in upstream.aiter_raw():
                if row["ttft_ms"] is None:
                    row["ttft_ms"] = (time.perf_counter() - started) * 1000.0
                text.feed(chunk)
                yield chunk
            status = "ok"
        except BackendUnavailable as exc:
            status, error_text = "backend_error", str(exc)
        finally:
            log_once(status, error_text)
            await upstream.aclose()

    async def closed() -> None:
        # A client gone before the body generator first ran never enters its `finally`.
        log_once("client_disconnected", None)
        await upstream.aclose()

    return _ClosingStream(passthrough(), closed, media_type="text/event-stream",
                          headers={**headers, "Cache-Control": "no-cache"})


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close` once it is over, however it ended
    (finished, client gone before the first chunk, task cancelled)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


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
