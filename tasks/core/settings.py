"""One settings object for tuneloop, read from environment variables (and a `.env` file).

Every knob a deployment turns lives here; nothing else in the package reads `os.environ`.
Unset values fall back to embedded, offline defaults: an embedded PostgreSQL (pgserver) under
the data directory, a local MLflow store with a model registry, and the local SmolLM2 model
server for every LLM role. A wrong value fails at start with a message naming the variable and
an example of a right one.

TUNELOOP_ENV=production (what docker-compose.yaml sets) refuses to start on a secret that is
unset, a publicly known default or too short (those defaults, and the redaction helpers, are in
tasks.core.secrets, which reads no environment): every service, DAG task and CLI command builds
its settings here, so none can run with the development keys. The checks, all reported at once:

- always: TUNELOOP_USER_HASH_SALT, TUNELOOP_ROUTER_ADMIN_KEY, the router's client keys
  (TUNELOOP_ROUTER_CLIENTS digests, or TUNELOOP_ROUTER_API_KEY), TUNELOOP_MODEL_SERVER_API_KEY,
  TUNELOOP_MODEL_SERVER_ADMIN_KEY, TUNELOOP_REGISTRY_SIGNING_KEY, TUNELOOP_LLM_API_KEY (and
  the per-role keys) when it is the model server's development key, the DATABASE_URL password;
- in an Airflow process (one with AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, or its _CMD / _SECRET
  form, set: every Airflow component needs its metadata database, while AIRFLOW_HOME is set in
  every container of the Airflow image, the router's too): AIRFLOW__API_AUTH__JWT_SECRET,
  AIRFLOW__CORE__FERNET_KEY and, where set, AIRFLOW_ADMIN_PASSWORD;
- with an http(s) MLFLOW_TRACKING_URI: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the
  MLflow basic-auth app's client login), or MLFLOW_TRACKING_TOKEN.

`tuneloop secrets init` writes a .env with a fresh value for each; `tuneloop secrets check` runs
the checks without starting anything.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.core.configs import http_url
from tasks.core.secrets import (
    CLIENT_NAME,
    CLIENT_NAME_RULE,
    DEV_MODEL_SERVER_ADMIN_KEY,
    DEV_MODEL_SERVER_API_KEY,
    DEV_REGISTRY_SIGNING_KEY,
    DEV_ROUTER_ADMIN_KEY,
    DEV_ROUTER_API_KEY,
    DEV_USER_HASH_SALT,
    FRESH_PASSWORD,
    FRESH_SECRET,
    KNOWN_DEFAULT_SECRETS,
    MAKE_A_FERNET_KEY,
    MAKE_A_SECRET,
    MIN_PASSWORD_CHARS,
    MIN_SECRET_CHARS,
    normalized_digest,
    redact_url,
    secret_problem,
)

LLM_ROLES = ("generator", "user_sim", "tagger", "judge", "judge2")
LlmRole = Literal["generator", "user_sim", "tagger", "judge", "judge2"]

DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_SERVER_PORT = 8300
DEFAULT_ROUTER_PORT = 8400
# Set in every Airflow component (each needs its metadata database) and in no tuneloop service.
AIRFLOW_PROCESS_VARIABLES = ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                             "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD",
                             "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET")


def _plain(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _in_production(info: ValidationInfo) -> bool:
    return info.data.get("env") == "production"


def _require_secret(value: SecretStr | str | None, info: ValidationInfo, *,
                    min_chars: int = MIN_SECRET_CHARS, fix: str = FRESH_SECRET) -> None:
    if not _in_production(info):
        return
    problem = secret_problem(_plain(value), min_chars=min_chars)
    if problem:
        raise ValueError(f"{problem}, and TUNELOOP_ENV=production; {fix}")


class SettingsError(ValueError):
    """A configuration value is wrong; the message names the variable and a valid example."""


class Endpoint(BaseModel):
    """An OpenAI-compatible endpoint and the model to call on it."""

    base_url: str
    model: str
    api_key: SecretStr = SecretStr(DEV_MODEL_SERVER_API_KEY)
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
    llm_api_key: SecretStr = Field(default=SecretStr(DEV_MODEL_SERVER_API_KEY),
                                   validate_default=True)
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
    router_api_key: SecretStr = Field(default=SecretStr(DEV_ROUTER_API_KEY),
                                      validate_default=True)
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
    router_clients: dict[str, str] = Field(default_factory=dict, validate_default=True)
    router_admin_key: SecretStr = Field(default=SecretStr(DEV_ROUTER_ADMIN_KEY),
                                        validate_default=True)
    # Request limits: a larger body is a 413, more messages or a longer message a 422.
    router_max_body_bytes: int = 1_000_000
    router_max_messages: int = 256
    router_max_content_chars: int = 100_000
    # A reaction is accepted only from the client (and end user) that got the answer, and only
    # within this many seconds of it.
    router_reaction_window_s: float = 7 * 24 * 3600.0
    # The local model server's keys: every route but liveness needs the API key; adapter
    # registration and removal need the admin key.
    model_server_api_key: SecretStr = Field(default=SecretStr(DEV_MODEL_SERVER_API_KEY),
                                            validate_default=True)
    model_server_admin_key: SecretStr = Field(default=SecretStr(DEV_MODEL_SERVER_ADMIN_KEY),
                                              validate_default=True)
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
    registry_signing_key: SecretStr = Field(default=SecretStr(DEV_REGISTRY_SIGNING_KEY),
                                            validate_default=True)
    # Raw interaction text (prompts, answers, context) older than this many days is purged by
    # the nightly run (`tuneloop retention`); unset keeps it.
    retention_days: int | None = None
    user_hash_salt: SecretStr = Field(default=SecretStr(DEV_USER_HASH_SALT),
                                      validate_default=True)
    # A spaCy model (installed package name or model folder) whose NER adds PERSON names to
    # de-identification; unset = the offline recognizers alone (tasks.datasets.deid.detect).
    deid_spacy_model: str | None = None
    # Failed DAG tasks are POSTed here as JSON; its path is a credential (Slack, Teams).
    alert_webhook: SecretStr | None = None
    registered_model_name: str = "tuneloop-assistant"
    trainer_backend: Literal["local", "docker", "kubernetes"] = "local"
    trainer_image: str = "tuneloop-trainer:latest"
    # When Airflow itself runs in a container (docker compose), the docker training backend asks
    # the host's daemon to bind-mount run folders: the host path of TUNELOOP_DATA_DIR, and the
    # network the trainer joins (to reach an http:// MLflow).
    host_data_dir: str | None = None
    trainer_network: str | None = None

    # ---- other programs' secrets, read only to refuse known defaults in production ----------
    # Airflow: its metadata database marks an Airflow process (module docstring); the JWT secret
    # signs the tokens tasks use against the API server; the Fernet key encrypts Connection
    # passwords (empty: stored in clear). Each may come as the _CMD / _SECRET form instead (or
    # the JWT as a private key file): then Airflow resolves it and it is not checked here.
    airflow_metadata_db: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices(*AIRFLOW_PROCESS_VARIABLES))
    airflow_jwt_secret_elsewhere: str | None = Field(default=None, validation_alias=AliasChoices(
        "AIRFLOW__API_AUTH__JWT_SECRET_CMD", "AIRFLOW__API_AUTH__JWT_SECRET_SECRET",
        "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH"))
    airflow_jwt_secret: SecretStr | None = Field(
        default=None, validation_alias="AIRFLOW__API_AUTH__JWT_SECRET", validate_default=True)
    airflow_fernet_key_elsewhere: str | None = Field(default=None, validation_alias=AliasChoices(
        "AIRFLOW__CORE__FERNET_KEY_CMD", "AIRFLOW__CORE__FERNET_KEY_SECRET"))
    airflow_fernet_key: SecretStr | None = Field(
        default=None, validation_alias="AIRFLOW__CORE__FERNET_KEY", validate_default=True)
    # What airflow-init writes into SimpleAuthManager's passwords file (set there only).
    airflow_admin_password: SecretStr | None = Field(
        default=None, validation_alias="AIRFLOW_ADMIN_PASSWORD")
    # MLflow's client login (the basic-auth app), read by the MLflow client from the same
    # variables; a token (MLFLOW_TRACKING_TOKEN) replaces them.
    mlflow_tracking_token: SecretStr | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_TOKEN")
    mlflow_tracking_username: str | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_USERNAME", validate_default=True)
    mlflow_tracking_password: SecretStr | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_PASSWORD", validate_default=True)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # URLs (DATABASE_URL above all) carry passwords; SecretStr fields mask themselves.
        for name, value in super().__repr_args__():
            if name and name.endswith(("_url", "_uri", "_urls")):
                if isinstance(value, str):
                    value = redact_url(value)
                elif isinstance(value, list):
                    value = [redact_url(v) if isinstance(v, str) else v for v in value]
            yield name, value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
            raise ValueError(
                f"DATABASE_URL={redact_url(value)!r} is not a PostgreSQL URL; use e.g. "
                "postgresql://user:password@localhost:5432/tuneloop, or unset it for an "
                "embedded PostgreSQL"
            )
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _database_password(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _in_production(info):
            return value
        try:
            password = urlsplit(value).password
        except ValueError:
            password = None
        if password and password in KNOWN_DEFAULT_SECRETS:
            raise ValueError(
                f"{redact_url(value)!r} uses a publicly known database password, and "
                "TUNELOOP_ENV=production; set POSTGRES_PASSWORD (docker compose) or the URL's "
                f"password to a fresh one: `tuneloop secrets init`, or {MAKE_A_SECRET}")
        return value

    @field_validator("llm_base_url", "router_champion_base_url", "router_challenger_base_url",
                     *(f"{r}_base_url" for r in LLM_ROLES))
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"{redact_url(value)!r} is not an http(s) URL; use e.g. http://127.0.0.1:8300/v1"
            )
        return value.rstrip("/")

    # ---- production: no development or publicly known secret (module docstring) ------------
    @field_validator("user_hash_salt")
    @classmethod
    def _salt(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Hashed user ids are only as private as the salt: a public one is reversed with a
        # dictionary of emails. Dev mode keeps the documented default for the offline demo.
        _require_secret(value, info)
        return value

    @field_validator("router_admin_key", "model_server_api_key", "registry_signing_key")
    @classmethod
    def _production_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        _require_secret(value, info)
        return value

    @field_validator("router_api_key")
    @classmethod
    def _router_api_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Left at the development default it is simply no client in production (see
        # router_legacy_key); TUNELOOP_ROUTER_CLIENTS then has to name one.
        if _in_production(info) and value.get_secret_value() != DEV_ROUTER_API_KEY:
            _require_secret(value, info)
        return value

    @field_validator("router_clients")
    @classmethod
    def _router_clients(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        # Names and digests are checked (and digests normalised) in every mode, as the router
        # checks them (serving.router_config), so dev accepts exactly what production does.
        example = ("`tuneloop secrets client NAME` makes a key and prints the "
                   "TUNELOOP_ROUTER_CLIENTS JSON with its digest")
        clients = {}
        for name, digest in value.items():
            if not CLIENT_NAME.fullmatch(name):
                raise ValueError(f"client name {name[:80]!r} is not {CLIENT_NAME_RULE}; rename "
                                 'it, e.g. {"web": "sha256:..."}')
            try:
                clients[name] = normalized_digest(digest, f"client {name!r}")
            except ValueError as exc:
                raise ValueError(f"{exc}; {example}") from None
        api_key = info.data.get("router_api_key")
        if _in_production(info) and not clients and \
                (api_key is None or api_key.get_secret_value() == DEV_ROUTER_API_KEY):
            raise ValueError(
                "names no client and TUNELOOP_ROUTER_API_KEY is unset or the development "
                f"default, and TUNELOOP_ENV=production: the router would take no key but the "
                f"public one; {example} (`tuneloop secrets init` writes a first one)")
        return clients

    @field_validator("model_server_admin_key")
    @classmethod
    def _model_server_admin_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        _require_secret(value, info)
        api_key = info.data.get("model_server_api_key")
        if _in_production(info) and api_key is not None and \
                api_key.get_secret_value() == value.get_secret_value():
            raise ValueError(
                "equals TUNELOOP_MODEL_SERVER_API_KEY, and TUNELOOP_ENV=production: every "
                f"caller would be an admin; {FRESH_SECRET}")
        return value

    @field_validator("llm_api_key", *(f"{r}_api_key" for r in LLM_ROLES))
    @classmethod
    def _llm_api_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if _in_production(info) and value is not None and \
                value.get_secret_value() == DEV_MODEL_SERVER_API_KEY:
            raise ValueError(
                "is the model server's development key, and TUNELOOP_ENV=production; set it to "
                "the LLM endpoint's key: for the local model server or vLLM the value of "
                "TUNELOOP_MODEL_SERVER_API_KEY (`tuneloop secrets init` writes both)")
        return value

    @field_validator("airflow_jwt_secret")
    @classmethod
    def _airflow_jwt_secret(cls, value: SecretStr | None,
                            info: ValidationInfo) -> SecretStr | None:
        if _airflow_checks(info) and not info.data.get("airflow_jwt_secret_elsewhere"):
            # Anyone with a known JWT secret can mint tokens for the execution and public APIs.
            _require_secret(value, info, min_chars=32, fix=FRESH_SECRET + " (32+ characters)")
        return value

    @field_validator("airflow_fernet_key")
    @classmethod
    def _airflow_fernet_key(cls, value: SecretStr | None,
                            info: ValidationInfo) -> SecretStr | None:
        if not _airflow_checks(info) or info.data.get("airflow_fernet_key_elsewhere"):
            return value
        fix = (f"set it to a key from `tuneloop secrets init` (AIRFLOW_FERNET_KEY in .env) or "
               f"{MAKE_A_FERNET_KEY}; rotate with `new,old` and `airflow rotate-fernet-key`")
        keys = [k.strip() for k in _plain(value).split(",")] if value is not None else []
        if not any(keys):
            raise ValueError("is empty, and TUNELOOP_ENV=production: Airflow would store "
                             f"Connection passwords in clear; {fix}")
        from cryptography.fernet import Fernet

        for position, key in enumerate(keys, start=1):
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(f"key {position} of {len(keys)} is not a Fernet key (32 "
                                 f"url-safe base64-encoded bytes); {fix}") from None
        return value

    @field_validator("airflow_admin_password")
    @classmethod
    def _airflow_admin_password(cls, value: SecretStr | None,
                                info: ValidationInfo) -> SecretStr | None:
        if value is not None and _airflow_checks(info):
            _require_secret(value, info, min_chars=MIN_PASSWORD_CHARS, fix=FRESH_PASSWORD)
        return value

    @field_validator("mlflow_tracking_username")
    @classmethod
    def _mlflow_username(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not _mlflow_auth_checks(info):
            return value
        if not value:
            raise ValueError(
                "is unset, the tracking URI is an MLflow server and TUNELOOP_ENV=production; "
                "set the MLflow user tuneloop logs in as (MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD: `tuneloop secrets init` writes both, and the "
                "compose mlflow service creates that user), or MLFLOW_TRACKING_TOKEN")
        if value == "admin":
            raise ValueError(
                "is MLflow's default admin user, and TUNELOOP_ENV=production; log in as a "
                "user of its own (`tuneloop secrets init` writes MLFLOW_TRACKING_USERNAME="
                "tuneloop), so the admin login stays with whoever manages MLflow")
        return value

    @field_validator("mlflow_tracking_password")
    @classmethod
    def _mlflow_password(cls, value: SecretStr | None,
                         info: ValidationInfo) -> SecretStr | None:
        if _mlflow_auth_checks(info):
            _require_secret(value, info, min_chars=MIN_PASSWORD_CHARS, fix=FRESH_PASSWORD)
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
    def is_airflow_process(self) -> bool:
        return self.airflow_metadata_db is not None

    def router_legacy_key(self) -> SecretStr | None:
        """TUNELOOP_ROUTER_API_KEY when it is a router client (RouterConfig.from_settings adds
        it to TUNELOOP_ROUTER_CLIENTS as the client "default"): set and, in production, not the
        development default (which production never accepts)."""
        key = self.router_api_key.get_secret_value()
        if key and (self.env == "dev" or key != DEV_ROUTER_API_KEY):
            return self.router_api_key
        return None

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


def _airflow_checks(info: ValidationInfo) -> bool:
    return _in_production(info) and info.data.get("airflow_metadata_db") is not None


def _mlflow_auth_checks(info: ValidationInfo) -> bool:
    uri = info.data.get("mlflow_tracking_uri") or ""
    return (_in_production(info) and uri.startswith(("http://", "https://"))
            and info.data.get("mlflow_tracking_token") is None)


def env_name(field: str) -> str:
    """The environment variable a settings field (or an error's location) is read from."""
    info = Settings.model_fields.get(field)
    if info is None:  # already a variable name: the alias the value came in by
        return field.upper()
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"TUNELOOP_{field.upper()}"


def _error_line(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a model-level rule: its message names the variables itself
        return message
    return f"{env_name(str(error['loc'][0]))}: {message}"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; raise SettingsError naming each bad variable, one
    line per problem, all of them at once."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [_error_line(err) for err in exc.errors()]
        raise SettingsError("invalid tuneloop configuration:\n  " + "\n  ".join(lines)) from None


class _RouterClientsOnly(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELOOP_", env_file=".env", extra="ignore")

    router_clients: dict[str, str] = Field(default_factory=dict)


def read_router_clients(env_file: str | Path | None = ".env") -> dict[str, str]:
    """TUNELOOP_ROUTER_CLIENTS as the settings read it (environment, then `env_file`), without
    the other checks: a production environment without a client must still be able to add one."""
    try:
        return dict(_RouterClientsOnly(_env_file=env_file).router_clients)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = [_error_line(err) for err in exc.errors()]
        raise SettingsError("invalid tuneloop configuration:\n  " + "\n  ".join(lines)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached). Tests call `get_settings.cache_clear()` after env edits."""
    return load_settings()
