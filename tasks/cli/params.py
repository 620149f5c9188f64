"""Config models for the shadow commands, whose stage functions take plain arguments: the
shadow_compare DAG's Params schema (and the deployment rules `deploy_challenger` enforces),
checked before anything is read, with errors that name the fix. Imported only when a shadow
command runs (pydantic stays out of `tuneloop --help`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.core.configs import at_least, config_from_params


class ShadowParamsError(ValueError):
    """A shadow command's arguments are invalid; the message names the field and the fix."""


class ShadowCompareParams(BaseModel):
    """The shadow_compare DAG's Params."""

    model_config = ConfigDict(extra="forbid")

    deployment_id: str = ""
    min_samples: int = 100
    alpha: float = 0.05
    apply_decision: bool = False

    @field_validator("min_samples")
    @classmethod
    def _min_samples(cls, value: int) -> int:
        return at_least(value, 1, "min_samples", 100)

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not 0.0 < value <= 0.5:
            raise ValueError(f"alpha must be within (0, 0.5] (got {value}); set alpha: 0.05")
        return value

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> ShadowCompareParams:
        return config_from_params(cls, params, ShadowParamsError, "shadow comparison")


class ShadowDeployParams(BaseModel):
    """train_and_register's shadow_mode / shadow_share Params, plus the versions to deploy."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["canary", "mirror"] = "canary"
    share: float = 0.05

    @field_validator("share")
    @classmethod
    def _share(cls, value: float, info: Any) -> float:
        from tasks.shadow.config import share_problem  # the rule deploy_challenger applies

        if (problem := share_problem(info.data.get("mode", "canary"), value)) is not None:
            raise ValueError(problem)
        return value

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> ShadowDeployParams:
        return config_from_params(cls, params, ShadowParamsError, "shadow deployment")
