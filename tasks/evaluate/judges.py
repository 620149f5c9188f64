"""Judging the two models' replies: rubric grading and pairwise comparison in both orders.

`LlmEvalJudge` is the judge LLM role through the shared client: rubric grading reuses the curation
judge (`tasks.judge.stage.judge_conversation`, all criteria with their calibration examples in one
request) and pairwise comparison renders include/prompts/judge/pairwise.jinja2 through
`LLMClient.structured`; any object with the `EvalJudge` shape can stand in. `judge_scenarios`
sends every grade and comparison of an evaluation concurrently and collects a `ScenarioResult` per
scenario; a call without a usable answer raises `JudgeFailure` inside the judge and is recorded
with its reason (never raised out of here), and `summarise_rubric` turns the grades into rates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.core.paths import PROMPTS_DIR
from tasks.evaluate.config import EvalScenario, ScenarioSet
from tasks.evaluate.scoring import Winner, combine_orders

PAIRWISE_TEMPLATE = PROMPTS_DIR / "judge" / "pairwise.jinja2"


class JudgeFailure(RuntimeError):
    """One judge call gave no usable answer; `raw` keeps the reply for the audit trail."""

    def __init__(self, reason: str, *, raw: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


# ---- judging -----------------------------------------------------------------------------------

class PairwiseVerdict(BaseModel):
    """The pairwise judge's answer (include/prompts/judge/pairwise.jinja2)."""

    model_config = ConfigDict(extra="ignore")

    winner: Literal["A", "B", "tie"]
    reason: str = ""

    @field_validator("winner", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip(".").strip('"')
            return {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "neither": "tie"}.get(
                text.lower(), text)
        return value

    @field_validator("reason", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return "" if value is None else str(value)


class EvalJudge(Protocol):
    """What the evaluation needs from a judge. Raise JudgeFailure when there is no answer."""

    label: str

    async def grade(self, rubric, messages: list[dict[str, str]],
                    system_prompt: str) -> dict[str, str]: ...

    async def compare(self, prompt: str) -> Winner: ...


def _template(path: Path):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    return env.from_string(path.read_text(encoding="utf-8"))


def render_pairwise_prompt(rubric, scenarios: ScenarioSet, scenario: EvalScenario,
                           response_a: str, response_b: str) -> str:
    criteria = [{"id": cid, "name": rubric.criteria[cid].name,
                 "question": rubric.criteria[cid].question,
                 "safety_gate": cid in rubric.safety_gates}
                for cid in rubric.criterion_ids()]
    return _template(PAIRWISE_TEMPLATE).render(
        criteria=criteria, expect=scenario.expect, system_prompt=scenarios.system_prompt,
        messages=[m.model_dump() for m in scenario.messages],
        response_a=response_a or "(empty reply)", response_b=response_b or "(empty reply)",
    )


def parse_pairwise_winner(text: str) -> Winner:
    """A pairwise judge reply → "A" | "B" | "tie"; JudgeFailure when unusable."""
    from tasks.core.llm.structured import StructuredOutputError, parse_structured

    try:
        return parse_structured(text, PairwiseVerdict).winner  # type: ignore[attr-defined]
    except StructuredOutputError as exc:
        raise JudgeFailure(f"unusable pairwise verdict: {exc.reason}", raw=text) from None


class LlmEvalJudge:
    """The judge role through the shared LLM client.

    Rubric grading reuses the curation judge (`tasks.judge.stage.judge_conversation`, combined mode:
    one request with every criterion and its calibration examples); a criterion left as ERROR
    after its retries makes the whole grade a JudgeFailure. Pairwise comparison sends
    pairwise.jinja2 through `LLMClient.structured` (one corrective follow-up).
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

    async def compare(self, prompt: str) -> Winner:
        result = await self.client.structured(
            [{"role": "user", "content": prompt}], PairwiseVerdict, corrective_retries=1,
            max_tokens=256, temperature=0.0,
        )
        if not result.ok:
            raise JudgeFailure(f"unusable pairwise verdict: {result.error}", raw=result.raw)
        return result.value.winner  # type: ignore[union-attr]


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


async def _compare(judge: EvalJudge, prompt: str) -> dict[str, Any]:
    try:
        return {"ok": True, "winner": await judge.compare(prompt)}
    except JudgeFailure as exc:
        return {"ok": False, "failure": exc.reason, "raw": (exc.raw or "")[:2000]}


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
        orders = {"tuned_first": (result.tuned_reply, result.base_reply),
                  "base_first": (result.base_reply, result.tuned_reply)}
        for order, (first, second) in orders.items():
            prompt = render_pairwise_prompt(rubric, scenarios, scenario, first, second)
            jobs.append((result, "pairwise", order, _compare(judge, prompt)))
    answers = await asyncio.gather(*(job[3] for job in jobs))
    for (result, group, name, _), answer in zip(jobs, answers, strict=True):
        getattr(result, group)[name] = answer
    for result in results:
        first, second = result.pairwise["tuned_first"], result.pairwise["base_first"]
        result.pairwise["outcome"] = combine_orders(
            first["winner"] if first["ok"] else None, second["winner"] if second["ok"] else None)
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
