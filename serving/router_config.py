"""The router's configuration: `RouterConfig` (backends, registered model, keys, salt, limits,
log batching) with one `BackendConfig` per variant, filled from the environment by
`RouterConfig.from_settings()`; the variant and mode names, the presets for how a registered
version is named on a backend, and `RouterError`, raised when the router cannot start or serve.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator, model_validator

from tasks.core.configs import http_url
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
