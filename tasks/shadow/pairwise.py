"""The pairwise judge of mirrored pairs: in mirror mode the users only saw the champion, so the
evidence is the rubric judge comparing the champion's and the challenger's answers to the same
request. Each pair is asked in both orders (A/B and B/A) through the pairwise prompt
(include/prompts/judge/pairwise.jinja2); a pair counts as a win only when both orders agree,
anything else is a tie (this cancels position bias), a judge failure is an error.
`pairwise_summary` turns the outcomes into wins/losses/ties, a win rate with its Wilson interval
and a sign test.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel

from tasks.shadow.config import CHALLENGER, CHAMPION
from tasks.shadow.stats import sign_test, wilson_interval


def pairwise_summary(outcomes: list[str], confidence: float = 0.95) -> dict[str, Any]:
    """Counts of challenger wins/losses/ties (errors excluded), win rate and sign test."""
    counts = Counter(outcomes)
    wins, losses, ties = counts[CHALLENGER], counts[CHAMPION], counts["tie"]
    decisive = wins + losses
    return {
        "pairs": len(outcomes),
        "judged": wins + losses + ties,
        "errors": counts["error"],
        "challenger_wins": wins,
        "champion_wins": losses,
        "ties": ties,
        "challenger_win_rate": wins / decisive if decisive else None,
        "challenger_win_rate_ci": list(wilson_interval(wins, decisive, confidence)),
        "sign_test_p": sign_test(wins, losses),
    }


class PairwiseVerdict(BaseModel):
    """The judge's answer to one ordered pair."""

    winner: Literal["A", "B", "tie"]
    reason: str = ""


def pairwise_messages(messages: list[dict[str, Any]], response_a: str,
                      response_b: str) -> list[dict[str, str]]:
    """The judge prompt (include/prompts/judge/pairwise.jinja2) for one ordered pair."""
    import jinja2

    from tasks.core.paths import PROMPTS_DIR
    from tasks.judge.stage import load_rubric

    rubric = load_rubric()
    criteria = [{"id": cid, "name": rubric.criteria[cid].name,
                 "question": rubric.criteria[cid].question,
                 "safety_gate": cid in rubric.safety_gates} for cid in rubric.criterion_ids()]
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    template = env.from_string((PROMPTS_DIR / "judge" / "pairwise.jinja2").read_text())
    prompt = template.render(criteria=criteria, expect="",
                             system_prompt=system[0]["content"] if system else "",
                             messages=turns, response_a=response_a, response_b=response_b)
    return [{"role": "user", "content": prompt}]


def combine_orders(first: str | None, second: str | None) -> str:
    """Outcome of a pair from two ordered verdicts (first: A=champion; second: A=challenger).

    Each verdict is "A", "B", "tie" or None (the judge failed). Both orders must name the same
    variant for a win; a disagreement (position bias) or any tie is a tie; a failure is "error".
    """
    if first is None or second is None:
        return "error"
    first_variant = {"A": CHAMPION, "B": CHALLENGER}.get(first, "tie")
    second_variant = {"A": CHALLENGER, "B": CHAMPION}.get(second, "tie")
    if first_variant == second_variant and first_variant != "tie":
        return first_variant
    return "tie"


def judge_pairs(pairs: list[dict[str, Any]], client: Any) -> list[dict[str, Any]]:
    """Judge each (champion, challenger) pair in both orders through an LLMClient."""
    import asyncio

    from tasks.core.llm import run_sync

    async def one(pair: dict[str, Any]) -> dict[str, Any]:
        messages = pair["messages"] or []
        orders = [(pair["champion_response"], pair["challenger_response"]),
                  (pair["challenger_response"], pair["champion_response"])]
        results = await asyncio.gather(*(
            client.structured(pairwise_messages(messages, a, b), PairwiseVerdict,
                              temperature=0.0, max_tokens=200)
            for a, b in orders))
        verdicts = [r.value.winner if r.ok and r.value is not None else None for r in results]
        return {"champion_id": pair["champion_id"], "mirror_id": pair["mirror_id"],
                "verdicts": verdicts, "outcome": combine_orders(*verdicts)}

    async def all_pairs() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(p) for p in pairs)))

    return run_sync(all_pairs())
