"""The rubric judge: per-criterion or combined judge prompts, strict reply parsing, judgment rows.

Judges are LLM roles ("judge", "judge2" in settings); `judge_conversation` asks one judge slot
about the given criteria of one conversation (retrying unparseable replies, storing ERROR with the
raw reply when it gives up) and returns `judgments` rows, one per conversation, criterion and
slot. The tag stage's `judge_shard` (`tasks.tag.stage`, what the tag_conversations DAG maps) and
evaluation's rubric grading call it. The rubric model lives in `tasks.judge.rubric`, verdict
scoring and agreement in `tasks.judge.scoring`; the names other stages read from here are
re-exported below. Prompts render in the shared environment of `tasks.core.prompts`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tasks.core.paths import PROMPTS_DIR
from tasks.core.prompts import clip_text, render_block
from tasks.judge.rubric import Rubric, Verdict, load_rubric, rubric_from_dict
from tasks.judge.scoring import rubric_outcomes, score_verdicts

log = logging.getLogger(__name__)

__all__ = [
    "JUDGE_SLOTS",
    "CriterionVerdict",
    "JudgeOutputInvalid",
    "JudgeTarget",
    "combined_messages",
    "criterion_messages",
    "judge_conversation",
    "judgment_row",
    "parse_combined_verdicts",
    "parse_criterion_verdict",
    # re-exported for the stages that read them from here (curate, evaluate, shadow, bench)
    "load_rubric",
    "rubric_from_dict",
    "rubric_outcomes",
    "score_verdicts",
]

JUDGE_PROMPTS_DIR = PROMPTS_DIR / "judge"
JUDGE_SLOTS = ("judge", "judge2")
JudgeSlot = Literal["judge", "judge2"]


class CriterionVerdict(BaseModel):
    """A judge's answer for one criterion (reasoning first, so the model thinks before it rules)."""

    model_config = ConfigDict(extra="ignore")

    reasoning: str = ""
    verdict: Verdict

    @field_validator("verdict", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper().rstrip(".")
            return {"PASS": "YES", "FAIL": "NO", "N/A": "NA"}.get(value, value)
        return value

    @field_validator("reasoning", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return "" if value is None else value


class JudgeOutputInvalid(ValueError):
    """A judge reply could not be read as verdicts; carries the raw reply for the audit."""

    def __init__(self, reason: str, raw: str | None) -> None:
        self.reason = reason
        self.raw = raw
        super().__init__(f"judge output invalid: {reason}")


def _judge_context(rubric: Rubric, messages: Iterable[dict[str, str]],
                   system_prompt: str = "") -> dict[str, Any]:
    return {
        "rubric_name": rubric.name,
        "messages": [{"role": m["role"], "content": clip_text(m["content"])} for m in messages],
        "system_prompt": clip_text(system_prompt),
    }


def criterion_messages(rubric: Rubric, criterion_id: str, messages: Sequence[dict[str, str]],
                       system_prompt: str = "") -> list[dict[str, str]]:
    """The per-criterion judge prompt (include/prompts/judge/criterion.jinja2)."""
    context = _judge_context(rubric, messages, system_prompt)
    context.update(criterion_id=criterion_id, criterion=rubric.criteria[criterion_id])
    return [{"role": "system", "content": render_block("judge/criterion.jinja2", "system", context)},
            {"role": "user", "content": render_block("judge/criterion.jinja2", "user", context)}]


def combined_messages(rubric: Rubric, messages: Sequence[dict[str, str]],
                      system_prompt: str = "") -> list[dict[str, str]]:
    """All criteria in one judge prompt (include/prompts/judge/combined.jinja2)."""
    context = _judge_context(rubric, messages, system_prompt)
    context["criteria"] = [(cid, rubric.criteria[cid]) for cid in rubric.criterion_ids()]
    return [{"role": "system", "content": render_block("judge/combined.jinja2", "system", context)},
            {"role": "user", "content": render_block("judge/combined.jinja2", "user", context)}]


def parse_criterion_verdict(raw: str) -> CriterionVerdict:
    """Raw judge reply → CriterionVerdict; raises JudgeOutputInvalid."""
    from tasks.core.llm.structured import StructuredOutputError, parse_structured

    try:
        return parse_structured(raw, CriterionVerdict)
    except StructuredOutputError as exc:
        raise JudgeOutputInvalid(exc.reason, raw) from None


def parse_combined_verdicts(rubric: Rubric, raw: str) -> dict[str, CriterionVerdict]:
    """Raw combined reply → {criterion: verdict} for every rubric criterion, or JudgeOutputInvalid."""
    from tasks.core.llm.structured import StructuredOutputError, extract_json

    try:
        data = extract_json(raw)
    except StructuredOutputError as exc:
        raise JudgeOutputInvalid(exc.reason, raw) from None
    if not isinstance(data, dict):
        raise JudgeOutputInvalid("expected one JSON object keyed by criterion id", raw)
    out: dict[str, CriterionVerdict] = {}
    problems: list[str] = []
    for cid in rubric.criterion_ids():
        if cid not in data:
            problems.append(f"{cid} missing")
            continue
        try:
            out[cid] = CriterionVerdict.model_validate(data[cid])
        except ValidationError as exc:
            problems.append(f"{cid}: {exc.errors()[0]['msg']}")
    if problems:
        raise JudgeOutputInvalid("; ".join(problems[:6]), raw)
    return out


def judgment_row(conversation_id: str, rubric: Rubric, criterion_id: str, slot: str,
                 judge_model: str, verdict: str, reasoning: str, *, attempts: int,
                 raw_output: str | None = None) -> dict[str, Any]:
    from tasks.core.ids import stable_id

    return {
        "id": stable_id(conversation_id, rubric.version, criterion_id, slot),
        "conversation_id": conversation_id,
        "rubric_version": rubric.version,
        "criterion": criterion_id,
        "judge": slot,
        "judge_model": judge_model[:300],
        "verdict": verdict,
        "reasoning": reasoning,
        "attempts": attempts,
        "raw_output": None if raw_output is None else raw_output[:20_000],
    }


@dataclass
class JudgeTarget:
    """One judge slot bound to its client and the label stored in `judgments.judge_model`."""

    slot: str
    client: Any
    label: str


async def judge_conversation(
    target: JudgeTarget,
    rubric: Rubric,
    conversation_id: str,
    messages: Sequence[dict[str, str]],
    criteria: Sequence[str],
    *,
    mode: Literal["per_criterion", "combined"] = "per_criterion",
    retries: int = 3,
    max_tokens: int = 512,
    system_prompt: str = "",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Judge `criteria` of one conversation with one judge; returns judgment rows + counters.

    Per criterion: up to `retries` attempts each; a criterion still unparseable after that is
    stored as verdict ERROR with the last error as reasoning and the raw reply. Combined: one
    request for all criteria, retried as a whole.
    """
    counters = {"requests": 0, "failed_attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}

    async def ask(prompt: list[dict[str, str]], parse: Any) -> tuple[Any, int, str, str | None]:
        last_error, last_raw = "no attempt made", None
        current = prompt
        for index in range(retries):
            params: dict[str, Any] = {"temperature": 0.0}
            if index > 0:
                params = {"temperature": 0.7, "seed": index + 1}
            result = await target.client.chat(current, max_tokens=max_tokens, **params)
            counters["requests"] += 1
            counters["prompt_tokens"] += int(result.usage.get("prompt_tokens", 0) or 0)
            counters["completion_tokens"] += int(result.usage.get("completion_tokens", 0) or 0)
            if not result.ok:
                last_error, last_raw = result.error or "LLM call failed", result.text
                counters["failed_attempts"] += 1
                current = prompt
                continue
            try:
                return parse(result.text or ""), index + 1, "", None
            except JudgeOutputInvalid as exc:
                last_error, last_raw = exc.reason, result.text
                counters["failed_attempts"] += 1
                current = [*prompt, {"role": "assistant", "content": result.text or ""},
                           {"role": "user", "content": (
                               f"Your previous reply could not be used: {exc.reason}\n"
                               "Reply again with only the JSON object, no prose.")}]
        return None, retries, last_error, last_raw

    rows: list[dict[str, Any]] = []
    if mode == "combined":
        prompt = combined_messages(rubric, messages, system_prompt)
        value, attempts, error, raw = await ask(
            prompt, lambda text: parse_combined_verdicts(rubric, text))
        for cid in criteria:
            if value is None:
                rows.append(judgment_row(conversation_id, rubric, cid, target.slot, target.label,
                                         "ERROR", error, attempts=attempts, raw_output=raw))
            else:
                rows.append(judgment_row(conversation_id, rubric, cid, target.slot, target.label,
                                         value[cid].verdict, value[cid].reasoning,
                                         attempts=attempts))
        return rows, counters

    async def one(cid: str) -> dict[str, Any]:
        prompt = criterion_messages(rubric, cid, messages, system_prompt)
        value, attempts, error, raw = await ask(prompt, parse_criterion_verdict)
        if value is None:
            return judgment_row(conversation_id, rubric, cid, target.slot, target.label, "ERROR",
                                error, attempts=attempts, raw_output=raw)
        return judgment_row(conversation_id, rubric, cid, target.slot, target.label,
                            value.verdict, value.reasoning, attempts=attempts)

    rows = list(await asyncio.gather(*(one(cid) for cid in criteria)))
    return rows, counters
