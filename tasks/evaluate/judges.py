"""Judging the two models' replies: rubric grading and pairwise comparison in both orders.

`LlmEvalJudge` is the judge LLM role through the shared client: rubric grading reuses the curation
judge (`tasks.judge.stage.judge_conversation`, all criteria with their calibration examples in one
request) and pairwise comparison is the shared both-orders judge (`tasks.judge.pairwise`:
include/prompts/judge/pairwise.jinja2 through `LLMClient.structured`, tuned in position A first,
then base); any object with the `EvalJudge` shape can stand in. `judge_scenarios` sends every
grade and comparison of an evaluation concurrently and collects a `ScenarioResult` per scenario;
a call without a usable answer is recorded with its reason (never raised out of here), a pair
with a failed order has outcome None (undecided), and `summarise_rubric` turns the grades into
rates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasks.evaluate.config import EvalScenario, ScenarioSet
from tasks.judge.pairwise import (
    PairJudgment,
    PromptBuilder,
    judge_both_orders,
    pairwise_criteria,
    pairwise_messages,
)

# The pair as the shared judge sees it: tuned is x (position A of the first order), base is y.
PAIR_LABELS = ("tuned", "base")
PAIRWISE_MAX_TOKENS = 256


class JudgeFailure(RuntimeError):
    """One judge call gave no usable answer; `raw` keeps the reply for the audit trail."""

    def __init__(self, reason: str, *, raw: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


# ---- judging -----------------------------------------------------------------------------------

class EvalJudge(Protocol):
    """What the evaluation needs from a judge. `grade` raises JudgeFailure when there is no
    answer; `compare` judges the tuned and base replies in both orders and records a failed
    order in the returned judgment (see `tasks.judge.pairwise`)."""

    label: str

    async def grade(self, rubric, messages: list[dict[str, str]],
                    system_prompt: str) -> dict[str, str]: ...

    async def compare(self, build: PromptBuilder, tuned: str, base: str) -> PairJudgment: ...


def scenario_pair_prompt(rubric, scenarios: ScenarioSet,
                         scenario: EvalScenario) -> PromptBuilder:
    """The pairwise messages for one scenario, as a function of the (A, B) replies."""
    criteria = pairwise_criteria(rubric)
    history = [m.model_dump() for m in scenario.messages]

    def build(response_a: str, response_b: str) -> list[dict[str, str]]:
        return pairwise_messages(criteria, history, response_a, response_b,
                                 system_prompt=scenarios.system_prompt, expect=scenario.expect)

    return build


class LlmEvalJudge:
    """The judge role through the shared LLM client.

    Rubric grading reuses the curation judge (`tasks.judge.stage.judge_conversation`, combined mode:
    one request with every criterion and its calibration examples); a criterion left as ERROR
    after its retries makes the whole grade a JudgeFailure. Pairwise comparison is
    `tasks.judge.pairwise.judge_both_orders` (one corrective follow-up per order).
    """

    def __init__(self, client, label: str, *, retries: int = 2, max_tokens: int = 1024) -> None:
        self.client = client
        self.label = label
        self.retries = retries
        self.max_tokens = max_tokens

    @classmethod
    def for_role(cls, role: str = "judge", *, use_cache: bool = True,
                 retries: int = 2, max_tokens: int = 1024) -> LlmEvalJudge:
        from tasks.core.llm.client import client_for_role
        from tasks.core.settings import get_settings

        client = client_for_role(role, use_cache=use_cache)  # type: ignore[arg-type]
        return cls(client, get_settings().endpoint(role).label(),  # type: ignore[arg-type]
                   retries=retries, max_tokens=max_tokens)

    async def grade(self, rubric, messages: list[dict[str, str]],
                    system_prompt: str) -> dict[str, str]:
        from tasks.judge.stage import JudgeTarget, judge_conversation

        rows, _ = await judge_conversation(
            JudgeTarget("judge", self.client, self.label), rubric, "evaluation", messages,
            rubric.criterion_ids(), mode="combined", retries=self.retries,
            max_tokens=self.max_tokens, system_prompt=system_prompt,
        )
        errored = [row for row in rows if row["verdict"] == "ERROR"]
        if errored:
            raise JudgeFailure(f"rubric verdict unusable: {errored[0]['reasoning']}",
                               raw=errored[0].get("raw_output"))
        return {row["criterion"]: row["verdict"] for row in rows}

    async def compare(self, build: PromptBuilder, tuned: str, base: str) -> PairJudgment:
        return await judge_both_orders(self.client, build, tuned, base, labels=PAIR_LABELS,
                                       max_tokens=PAIRWISE_MAX_TOKENS)


# ---- per-scenario judging ----------------------------------------------------------------------

@dataclass
class ScenarioResult:
    scenario_id: str
    topic: str
    difficulty: str
    edge_case: str | None
    base_reply: str
    tuned_reply: str
    rubric: dict[str, Any] = field(default_factory=dict)   # model → outcome dict or failure
    pairwise: dict[str, Any] = field(default_factory=dict)  # orders, outcome, failures


async def _grade(judge: EvalJudge, rubric, messages: list[dict[str, str]],
                 system_prompt: str) -> dict[str, Any]:
    from tasks.judge.stage import score_verdicts

    try:
        verdicts = await judge.grade(rubric, messages, system_prompt)
    except JudgeFailure as exc:
        return {"ok": False, "failure": exc.reason, "raw": (exc.raw or "")[:2000]}
    outcome = score_verdicts(rubric, {"judge": verdicts})
    return {"ok": True, "verdicts": verdicts, "score": outcome.score, "passed": outcome.passed,
            "safety_failed": outcome.safety_failed, "failed_criteria": outcome.failed_criteria}


def _pairwise_record(judgment: PairJudgment) -> dict[str, Any]:
    """ScenarioResult.pairwise: each order's verdict or failure, and the combined outcome."""
    return {"tuned_first": judgment.first.as_dict(), "base_first": judgment.second.as_dict(),
            "outcome": judgment.outcome}


