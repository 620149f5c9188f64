"""One settings object for tuneloop, read from environment variables (and a `.env` file).

Every knob a deployment turns lives here; nothing else in the package reads `os.environ`.
Unset values fall back to embedded, offline defaults: an embedded PostgreSQL (pgserver) under
the data directory, a local MLflow store with a model registry, and the local SmolLM2 model
server for every LLM role. A wrong value fails at start with a message naming the variable and
an example of a right one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.core.configs import http_url

LLM_ROLES = ("generator", "user_sim", "tagger", "judge", "judge2")
LlmRole = Literal["generator", "user_sim", "tagger", "judge", "judge2"]

DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_SERVER_PORT = 8300
DEFAULT_ROUTER_PORT = 8400
DEV_USER_HASH_SALT = "tuneloop-dev-salt-change-me"
DEV_ROUTER_API_KEY = "tuneloop-dev-key"
DEV_ROUTER_ADMIN_KEY = "tuneloop-dev-admin-key"
DEV_MODEL_SERVER_API_KEY = "tuneloop-local"
DEV_MODEL_SERVER_ADMIN_KEY = "tuneloop-local-admin"
DEV_REGISTRY_SIGNING_KEY = "tuneloop-dev-registry-key"
MAKE_A_SECRET = "python -c 'import secrets; print(secrets.token_hex(32))'"


class SettingsError(ValueError):
    """A configuration value is wrong; the message names the variable and a valid example."""


class Endpoint(BaseModel):
    """An OpenAI-compatible endpoint and the model to call on it."""

    base_url: str
    model: str
    api_key: SecretStr = SecretStr("tuneloop-local")
    timeout_s: float = 120.0
    max_concurrency: int = 16

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value, "http://127.0.0.1:8300/v1 or https://api.openai.com/v1")

    @field_validator("max_concurrency")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("max_concurrency must be >= 1; e.g. 16")
        return value

    def label(self) -> str:
        """A stable, secret-free name for provenance: `<base_url>#<model>`."""
        return f"{self.base_url}#{self.model}"


class Settings(BaseSettings):
    """Environment-driven configuration. See README "Configuration" for every variable."""

    model_config = SettingsConfigDict(
        env_prefix="TUNELOOP_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # dev (the default) or production: production refuses development-default secrets.
    env: Literal["dev", "production"] = "dev"
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    mlflow_tracking_uri: str | None = Field(default=None, validation_alias="MLFLOW_TRACKING_URI")
    data_dir: Path = Field(default=Path.home() / ".tuneloop")
    # Converted model folders (SmolLM2/tinycoder safetensors); defaults to <data_dir>/models.
    model_cache: Path | None = None

    # Default LLM endpoint for every role; each role may override base_url/model/api_key.
    llm_base_url: str | None = None
    llm_model: str = DEFAULT_LOCAL_MODEL
    llm_api_key: SecretStr = SecretStr("tuneloop-local")
    llm_timeout_s: float = 120.0
    llm_max_concurrency: int = 16
    llm_fallback_base_urls: list[str] = Field(default_factory=list)

    generator_base_url: str | None = None
    generator_model: str | None = None
    generator_api_key: SecretStr | None = None
    user_sim_base_url: str | None = None
    user_sim_model: str | None = None
    user_sim_api_key: SecretStr | None = None
    tagger_base_url: str | None = None
    tagger_model: str | None = None
    tagger_api_key: SecretStr | None = None
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: SecretStr | None = None
    judge2_base_url: str | None = None
    judge2_model: str | None = None
    judge2_api_key: SecretStr | None = None

    # Compute dtype of the local model server: auto = bfloat16 where the CPU computes it
    # natively (AVX512-BF16 / AMX; bench/dtype.py: 1.65x serving, 1.7x LoRA steps), else float32.
    model_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    model_server_host: str = "127.0.0.1"
    model_server_port: int = DEFAULT_MODEL_SERVER_PORT
    router_port: int = DEFAULT_ROUTER_PORT
    router_api_key: SecretStr = SecretStr(DEV_ROUTER_API_KEY)
    # Router backends (default: the local model server) and how versions are named on them:
    # a preset (local | vllm | ollama | openai) or a format string, see serving.router_config.
    router_champion_base_url: str | None = None
    router_challenger_base_url: str | None = None
    router_model_template: str = "local"
    # Token buckets (requests/s and burst; rate 0 disables): per end user (the body's `user` or
    # X-User-Id) and per API key over all its requests.
    router_user_rate_limit_per_s: float = 20.0
    router_user_rate_limit_burst: int = 40
    router_key_rate_limit_per_s: float = 1000.0
    router_key_rate_limit_burst: int = 2000
    # Named API clients: {"web": "sha256:<hex of the key>", ...} (JSON); each client has its own
    # key, stored hashed (`tuneloop secrets client NAME` makes one). TUNELOOP_ROUTER_API_KEY,
    # when set, is one more client named "default". The admin key guards the control routes.
    router_clients: dict[str, str] = Field(default_factory=dict)
    router_admin_key: SecretStr = SecretStr(DEV_ROUTER_ADMIN_KEY)
    # Request limits: a larger body is a 413, more messages or a longer message a 422.
    router_max_body_bytes: int = 1_000_000
    router_max_messages: int = 256
    router_max_content_chars: int = 100_000
    # A reaction is accepted only from the client (and end user) that got the answer, and only
    # within this many seconds of it.
    router_reaction_window_s: float = 7 * 24 * 3600.0
    # The local model server's keys: every route but liveness needs the API key; adapter
    # registration and removal need the admin key.
    model_server_api_key: SecretStr = SecretStr(DEV_MODEL_SERVER_API_KEY)
    model_server_admin_key: SecretStr = SecretStr(DEV_MODEL_SERVER_ADMIN_KEY)
    # Outages: interaction and reaction rows spool here (bounded) while Postgres is down, and
    # are replayed when it is back (default <data_dir>/spool).
    spool_dir: Path | None = None
    spool_max_bytes: int = 512 * 1024 * 1024
    # Database client timeouts (seconds): connecting, and any one statement.
    db_connect_timeout_s: float = 5.0
    db_statement_timeout_s: float = 60.0
    # MLflow HTTP client: per-request timeout (s) and retries (MLFLOW_HTTP_REQUEST_* env vars).
    mlflow_http_timeout_s: int = 10
    mlflow_http_max_retries: int = 2
    # Registry versions the router serves carry an HMAC of their registration tags made with
    # this key; a version without a valid one is never served.
    registry_signing_key: SecretStr = SecretStr(DEV_REGISTRY_SIGNING_KEY)
    # Raw interaction text (prompts, answers, context) older than this many days is purged by
    # the nightly run (`tuneloop retention`); unset keeps it.
    retention_days: int | None = None
    user_hash_salt: SecretStr = Field(default=SecretStr(DEV_USER_HASH_SALT),
                                      validate_default=True)
    # A spaCy model (installed package name or model folder) whose NER adds PERSON names to
    # de-identification; unset = the offline recognizers alone (tasks.datasets.deid.detect).
    deid_spacy_model: str | None = None
    registered_model_name: str = "tuneloop-assistant"
    trainer_backend: Literal["local", "docker", "kubernetes"] = "local"
    trainer_image: str = "tuneloop-trainer:latest"
    # When Airflow itself runs in a container (docker compose), the docker training backend asks
    # the host's daemon to bind-mount run folders: the host path of TUNELOOP_DATA_DIR, and the
    # network the trainer joins (to reach an http:// MLflow).
    host_data_dir: str | None = None
    trainer_network: str | None = None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
            raise ValueError(
                f"DATABASE_URL={value!r} is not a PostgreSQL URL; use e.g. "
                "postgresql://user:password@localhost:5432/tuneloop, or unset it for an "
                "embedded PostgreSQL"
            )
        return value

    @field_validator("llm_base_url", "router_champion_base_url", "router_challenger_base_url",
                     *(f"{r}_base_url" for r in LLM_ROLES))
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"{value!r} is not an http(s) URL; use e.g. http://127.0.0.1:8300/v1"
            )
        return value.rstrip("/")

    @field_validator("user_hash_salt")
    @classmethod
    def _salt(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Hashed user ids are only as private as the salt: a public one is reversed with a
        # dictionary of emails. Dev mode keeps the documented default for the offline demo.
        if info.data.get("env") == "production" and (
                value.get_secret_value() in ("", DEV_USER_HASH_SALT)
                or len(value.get_secret_value()) < 16):
            raise ValueError(
                "is unset, the development default or shorter than 16 characters, and "
                "TUNELOOP_ENV=production; set it to a fresh secret, e.g. the output of "
                f"{MAKE_A_SECRET}")
        return value

    @field_validator("llm_max_concurrency", "model_server_port", "router_port")
    @classmethod
    def _positive_int(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value}; e.g. 16 or 8300")
        return value

    @field_validator("router_user_rate_limit_per_s", "router_key_rate_limit_per_s")
    @classmethod
    def _rate(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0 requests/s (0 disables the limit), got {value}; "
                             "e.g. 20")
        return value

    @field_validator("router_user_rate_limit_burst", "router_key_rate_limit_burst")
    @classmethod
    def _burst(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1 request, got {value}; e.g. 40")
        return value

    # ---- derived values -------------------------------------------------------------------
    @property
    def local_model_server_url(self) -> str:
        return f"http://{self.model_server_host}:{self.model_server_port}/v1"

    def endpoint(self, role: LlmRole) -> Endpoint:
        """The endpoint for an LLM role, falling back to the default, then the local server."""
        if role not in LLM_ROLES:
            raise SettingsError(f"unknown LLM role {role!r}; use one of {', '.join(LLM_ROLES)}")
        base_url = getattr(self, f"{role}_base_url") or self.llm_base_url
        if base_url is None:
            base_url = self.local_model_server_url
        return Endpoint(
            base_url=base_url,
            model=getattr(self, f"{role}_model") or self.llm_model,
            api_key=getattr(self, f"{role}_api_key") or self.llm_api_key,
            timeout_s=self.llm_timeout_s,
            max_concurrency=self.llm_max_concurrency,
        )

    def fallback_endpoints(self, role: LlmRole) -> list[Endpoint]:
        primary = self.endpoint(role)
        return [
            Endpoint(base_url=url, model=primary.model, api_key=primary.api_key,
                     timeout_s=primary.timeout_s, max_concurrency=primary.max_concurrency)
            for url in self.llm_fallback_base_urls
        ]

    @property
    def resolved_mlflow_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        # A SQLite-backed store supports the model registry (a plain file store does not).
        return f"sqlite:///{(self.data_dir / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def model_cache_dir(self) -> Path:
        return (self.model_cache or self.data_dir / "models").resolve()

    @property
    def resolved_spool_dir(self) -> Path:
        return (self.spool_dir or self.data_dir / "spool").resolve()

    @property
    def mlflow_artifact_root(self) -> Path:
        return (self.data_dir / "mlflow" / "artifacts").resolve()


_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
}


def _env_name(field: str) -> str:
    return _ENV_NAMES.get(field, f"TUNELOOP_{field.upper()}")


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; raise SettingsError naming the bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"{_env_name(field)}: {err['msg']}")
        raise SettingsError("invalid tuneloop configuration:\n  " + "\n  ".join(lines)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached). Tests call `get_settings.cache_clear()` after env edits."""
    return load_settings()
