"""The router's configuration: `RouterConfig` (backends, registered model, named API clients and
the admin key — stored as digests, never the keys — salt, registry signing key and state file,
rate and request limits, replay and reaction windows, log batching) with one `BackendConfig` per
variant, filled from the environment by `RouterConfig.from_settings()`; `key_digest`, how a key
is stored ("sha256:<hex>"); where the routing state is kept (`default_state_path`); the variant
and mode names, the presets for how a registered version is named on a backend, and
`RouterError`, raised when the router cannot start or serve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from tasks.core.configs import http_url
from tasks.core.secrets import (
    CLIENT_NAME,
    CLIENT_NAME_RULE,
    DEV_MODEL_SERVER_API_KEY,
    DEV_REGISTRY_SIGNING_KEY,
    MAKE_A_SECRET,
    normalized_digest,
)
from tasks.core.secrets import key_digest as key_digest  # re-exported: one definition, in core
from tasks.core.settings import DEFAULT_LOCAL_MODEL, Settings, get_settings

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

LEGACY_CLIENT = "default"  # the client TUNELOOP_ROUTER_API_KEY (and `api_keys`) stands for
_MAKE_CLIENT = ("make one with `tuneloop secrets client NAME` (it prints the key once and the "
                "TUNELOOP_ROUTER_CLIENTS entry with its digest), or by hand: key=$(" + MAKE_A_SECRET
                + ") and store \"sha256:\" + the hex SHA-256 of the key, never the key itself")


def default_state_path(data_dir: Path, registered_model_name: str) -> Path:
    """Where the router keeps its last known good state for one registered model."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", registered_model_name).strip("-.") or "default"
    return data_dir / f"router-state-{safe}.json"


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
    api_key: SecretStr = SecretStr(DEV_MODEL_SERVER_API_KEY)
    base_model: str = DEFAULT_LOCAL_MODEL
    model_template: str = "local"
    timeout_s: float = 120.0

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value, "http://127.0.0.1:8300/v1")

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

    # Errors never echo what was given: a mistaken clients entry is often a raw key.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    backends: dict[str, BackendConfig]
    registered_model_name: str
    public_model: str = ""  # the model id clients send; defaults to registered_model_name
    # Named API clients: name -> key_digest(key) ("sha256:<64 hex>"). The name is the identity
    # stored as client_id on interactions and reactions, and the unit of the key rate limit.
    clients: dict[str, str] = Field(default_factory=dict)
    # Raw keys of the one-key set-up (TUNELOOP_ROUTER_API_KEY): each is one more client, the
    # first named "default", then "default-2", ... (for tests and scripts; deployments use
    # `clients`).
    api_keys: list[SecretStr] = Field(default_factory=list)
    # key_digest(admin key): the control routes (GET /v1/router/state) take this key and no
    # client key. None: no admin key, the control routes answer 401/403 to everyone.
    admin_key_sha256: str | None = None
    user_hash_salt: SecretStr
    # The key registry versions are signed with (tasks.core.signing): only a version whose
    # signature verifies under it is served. The default is the development key.
    registry_signing_key: SecretStr = SecretStr(DEV_REGISTRY_SIGNING_KEY)
    # Where the last known good routing state is kept (from_settings: default_state_path under
    # the data dir); None: in memory only, a restart starts from nothing.
    state_path: Path | None = None
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
    # Request limits: a larger body is a 413; more messages, or a longer message, a 422.
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_content_chars: int = 100_000
    # A reaction is accepted within this many seconds of its interaction.
    reaction_window_s: float = 7 * 24 * 3600.0
    # How long a request waits on a database read (a reaction's check, a request id's lookup,
    # a replayed answer) before it takes the outage path: a reaction is checked against the
    # recent interactions held in memory and queued by the log; a request id is taken as new.
    db_wait_s: float = 3.0
    # X-Request-Id replays: how long a client's request id names its interaction for a retry,
    # and how many (client, request id) pairs the router holds in memory (beyond them, or
    # before it loaded the recent ones, an id not in memory is looked up in the database).
    request_id_window_s: float = 24 * 3600.0
    request_ids_max: int = 100_000
    # Interactions held in memory for the reactions outage path (client, user, time, variant).
    recent_interactions_max: int = 100_000
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

    @field_validator("clients")
    @classmethod
    def _clients(cls, value: dict[str, str]) -> dict[str, str]:
        clients = {}
        for name, digest in value.items():
            if not CLIENT_NAME.fullmatch(name):
                raise ValueError(
                    f"TUNELOOP_ROUTER_CLIENTS: client name {name[:80]!r} is not "
                    f"{CLIENT_NAME_RULE}; rename it, e.g. {{\"web\": \"sha256:...\"}}")
            try:
                clients[name] = normalized_digest(
                    digest, f"TUNELOOP_ROUTER_CLIENTS: client {name!r}")
            except ValueError as exc:
                raise ValueError(f"{exc}; {_MAKE_CLIENT}") from None
        return clients

    @field_validator("admin_key_sha256")
    @classmethod
    def _admin_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalized_digest(value, "admin_key_sha256")
        except ValueError as exc:
            raise ValueError(f"{exc}; build it with serving.router_config.key_digest(<the "
                             "TUNELOOP_ROUTER_ADMIN_KEY value>)") from None

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value() for k in value):
            raise ValueError("api_keys holds an empty key; set TUNELOOP_ROUTER_API_KEY=<a long "
                             f"random string> ({MAKE_A_SECRET}) or leave it out")
        return value

    @field_validator("alias_ttl_s", "deployment_ttl_s", "log_flush_interval_s",
                     "reaction_window_s", "db_wait_s", "request_id_window_s")
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
                     "log_queue_max", "mirror_max_in_flight", "max_connections",
                     "max_body_bytes", "max_messages", "max_content_chars", "request_ids_max",
                     "recent_interactions_max")
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

    @model_validator(mode="after")
    def _one_key_per_identity(self) -> RouterConfig:
        """Fold `api_keys` into `clients`; every client (and the admin) needs a key of its own."""
        for index, key in enumerate(self.api_keys):
            name = LEGACY_CLIENT if index == 0 else f"{LEGACY_CLIENT}-{index + 1}"
            digest = key_digest(key.get_secret_value())
            if self.clients.get(name, digest) != digest:
                raise ValueError(
                    f"TUNELOOP_ROUTER_CLIENTS names a client {name!r}, and "
                    f"TUNELOOP_ROUTER_API_KEY is the client {name!r} too; rename the one in "
                    "TUNELOOP_ROUTER_CLIENTS or unset TUNELOOP_ROUTER_API_KEY")
            self.clients[name] = digest
        if not self.clients:
            raise ValueError(
                "the router has no API client; set TUNELOOP_ROUTER_CLIENTS='{\"web\": "
                "\"sha256:<hex>\"}' (" + _MAKE_CLIENT + "), or TUNELOOP_ROUTER_API_KEY")
        # The router finds a key by the first 8 bytes of its digest, then compares all 32.
        owners: dict[str, str] = {}
        identities = [*(f"client {name!r}" for name in self.clients), "TUNELOOP_ROUTER_ADMIN_KEY"]
        for identity, digest in zip(identities, [*self.clients.values(), self.admin_key_sha256],
                                    strict=True):
            if digest is None:
                continue
            other = owners.setdefault(digest[:23], identity)  # "sha256:" + 16 hex digits
            if other != identity:
                raise ValueError(
                    f"TUNELOOP_ROUTER_CLIENTS: {other} and {identity} have the same key; "
                    f"give each its own (the key is the identity), {_MAKE_CLIENT}")
        return self

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> RouterConfig:
        """Backends from TUNELOOP_ROUTER_{CHAMPION,CHALLENGER}_BASE_URL (default: the local
        model server, called with TUNELOOP_MODEL_SERVER_API_KEY), clients from
        TUNELOOP_ROUTER_CLIENTS (+ TUNELOOP_ROUTER_API_KEY as "default", through `api_keys`),
        the admin key, the registry signing key, the state file under the data dir, limits,
        salt and registered model from settings; `overrides` win."""
        settings = settings or get_settings()
        template = settings.router_model_template
        champion_url = settings.router_champion_base_url or settings.local_model_server_url
        challenger_url = settings.router_challenger_base_url
        backend_key = settings.model_server_api_key
        admin_key = settings.router_admin_key.get_secret_value()
        values: dict[str, Any] = {
            "backends": {
                "champion": BackendConfig(base_url=champion_url, model_template=template,
                                          base_model=settings.llm_model, api_key=backend_key),
                "challenger": BackendConfig(base_url=challenger_url or champion_url,
                                            model_template=template,
                                            base_model=settings.llm_model, api_key=backend_key),
            },
            "registered_model_name": settings.registered_model_name,
            "clients": settings.router_clients,
            "api_keys": [key] if (key := settings.router_legacy_key()) else [],
            "admin_key_sha256": key_digest(admin_key) if admin_key else None,
            "max_body_bytes": settings.router_max_body_bytes,
            "max_messages": settings.router_max_messages,
            "max_content_chars": settings.router_max_content_chars,
            "reaction_window_s": settings.router_reaction_window_s,
            "user_hash_salt": settings.user_hash_salt,
            "registry_signing_key": settings.registry_signing_key,
            "database_url": settings.database_url,
            "tracking_uri": settings.resolved_mlflow_tracking_uri,
            "rate_limit_per_s": settings.router_user_rate_limit_per_s,
            "rate_limit_burst": settings.router_user_rate_limit_burst,
            "key_rate_limit_per_s": settings.router_key_rate_limit_per_s,
            "key_rate_limit_burst": settings.router_key_rate_limit_burst,
        }
        values.update(overrides)
        values.setdefault("state_path", default_state_path(settings.data_dir,
                                                           values["registered_model_name"]))
        return cls(**values)
