"""The pairwise judge of mirrored pairs: in mirror mode the users only saw the champion, so the
evidence is the rubric judge comparing the champion's and the challenger's answers to the same
request. Each pair goes through the shared both-orders judge (`tasks.judge.pairwise`: the
pairwise prompt include/prompts/judge/pairwise.jinja2, champion in position A first, then the
challenger); a pair counts as a win only when both orders agree, anything else is a tie (this
cancels position bias), and a pair with a failed order has outcome None: undecided, counted
under "errors". `pairwise_summary` turns the outcomes into wins/losses/ties, a win rate with its
Wilson interval and a sign test.

The judge may be a hosted LLM, and a mirrored pair is production users' text: the request and
both answers go through `tasks.datasets.deid` (`deid_pair`) before any prompt is built, with the
person names found under the interaction context's name fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from tasks.datasets import deid
from tasks.judge.pairwise import (
    PairJudgment,
    PromptBuilder,
    StructuredClient,
    judge_both_orders,
    pairwise_criteria,
    pairwise_messages,
)
from tasks.shadow.config import CHALLENGER, CHAMPION
from tasks.shadow.stats import sign_test, wilson_interval

# The pair as the shared judge sees it: the champion is x (position A of the first order).
PAIR_LABELS = (CHAMPION, CHALLENGER)
# Part of the LLM response cache key: changing it re-pays every verdict already given.
PAIRWISE_MAX_TOKENS = 200


def pairwise_summary(outcomes: Sequence[str | None], confidence: float = 0.95) -> dict[str, Any]:
    """Counts of challenger wins/losses/ties, errors (None: a failed order), win rate and sign
    test; the win rate and the test are over decisive pairs."""
    counts = Counter(outcomes)
    wins, losses, ties = counts[CHALLENGER], counts[CHAMPION], counts["tie"]
    decisive = wins + losses
    return {
        "pairs": len(outcomes),
        "judged": wins + losses + ties,
        "errors": counts[None],
        "challenger_wins": wins,
        "champion_wins": losses,
        "ties": ties,
        "challenger_win_rate": wins / decisive if decisive else None,
        "challenger_win_rate_ci": list(wilson_interval(wins, decisive, confidence)),
        "sign_test_p": sign_test(wins, losses),
    }


def mirrored_pair_prompt(messages: Sequence[dict[str, Any]], rubric: Any) -> PromptBuilder:
    """The pairwise messages for one logged request (its system turn, if any, becomes the
    prompt's system prompt; there is no expected behaviour), as a function of the replies."""
    criteria = pairwise_criteria(rubric)
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    system_prompt = system[0]["content"] if system else ""

    def build(response_a: str, response_b: str) -> list[dict[str, str]]:
        return pairwise_messages(criteria, turns, response_a, response_b,
                                 system_prompt=system_prompt)

    return build


def pair_detail(pair: dict[str, Any], judgment: PairJudgment) -> dict[str, Any]:
    """The report's per-pair row: ids, the two orders' winners (None = failed), the outcome."""
    return {"champion_id": pair["champion_id"], "mirror_id": pair["mirror_id"],
            "verdicts": [judgment.first.winner, judgment.second.winner],
            "outcome": judgment.outcome}


def deid_pair(pair: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str]:
    """The pair as the judge may see it: (request messages, champion answer, challenger
    answer), each scrubbed of PII and of the names under the request's or context's name
    fields. The pair's ids stay as they are (the report refers to the rows by them)."""
    messages = list(pair.get("messages") or [])
    names = deid.names_in(pair.get("context") or {}) | deid.names_in(messages)
    return (deid.scrub_messages(messages, names),
            deid.scrub_text(pair["champion_response"] or "", names),
            deid.scrub_text(pair["challenger_response"] or "", names))


def judge_pairs(pairs: list[dict[str, Any]], client: StructuredClient) -> list[dict[str, Any]]:
    """Judge each (champion, challenger) pair in both orders through an LLMClient; the judge
    sees each pair de-identified (`deid_pair`)."""
    import asyncio

    from tasks.core.llm import run_sync
    from tasks.judge.stage import load_rubric

    rubric = load_rubric()

    async def one(pair: dict[str, Any]) -> dict[str, Any]:
        messages, champion, challenger = deid_pair(pair)
        judgment = await judge_both_orders(
            client, mirrored_pair_prompt(messages, rubric), champion, challenger,
            labels=PAIR_LABELS, max_tokens=PAIRWISE_MAX_TOKENS)
        return pair_detail(pair, judgment)

    async def all_pairs() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(p) for p in pairs)))

    return run_sync(all_pairs())
