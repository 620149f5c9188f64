"""`CurationConfig`: what a curated dataset keeps, how it is gated and how it is exported.

Every row filter threshold, the length bounds, the gate-only checks and the export settings live
here, validated with errors that name the fix; blank strings from Airflow Params mean unset and
unknown keys fail (`CurationConfig.from_params`). `fingerprint()` is what the dataset records as
its filters and what is hashed (with the exported rows) into the curated snapshot's id, so a
changed default changes the dataset id.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.configs import at_least, field_default, split_fraction
from tasks.datasets.export import EXPORT_FORMATS

KNOWN_TAGGERS = ("emotion", "topic", "temporal", "belief", "hallucination")
DEFAULT_REQUIRED_TAGGERS = ("emotion", "topic", "temporal", "hallucination")
DEFAULT_TOKENIZER = "smollm2-135m-instruct"


class CurationError(ValueError):
    """Curation cannot run as configured; the message says what to change."""


class CurationConfig(BaseModel):
    """What a curated dataset keeps, how it is gated and how it is exported."""

    model_config = ConfigDict(extra="forbid")

    name: str = "curated"
    batch_id: str | None = None
    # row filters (seed 000 §6)
    max_hallucination: float | None = 0.1
    min_emotion_confidence: float | None = None
    required_taggers: list[str] = Field(default_factory=lambda: list(DEFAULT_REQUIRED_TAGGERS))
    require_rubric_pass: bool = True
    rubric_policy: Literal["both", "either"] = "both"
    rubric_version: str | None = None
    dedup_threshold: float | None = 0.95
    dedup_method: Literal["auto", "exact", "lsh"] = "auto"
    exact_limit: int = 20000
    # length bounds (filter and gate)
    max_turns: int = 20
    min_words: int = 5
    max_words: int = 4000
    sequence_len: int | None = 2048
    tokenizer: str | None = DEFAULT_TOKENIZER
    exact_token_counts: bool = False
    # gate-only checks
    edge_case_target: float | None = None
    edge_case_tolerance: float | None = 0.05
    min_rows: int = 10
    min_topic_diversity: int = 3
    min_persona_diversity: int = 3
    # export
    val_fraction: float = 0.1
    seed: int = 13
    formats: list[Literal["openai", "sharegpt", "alpaca"]] = Field(
        default_factory=lambda: list(EXPORT_FORMATS))
    scrub_persona_names: bool = True
    # Numbered placeholders (<PERSON_1>, <EMAIL_1>) consistent within a conversation instead of
    # plain typed ones: who said what stays readable, nobody is identified.
    pseudonymize: bool = False

    @field_validator("batch_id", "rubric_version", "tokenizer", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("max_hallucination")
    @classmethod
    def _max_hallucination(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"max_hallucination must be within [0, 1] (got {value}); "
                             "set max_hallucination: 0.1, or null to disable the filter")
        return value

    @field_validator("min_emotion_confidence")
    @classmethod
    def _min_confidence(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"min_emotion_confidence must be within [0, 1] (got {value}); "
                             "it is the emotion tagger's confidence, e.g. "
                             "min_emotion_confidence: 0.5")
        return value

    @field_validator("required_taggers")
    @classmethod
    def _taggers(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in KNOWN_TAGGERS]
        if unknown:
            raise ValueError(f"unknown tagger(s) {unknown} in required_taggers; use any of "
                             f"{list(KNOWN_TAGGERS)}, e.g. required_taggers: "
                             f"{list(DEFAULT_REQUIRED_TAGGERS)}")
        return list(dict.fromkeys(value))

    @field_validator("dedup_threshold")
    @classmethod
    def _dedup(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"dedup_threshold is a cosine similarity in (0, 1] (got {value}); "
                             "set dedup_threshold: 0.95, or null to keep near duplicates")
        return value

    @field_validator("edge_case_target")
    @classmethod
    def _edge_target(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"edge_case_target is a share in [0, 1] (got {value}); set "
                             "edge_case_target: 0.15, or null to read it from the taxonomy")
        return value

    @field_validator("edge_case_tolerance")
    @classmethod
    def _edge_tolerance(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"edge_case_tolerance must be within [0, 1) (got {value}); set "
                             "edge_case_tolerance: 0.05, or null to skip the edge-case check")
        return value

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, value: float) -> float:
        return split_fraction(value)

    @field_validator("min_rows", "min_topic_diversity", "min_persona_diversity", "max_turns",
                     "exact_limit")
    @classmethod
    def _at_least_one(cls, value: int, info: Any) -> int:
        return at_least(value, 1, info.field_name, field_default(cls, info.field_name))

    @field_validator("min_words")
    @classmethod
    def _min_words(cls, value: int) -> int:
        return at_least(value, 0, "min_words", 5)

    @field_validator("sequence_len")
    @classmethod
    def _sequence_len(cls, value: int | None) -> int | None:
        if value is not None and value < 16:
            raise ValueError(f"sequence_len must be >= 16 tokens (got {value}); use the trainer's "
                             "sequence_len, e.g. sequence_len: 2048")
        return value

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("formats must name at least one export format; set formats: "
                             "[openai, sharegpt, alpaca] (the trainer reads openai)")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> CurationConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words}); "
                             "set e.g. min_words: 5 and max_words: 4000")
        return self

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> CurationConfig:
        """Build from Airflow Params (or any dict); blank strings mean unset, unknown keys fail."""
        from tasks.core.configs import config_from_params

        return config_from_params(cls, params, CurationError, "curation")

    def fingerprint(self, edge_case_target: float | None) -> dict[str, Any]:
        """The filters and thresholds recorded on the dataset (and hashed into its id)."""
        data = self.model_dump(mode="json", exclude={"name"})
        data["edge_case_target"] = edge_case_target
        return data
