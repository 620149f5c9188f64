"""The reaction-signal dataset's config: reaction windows, minimums, pairing and export."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.configs import at_least, field_default, split_fraction
from tasks.datasets.export import EXPORT_FORMATS


class SignalConfigError(ValueError):
    """The reaction-signal configuration is invalid; the message says the fix."""



class SignalConfig(BaseModel):
    """Reaction windows, minimums, pairing and export of a reaction-signal dataset."""

    model_config = ConfigDict(extra="forbid")

    name: str = "reactions"
    positive_reaction: str = "done"
    negative_reaction: str = "dismiss"
    done_min_ms: int = 15000
    done_max_ms: int = 120000
    dismiss_max_ms: int = 5000
    min_positive: int = 500
    min_negative: int = 500
    since_dataset_id: str | None = None
    model_name: str | None = None
    pair_by_embedding: bool = True
    pair_similarity: float = 0.95
    val_fraction: float = 0.1
    seed: int = 13
    formats: list[Literal["openai", "sharegpt", "alpaca"]] = Field(
        default_factory=lambda: list(EXPORT_FORMATS))
    # Numbered placeholders (<PERSON_1>, <EMAIL_1>) consistent within an interaction instead of
    # plain typed ones: who said what stays readable, nobody is identified.
    pseudonymize: bool = False
    # At most this many examples (SFT rows and DPO sides together) from one hashed user — or
    # one API client's anonymous traffic — per dataset, so one prolific (or hostile) user cannot
    # steer the model; 0 = no cap. Which examples stay is a stable hash order of their ids.
    max_examples_per_user: int = 50

    @field_validator("since_dataset_id", "model_name", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("done_min_ms", "done_max_ms", "dismiss_max_ms", "min_positive",
                     "min_negative", "max_examples_per_user")
    @classmethod
    def _non_negative(cls, value: int, info: Any) -> int:
        return at_least(value, 0, info.field_name, field_default(cls, info.field_name))

    @field_validator("pair_similarity")
    @classmethod
    def _similarity(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"pair_similarity is a cosine in (0, 1] (got {value}); "
                             "set pair_similarity: 0.95")
        return value

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, value: float) -> float:
        return split_fraction(value)

    @model_validator(mode="after")
    def _windows(self) -> SignalConfig:
        if self.done_min_ms > self.done_max_ms:
            raise ValueError(f"done_min_ms ({self.done_min_ms}) > done_max_ms "
                             f"({self.done_max_ms}); the positive window is e.g. "
                             "done_min_ms: 15000, done_max_ms: 120000")
        if self.positive_reaction == self.negative_reaction:
            raise ValueError("positive_reaction and negative_reaction must differ; "
                             "e.g. positive_reaction: done, negative_reaction: dismiss")
        return self

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> SignalConfig:
        from tasks.core.configs import config_from_params

        return config_from_params(cls, params, SignalConfigError, "signal")

    def fingerprint(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"name"})