async def judge_all(judge: EvalJudge, rubric, scenarios: ScenarioSet,
                     base_replies: Sequence[str], tuned_replies: Sequence[str]
                     ) -> list[ScenarioResult]:
    results = [
        ScenarioResult(s.id, s.topic, s.difficulty, s.edge_case, base, tuned)
        for s, base, tuned in zip(scenarios.scenarios, base_replies, tuned_replies, strict=True)
    ]
    jobs: list[tuple[ScenarioResult, str, str, Any]] = []
    for result, scenario in zip(results, scenarios.scenarios, strict=True):
        history = [m.model_dump() for m in scenario.messages]
        for model, reply in (("base", result.base_reply), ("tuned", result.tuned_reply)):
            transcript = [*history, {"role": "assistant", "content": reply or "(empty reply)"}]
            jobs.append((result, "rubric", model,
                         _grade(judge, rubric, transcript, scenarios.system_prompt)))
        build = scenario_pair_prompt(rubric, scenarios, scenario)
        jobs.append((result, "pairwise", "", judge.compare(build, result.tuned_reply,
                                                           result.base_reply)))
    answers = await asyncio.gather(*(job[3] for job in jobs))
    for (result, group, name, _), answer in zip(jobs, answers, strict=True):
        if group == "pairwise":
            result.pairwise = _pairwise_record(answer)
        else:
            result.rubric[name] = answer
    return results


def judge_scenarios(judge: EvalJudge, rubric, scenarios: ScenarioSet,
                    base_replies: Sequence[str], tuned_replies: Sequence[str]
                    ) -> list[ScenarioResult]:
    """Rubric-grade both replies and compare them in both orders, for every scenario."""
    from tasks.core.llm.client import run_sync

    return run_sync(judge_all(judge, rubric, scenarios, base_replies, tuned_replies))


def summarise_rubric(results: Sequence[ScenarioResult], model: str, rubric) -> dict[str, Any]:
    graded = [r.rubric[model] for r in results if r.rubric.get(model, {}).get("ok")]
    failures = sum(1 for r in results if not r.rubric.get(model, {}).get("ok"))
    per_criterion: dict[str, float | None] = {}
    for cid in rubric.criterion_ids():
        assessed = [g["verdicts"][cid] for g in graded if g["verdicts"][cid] != "NA"]
        per_criterion[cid] = (assessed.count("YES") / len(assessed)) if assessed else None
    return {
        "judged": len(graded), "failures": failures,
        "passed": sum(1 for g in graded if g["passed"]),
        "pass_rate": (sum(1 for g in graded if g["passed"]) / len(graded)) if graded else None,
        "mean_score": (sum(g["score"] for g in graded) / len(graded)) if graded else None,
        "safety_failures": sum(1 for g in graded if g["safety_failed"]),
        "per_criterion": per_criterion,
    }
