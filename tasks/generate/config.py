"""`GenerationConfig`: every knob of a generation batch, validated with errors that say the fix.

The config crosses Airflow XCom as a plain dict (`model_dump(mode="json")`) and is stored on the
batch row, so a shard task can rebuild it. `batch_id()` is deterministic: it hashes the fields
that change what gets generated (count, turns, seed, persona set, models, sampling params and
the content hashes of the taxonomy, persona and prompt files) and ignores the ones that only
change how the work is run (shard size, concurrency, preview, dedup thresholds, base URLs).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.configs import at_least
from tasks.core.ids import canonical_json, stable_id
from tasks.core.settings import Endpoint, Settings, get_settings
from tasks.generate.dedup import DEFAULT_CONVERSATION_THRESHOLD, DEFAULT_OPENING_THRESHOLD

MAX_TURNS = 20
MAX_COUNT = 1_000_000


class GenerationError(RuntimeError):
    """A generation step cannot proceed; carries the batch id and what to do."""

    def __init__(self, message: str, *, batch_id: str | None = None) -> None:
        self.batch_id = batch_id
        super().__init__(message)


class GenerationConfig(BaseModel):
    """Parameters of one generation batch (CLI flags, DAG Params and the batch row agree)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    count: int = 20
    turns: int = 2
    persona_set: str = "default"
    persona_pool_size: int = 50
    seed: int = 42
    preview: int = 0
    shard_size: int = 100
    concurrency: int = 16

    generator_base_url: str | None = None
    generator_model: str | None = None
    user_sim_base_url: str | None = None
    user_sim_model: str | None = None
    temperature: float = 0.8
    top_p: float | None = None
    max_tokens: int = 384
    # Stop sequences for plain user turns (not documents), e.g. ["\n\n"]: small local models
    # keep writing past the first paragraph; a user message is one paragraph.
    user_stop: list[str] = Field(default_factory=list)
    # The same for assistant turns (e.g. ["\n\n"] for a one-paragraph reply from a small model),
    # and their own token budget (None: max_tokens).
    assistant_stop: list[str] = Field(default_factory=list)
    assistant_max_tokens: int | None = Field(default=None, ge=1)
    document_max_tokens: int = 1600
    timeout_s: float | None = None
    max_retries: int = 5
    use_cache: bool = True
    # Rerun items stored as failed (ok and duplicate ones are always kept).
    retry_failed: bool = False

    edge_case_share: float | None = None
    document_share: float = 0.0
    assistant_name: str = "Tune"

    dedup: bool = True
    opening_threshold: float = DEFAULT_OPENING_THRESHOLD
    conversation_threshold: float = DEFAULT_CONVERSATION_THRESHOLD

    taxonomy_path: str | None = None
    personas_path: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_options(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown generation option(s) {unknown}; valid options are "
                    f"{', '.join(cls.model_fields)}"
                )
        return data

    @field_validator("count")
    @classmethod
    def _count(cls, value: int) -> int:
        if not 1 <= value <= MAX_COUNT:
            raise ValueError(f"count must be within [1, {MAX_COUNT}], got {value}; e.g. count: 100")
        return value

    @field_validator("turns")
    @classmethod
    def _turns(cls, value: int) -> int:
        if not 1 <= value <= MAX_TURNS:
            raise ValueError(
                f"turns must be within [1, {MAX_TURNS}], got {value}; use turns: 1 for a single "
                "question/answer pair or turns: 3 for a short conversation"
            )
        return value

    @field_validator("persona_pool_size", "shard_size", "concurrency")
    @classmethod
    def _positive(cls, value: int, info: Any) -> int:
        examples = {"persona_pool_size": 50, "shard_size": 100, "concurrency": 16}
        return at_least(value, 1, info.field_name, examples[info.field_name])

    @field_validator("preview", "max_retries")
    @classmethod
    def _non_negative(cls, value: int, info: Any) -> int:
        return at_least(value, 0, info.field_name, 3 if info.field_name == "preview" else 5)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not 0.0 <= value <= 2.0:
            raise ValueError(f"temperature must be within [0, 2], got {value}; e.g. "
                             "temperature: 0.8 for varied conversations")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {value}; e.g. top_p: 0.95, "
                             "or leave it unset")
        return value

    @field_validator("max_tokens", "document_max_tokens")
    @classmethod
    def _tokens(cls, value: int, info: Any) -> int:
        return at_least(value, 16, info.field_name,
                        384 if info.field_name == "max_tokens" else 1600)

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"timeout_s must be > 0, got {value}; e.g. timeout_s: 120, or "
                             "leave it unset to use TUNELOOP_LLM_TIMEOUT_S")
        return value

    @field_validator("edge_case_share", "document_share")
    @classmethod
    def _share(cls, value: float | None, info: Any) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            example = "0.15" if info.field_name == "edge_case_share" else "0.1"
            raise ValueError(f"{info.field_name} must be within [0, 1], got {value}; "
                             f"e.g. {info.field_name}: {example}")
        return value

    @field_validator("opening_threshold", "conversation_threshold")
    @classmethod
    def _threshold(cls, value: float, info: Any) -> float:
        if not 0.0 < value <= 1.0:
            default = (DEFAULT_OPENING_THRESHOLD if info.field_name == "opening_threshold"
                       else DEFAULT_CONVERSATION_THRESHOLD)
            raise ValueError(
                f"{info.field_name} is a cosine similarity and must be within (0, 1], got "
                f"{value}; e.g. {info.field_name}: {default} (set dedup: false to turn dedup off)"
            )
        return value

    @field_validator("generator_base_url", "user_sim_base_url")
    @classmethod
    def _url(cls, value: str | None, info: Any) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{info.field_name} {value!r} is not an http(s) URL; use e.g. "
                             "http://127.0.0.1:8300/v1")
        return value.rstrip("/")

    @field_validator("generator_model", "user_sim_model", "taxonomy_path", "personas_path")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _files_and_sets(self) -> GenerationConfig:
        from tasks.generate.personas import load_personas
        from tasks.generate.taxonomy import load_taxonomy

        load_taxonomy(self.taxonomy_path)  # raises TaxonomyError (a ValueError) with the fix
        personas = load_personas(self.personas_path)
        if self.persona_set not in personas.persona_sets:
            raise ValueError(
                f"persona_set {self.persona_set!r} is not defined in {personas.path}; use one of "
                f"{', '.join(sorted(personas.persona_sets))}"
            )
        return self

    # ---- derived values -------------------------------------------------------------------
    def endpoint(self, role: str, settings: Settings | None = None) -> Endpoint:
        """The endpoint for role generator/user_sim: settings, then this config's overrides."""
        settings = settings or get_settings()
        base = settings.endpoint(role)  # type: ignore[arg-type]
        update: dict[str, Any] = {"max_concurrency": max(self.concurrency, 1)}
        if getattr(self, f"{role}_base_url"):
            update["base_url"] = getattr(self, f"{role}_base_url")
        if getattr(self, f"{role}_model"):
            update["model"] = getattr(self, f"{role}_model")
        if self.timeout_s:
            update["timeout_s"] = self.timeout_s
        return Endpoint(**{**base.model_dump(), **update})

    def fallback_endpoints(self, role: str, settings: Settings | None = None) -> list[Endpoint]:
        settings = settings or get_settings()
        primary = self.endpoint(role, settings)
        return [ep.model_copy(update={"model": primary.model, "timeout_s": primary.timeout_s})
                for ep in settings.fallback_endpoints(role)]  # type: ignore[arg-type]

    def identity(self, settings: Settings | None = None) -> dict[str, Any]:
        """What defines the batch's content (see the module docstring)."""
        from tasks.generate.personas import load_personas
        from tasks.generate.prompts import PromptLibrary
        from tasks.generate.taxonomy import load_taxonomy

        return {
            "count": self.count, "turns": self.turns, "seed": self.seed,
            "persona_set": self.persona_set, "persona_pool_size": self.persona_pool_size,
            "generator_model": self.endpoint("generator", settings).model,
            "user_sim_model": self.endpoint("user_sim", settings).model,
            "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_tokens, "document_max_tokens": self.document_max_tokens,
            "edge_case_share": self.edge_case_share, "document_share": self.document_share,
            "assistant_name": self.assistant_name,
            "taxonomy": load_taxonomy(self.taxonomy_path).content_hash,
            "personas": load_personas(self.personas_path).content_hash,
            "templates": PromptLibrary().template_hashes(),
        }

    def batch_id(self, settings: Settings | None = None) -> str:
        return stable_id("generation_batch", canonical_json(self.identity(settings)))


def coerce_config(cfg: GenerationConfig | dict[str, Any]) -> GenerationConfig:
    """Accept a config object or its dict form (as it arrives through XCom)."""
    if isinstance(cfg, GenerationConfig):
        return cfg
    if isinstance(cfg, dict):
        return GenerationConfig(**cfg)
    raise TypeError(f"expected GenerationConfig or dict, got {type(cfg).__name__}")
