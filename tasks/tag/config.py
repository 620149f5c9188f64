"""`TaggingConfig`: what one tagging and judging run does, from DAG Params or code.

Every field has a working default and every validation error says the fix. Besides the fields it
resolves what a run needs: the endpoint of each LLM role with this config's overrides
(`endpoint`), each tagger's backend ("auto" picks MiniLM label similarity for the classification
taggers when the tagger role points at the bundled 135M model, the LLM otherwise;
`backend_for`), the tagger instances (`build_taggers`) and the rubric (`rubric`). The stage
functions that take it live in `tasks.tag.stage`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.settings import DEFAULT_LOCAL_MODEL, Endpoint, get_settings
from tasks.judge.rubric import Rubric, load_rubric
from tasks.judge.stage import JUDGE_SLOTS
from tasks.tag.backends import get_tagger
from tasks.tag.taggers import TAGGER_NAMES, TAGGERS, BaseTagger

__all__ = ["EMBEDDING_CAPABLE", "BackendChoice", "TaggingConfig"]

BackendChoice = Literal["auto", "llm", "embedding", "heuristic"]
# "auto": the bundled 135M model rarely writes valid JSON, so when the tagger role points at it the
# classification taggers use MiniLM label similarity instead; any other model gets the LLM.
EMBEDDING_CAPABLE = ("emotion", "topic", "temporal")


class TaggingConfig(BaseModel):
    """What one tagging run does. Every field has a working default; errors say the fix."""

    model_config = ConfigDict(extra="forbid")

    taggers: list[str] = Field(default_factory=lambda: list(TAGGER_NAMES))
    backends: dict[str, BackendChoice] = Field(default_factory=dict)
    # Attempts per (conversation, tagger) and run; the seed pipeline used `--retries 20`.
    retries: int = 3
    tagger_base_url: str | None = None
    tagger_model: str | None = None
    judges: list[Literal["judge", "judge2"]] = Field(default_factory=lambda: list(JUDGE_SLOTS))
    judge_base_urls: dict[Literal["judge", "judge2"], str] = Field(default_factory=dict)
    judge_models: dict[Literal["judge", "judge2"], str] = Field(default_factory=dict)
    # Measured by bench/tag.py (SmolLM2 tokenizer, 4-turn conversations, 11 criteria): combined
    # needs ~half the prompt tokens per conversation (~2.7k vs ~5.5k over 11 requests) but puts
    # everything in one ~2.7k-token prompt where one unparseable reply loses all 11 verdicts.
    # per_criterion keeps each prompt under ~600 tokens with its calibration examples right next
    # to its question and loses one verdict per failure, so it is the default; pick combined
    # for a strong, token-priced judge.
    judge_mode: Literal["per_criterion", "combined"] = "per_criterion"
    judge_retries: int = 3
    # Share of conversations the judge sees (1.0 = all). Membership is a hash of the
    # conversation id, so it is the same sample on every rerun and in every shard layout; use it
    # to bound judge cost (an audit sample) where every tagger still runs on everything.
    judge_sample_rate: float = Field(1.0, gt=0.0, le=1.0)
    policy: Literal["both", "either"] = "both"
    shard_size: int = 100
    batch_ids: list[str] | None = None
    max_in_flight: int = 64
    max_tokens: int = 512
    use_cache: bool = True
    timeout_s: float | None = None
    rubric_path: str | None = None

    @field_validator("taggers")
    @classmethod
    def _taggers(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TAGGERS]
        if unknown:
            raise ValueError(f"unknown taggers {unknown}; use some of {', '.join(TAGGER_NAMES)}")
        return list(dict.fromkeys(value))

    @field_validator("batch_ids", mode="before")
    @classmethod
    def _batch_ids(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("retries", "judge_retries")
    @classmethod
    def _retries(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"retries must be >= 1 (attempts per item), got {value}; e.g. 3, "
                             "or 20 as in the seed pipeline")
        return value

    @field_validator("shard_size", "max_in_flight", "max_tokens")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}; e.g. shard_size: 100, "
                             "max_in_flight: 64, max_tokens: 512")
        return value

    @field_validator("tagger_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"tagger_base_url {value!r} is not an http(s) URL; "
                             "e.g. http://127.0.0.1:8300/v1")
        return value

    @field_validator("judge_base_urls")
    @classmethod
    def _judge_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for slot, url in value.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"judge_base_urls[{slot}] {url!r} is not an http(s) URL; "
                                 "e.g. http://127.0.0.1:8300/v1")
        return value

    @model_validator(mode="after")
    def _backends(self) -> TaggingConfig:
        for name, backend in self.backends.items():
            if name not in TAGGERS:
                raise ValueError(f"backends names unknown tagger {name!r}; use some of "
                                 f"{', '.join(TAGGER_NAMES)}")
            if backend != "auto" and backend not in TAGGERS[name].backends:
                raise ValueError(
                    f"tagger {name!r} has no {backend!r} backend; set backends.{name} to one of "
                    f"{', '.join(('auto', *TAGGERS[name].backends))}"
                )
        return self

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> TaggingConfig:
        """Build from DAG Params / a UI trigger's conf.

        Besides the field names themselves: `classifier_backend` (backend for emotion, topic
        and temporal), `judge_policy` (= policy), `batch_id` ("" = all batches) and
        `judge_endpoints` ({slot: "base_url#model" or {"base_url", "model"}}).
        """
        values = dict(params or {})
        mapped: dict[str, Any] = {}
        classifier = values.pop("classifier_backend", None)
        if classifier:
            mapped["backends"] = dict.fromkeys(EMBEDDING_CAPABLE, classifier)
        if "judge_policy" in values:
            mapped["policy"] = values.pop("judge_policy")
        batch_id = values.pop("batch_id", None)
        if batch_id:
            mapped["batch_ids"] = [batch_id]
        for slot, spec in (values.pop("judge_endpoints", None) or {}).items():
            if isinstance(spec, str):
                base_url, _, model = spec.partition("#")
                spec = {"base_url": base_url, "model": model}
            if spec.get("base_url"):
                mapped.setdefault("judge_base_urls", {})[slot] = spec["base_url"]
            if spec.get("model"):
                mapped.setdefault("judge_models", {})[slot] = spec["model"]
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"unknown tagging params {unknown}; use TaggingConfig fields "
                f"({', '.join(cls.model_fields)}) or classifier_backend, judge_policy, batch_id, "
                "judge_endpoints")
        backends = {**mapped.pop("backends", {}), **(values.pop("backends", None) or {})}
        return cls(**values, **mapped, **({"backends": backends} if backends else {}))

    # ---- resolution -----------------------------------------------------------------------
    def endpoint(self, role: str) -> Endpoint:
        """The settings endpoint for `role` with this config's overrides. No per-endpoint
        concurrency limit is set, so `max_in_flight` alone bounds requests in flight."""
        base = get_settings().endpoint(role)  # type: ignore[arg-type]
        if role == "tagger":
            base_url, model = self.tagger_base_url, self.tagger_model
        else:
            base_url = self.judge_base_urls.get(role)  # type: ignore[call-overload]
            model = self.judge_models.get(role)  # type: ignore[call-overload]
        return Endpoint(base_url=base_url or base.base_url, model=model or base.model,
                        api_key=base.api_key, timeout_s=self.timeout_s or base.timeout_s)

    def backend_for(self, name: str) -> str:
        choice = self.backends.get(name, "auto")
        if choice != "auto":
            return choice
        if name in EMBEDDING_CAPABLE and self.endpoint("tagger").model == DEFAULT_LOCAL_MODEL:
            return "embedding"
        return "llm"

    def build_taggers(self) -> list[BaseTagger]:
        model = self.endpoint("tagger").model
        return [get_tagger(name, self.backend_for(name), model) for name in self.taggers]

    def rubric(self) -> Rubric:
        return load_rubric(Path(self.rubric_path) if self.rubric_path else None)


def conversation_scope(cfg: TaggingConfig) -> list[Any]:
    """The SQL conditions selecting the conversations a tagging run covers (ok, in its batches)."""
    from tasks.core.db.models import Conversation

    conditions = [Conversation.status == "ok"]
    if cfg.batch_ids:
        conditions.append(Conversation.batch_id.in_(cfg.batch_ids))
    return conditions
