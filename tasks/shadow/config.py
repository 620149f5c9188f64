"""Shadow-stage configuration: the deployment modes, the decisions, the variant names, the dwell
histogram bins, `SignalWindows` (which reactions count: a `done` with 15 s <= dwell <= 120 s is
positive, a `dismiss` with dwell < 5 s negative) and `ShadowError`, raised with the ids the user
needs to act when a deployment or comparison step cannot proceed. The decision thresholds
(`min_samples`, `alpha`) are arguments of `compare_variants` / `compare_and_report`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

MODES = ("canary", "mirror", "off")
DECISIONS = ("promote", "keep_collecting", "rollback")
Decision = Literal["promote", "keep_collecting", "rollback"]
CHAMPION, CHALLENGER = "champion", "challenger"
TERMINAL_REACTIONS = ("done", "dismiss")
DWELL_BINS_MS = (5_000, 15_000, 60_000, 120_000)  # histogram edges: <5s, 5-15s, 15-60s, ...
DWELL_BIN_LABELS = ("<5s", "5-15s", "15-60s", "60-120s", ">120s")


def share_problem(mode: str, share: float) -> str | None:
    """Why `share` does not fit `mode` (with the fix), or None: canary needs 0 < share <= 1 (the
    fraction of users the challenger serves), otherwise 0 <= share <= 1 (mirror: the fraction
    of users whose requests are copied)."""
    if mode == "canary" and not 0.0 < share <= 1.0:
        return (f"share must be within (0, 1] for canary (got {share}); "
                "set share: 0.05 (5% of users see the challenger)")
    if not 0.0 <= share <= 1.0:
        return (f"share must be within [0, 1] for {mode} (got {share}); "
                "set share: 1.0 (copy every request to the challenger)")
    return None


class ShadowError(RuntimeError):
    """A deployment/comparison step cannot proceed; carries the ids the user needs to act."""

    def __init__(self, message: str, *, deployment_id: str | None = None,
                 version: str | None = None) -> None:
        super().__init__(message)
        self.deployment_id = deployment_id
        self.version = version


class SignalWindows(BaseModel):
    """Which reactions count: done in the magic zone is positive, a quick dismiss negative."""

    model_config = ConfigDict(extra="forbid")

    done_min_ms: int = 15_000
    done_max_ms: int = 120_000
    dismiss_max_ms: int = 5_000  # exclusive: dwell < dismiss_max_ms

    @model_validator(mode="after")
    def _ordered(self) -> SignalWindows:
        if not 0 <= self.done_min_ms < self.done_max_ms:
            raise ValueError(
                f"need 0 <= done_min_ms < done_max_ms, got {self.done_min_ms} and "
                f"{self.done_max_ms}; e.g. done_min_ms: 15000, done_max_ms: 120000"
            )
        if self.dismiss_max_ms <= 0:
            raise ValueError(f"dismiss_max_ms must be > 0, got {self.dismiss_max_ms}; e.g. 5000")
        return self
