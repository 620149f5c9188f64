"""Pure scoring of the pairwise outcomes and the base-model gate; no model, no judge, no I/O.

Win rate over decided pairs with a tie as half a win (the both-orders rule that decides each pair
is `tasks.judge.pairwise.combine_orders`; a failed judgment drops the pair),
sequential ELO ratings (seed 002: start 1000, K-factor 32, pairs in scenario-file order, zero-sum)
and seed 001's go/no-go gate on the base model's rubric pass rate (>70% / 50-70% / <50%).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

ELO_START = 1000.0
ELO_K_FACTOR = 32.0
PairOutcome = Literal["tuned", "base", "tie"]


def win_rate(outcomes: Sequence[PairOutcome | None]) -> dict[str, Any]:
    """Counts and rates over decided pairs; win_rate counts a tie as half a win."""
    valid = [o for o in outcomes if o is not None]
    wins, losses, ties = valid.count("tuned"), valid.count("base"), valid.count("tie")
    n = len(valid)
    return {
        "pairs": len(outcomes), "decided": n, "failures": len(outcomes) - n,
        "wins": wins, "losses": losses, "ties": ties,
        "win_rate": (wins + 0.5 * ties) / n if n else None,
        "strict_win_rate": wins / n if n else None,
        "tie_rate": ties / n if n else None,
    }


def elo_expected(rating: float, opponent: float) -> float:
    return 1.0 / (1.0 + 10 ** ((opponent - rating) / 400.0))


def elo_ratings(outcomes: Sequence[PairOutcome | None], *, k_factor: float = ELO_K_FACTOR,
                start: float = ELO_START) -> dict[str, Any]:
    """Sequential ELO updates (tuned vs base) over decided pairs in order; both start at 1000."""
    tuned, base = start, start
    history = [(tuned, base)]
    for outcome in outcomes:
        if outcome is None:
            continue
        score = {"tuned": 1.0, "base": 0.0, "tie": 0.5}[outcome]
        expected = elo_expected(tuned, base)
        delta = k_factor * (score - expected)
        tuned, base = tuned + delta, base - delta
        history.append((tuned, base))
    return {"tuned": tuned, "base": base, "k_factor": k_factor, "start": start,
            "history": history}


def base_model_gate(pass_rate: float | None) -> dict[str, Any]:
    """Seed 001's decision gate on the base model's rubric pass rate."""
    if pass_rate is None:
        return {"band": "unknown", "pass_rate": None,
                "recommendation": "No rubric verdicts for the base model (every judge call "
                                  "failed); fix the judge endpoint and re-run the evaluation."}
    if pass_rate > 0.70:
        band, text = ">70%", ("Base model may be sufficient. Consider prompt engineering "
                              "first.")
    elif pass_rate >= 0.50:
        band, text = "50-70%", "Fine-tuning likely helpful. Moderate improvement expected."
    else:
        band, text = "<50%", "Fine-tuning needed. Significant improvement expected."
    return {"band": band, "pass_rate": pass_rate, "recommendation": text}
