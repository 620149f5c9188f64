"""The binary rubric judge: rubric loading, per-criterion judging with two judges, scoring.

The rubric (include/rubrics/rubric.yaml, seed 001) groups binary YES/NO/NA criteria into weighted
categories, carries 3-8 calibration examples per criterion (rendered into the judge prompt so that
different backends read the criteria alike) and names safety gates. Judges are LLM roles
("judge", "judge2" in settings); every verdict is stored per criterion with its reasoning in the
`judgments` table. `rubric_outcomes` turns stored verdicts into a score and a pass/fail decision;
`judge_agreement` reports how often the two judges agree.

Scoring rules (one place, used by curation):
- per judge and criterion: YES → pass; NO → fail; NA → excluded if the criterion is `na_valid`,
  otherwise fail; ERROR (the judge gave no parseable verdict) → fail, since an unverified
  criterion must not let a conversation through.
- across judges: policy "both" → a criterion passes only if no judge failed it; "either" → it
  passes if any judge passed it. Safety gates ignore the policy: any judge's failure of a safety
  gate rejects the conversation.
- score = Σ weight·(passed / assessed) over categories with at least one assessed criterion,
  divided by the sum of those categories' weights; passed = score ≥ pass_threshold and no safety
  gate failed. A criterion missing from the stored judgments counts as failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks.core.db.models import Judgment, RubricVersion
from tasks.core.ids import content_hash
from tasks.core.paths import PROMPTS_DIR, RUBRICS_DIR

if TYPE_CHECKING:
    from tasks.tag.stage import TaggingConfig

log = logging.getLogger(__name__)

DEFAULT_RUBRIC_PATH = RUBRICS_DIR / "rubric.yaml"
JUDGE_PROMPTS_DIR = PROMPTS_DIR / "judge"
JUDGE_SLOTS = ("judge", "judge2")
JudgeSlot = Literal["judge", "judge2"]
Policy = Literal["both", "either"]
Verdict = Literal["YES", "NO", "NA"]
STORED_VERDICTS = ("YES", "NO", "NA", "ERROR")


class RubricError(ValueError):
    """The rubric file is missing or invalid; carries the path and every problem found."""

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(f"invalid rubric {self.path}:\n  " + "\n  ".join(self.problems))


# ---- rubric model ----------------------------------------------------------------------------
class CalibrationExample(BaseModel):
    """One anchored judgment: a context, a response, the expected verdict and why."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["PASS", "FAIL", "NA"]
    context: str = Field(min_length=1)
    response: str = Field(min_length=1)
    reasoning: str = Field(min_length=1)

    @property
    def verdict(self) -> Verdict:
        return {"PASS": "YES", "FAIL": "NO", "NA": "NA"}[self.type]  # type: ignore[return-value]


class Criterion(BaseModel):
    """A binary question about the assistant's turns; YES means the criterion is met."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    question: str = Field(min_length=1)
    na_valid: bool = False
    calibration_examples: list[CalibrationExample]

    @model_validator(mode="after")
    def _calibrated(self) -> Criterion:
        n = len(self.calibration_examples)
        if not 3 <= n <= 8:
            raise ValueError(
                f"criterion {self.name!r} has {n} calibration examples; give 3-8 (at least one "
                "PASS and one FAIL, each with context, response and reasoning)"
            )
        kinds = {ex.type for ex in self.calibration_examples}
        if not {"PASS", "FAIL"} <= kinds:
            raise ValueError(
                f"criterion {self.name!r} needs at least one PASS and one FAIL calibration "
                f"example; it has {sorted(kinds)}"
            )
        if "NA" in kinds and not self.na_valid:
            raise ValueError(
                f"criterion {self.name!r} has an NA calibration example but na_valid is false; "
                "set na_valid: true or change the example's type to PASS/FAIL"
            )
        return self


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float
    criteria: list[str] = Field(min_length=1)

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"category weight must be in (0, 1], got {value}; e.g. weight: 0.2")
        return value


class Rubric(BaseModel):
    """A parsed, validated rubric; `version` is the content hash of everything else."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    pass_threshold: float = 0.80
    categories: dict[str, Category]
    criteria: dict[str, Criterion]
    safety_gates: list[str] = Field(default_factory=list)

    @field_validator("pass_threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"pass_threshold must be in (0, 1], got {value}; e.g. 0.80")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rubric:
        total = sum(c.weight for c in self.categories.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"category weights sum to {total:.4f}; they must sum to 1.0 (e.g. scale each "
                f"weight by {1 / total:.4f})"
            )
        seen: dict[str, str] = {}
        for cat_name, cat in self.categories.items():
            for cid in cat.criteria:
                if cid not in self.criteria:
                    raise ValueError(
                        f"category {cat_name!r} lists criterion {cid!r} which is not defined "
                        f"under criteria:; define it or remove it (defined: {sorted(self.criteria)})"
                    )
                if cid in seen:
                    raise ValueError(
                        f"criterion {cid!r} is in both {seen[cid]!r} and {cat_name!r}; "
                        "put each criterion in exactly one category"
                    )
                seen[cid] = cat_name
        orphans = sorted(set(self.criteria) - set(seen))
        if orphans:
            raise ValueError(
                f"criteria {orphans} belong to no category; add them to a category's criteria list"
            )
        unknown = sorted(set(self.safety_gates) - set(self.criteria))
        if unknown:
            raise ValueError(
                f"safety_gates {unknown} are not defined criteria; use ids from "
                f"{sorted(self.criteria)}"
            )
        return self

    @cached_property
    def version(self) -> str:
        return content_hash(self.model_dump(mode="json"))[:16]

    @cached_property
    def category_of(self) -> dict[str, str]:
        return {cid: name for name, cat in self.categories.items() for cid in cat.criteria}

    def criterion_ids(self) -> list[str]:
        """Criteria in category order (the order prompts and reports use)."""
        return [cid for cat in self.categories.values() for cid in cat.criteria]


def load_rubric(path: Path | None = None) -> Rubric:
    """Parse and validate a rubric YAML (default include/rubrics/rubric.yaml)."""
    path = Path(path) if path is not None else DEFAULT_RUBRIC_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RubricError(path, [f"file not found; expected a rubric at {DEFAULT_RUBRIC_PATH}"]) \
            from None
    except yaml.YAMLError as exc:
        raise RubricError(path, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise RubricError(path, ["top level must be a mapping with categories/criteria/..."])
    return rubric_from_dict(data, source=path)


def rubric_from_dict(data: dict[str, Any], *, source: Path | str = "<dict>") -> Rubric:
    try:
        return Rubric.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise RubricError(source, problems) from None


def store_rubric(session: Session, rubric: Rubric) -> str:
    """Record the rubric content under its version (idempotent); returns the version."""
    from tasks.core.db.engine import upsert

    upsert(session, RubricVersion, [{
        "version": rubric.version, "name": rubric.name, "content": rubric.model_dump(mode="json"),
    }], update=[])
    return rubric.version


def rubric_for_version(session: Session, version: str | None) -> Rubric:
    """The current rubric file if `version` is None or matches it, else the stored content."""
    current = load_rubric()
    if version is None or version == current.version:
        return current
    row = session.get(RubricVersion, version)
    if row is None:
        raise RubricError(
            DEFAULT_RUBRIC_PATH,
            [f"rubric version {version!r} is neither the current file ({current.version}) nor "
             "stored in rubric_versions; judge with it first or pass rubric_version=None"],
        )
    return rubric_from_dict(row.content, source=f"rubric_versions:{version}")


# ---- scoring ---------------------------------------------------------------------------------
@dataclass
class RubricOutcome:
    """The rubric decision for one conversation (see module docstring for the rules)."""

    score: float
    passed: bool
    safety_failed: bool
    failed_criteria: list[str]
    judges: list[str]
    errored_criteria: list[str] = field(default_factory=list)
    missing_criteria: list[str] = field(default_factory=list)
    rubric_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score, "passed": self.passed, "safety_failed": self.safety_failed,
            "failed_criteria": self.failed_criteria, "judges": self.judges,
            "errored_criteria": self.errored_criteria,
            "missing_criteria": self.missing_criteria, "rubric_version": self.rubric_version,
        }


def _status(verdict: str, na_valid: bool) -> Literal["pass", "fail", "na"]:
    if verdict == "YES":
        return "pass"
    if verdict == "NA" and na_valid:
        return "na"
    return "fail"  # NO, NA where not valid, ERROR


def score_verdicts(
    rubric: Rubric,
    verdicts: dict[str, dict[str, str]],
    policy: Policy = "both",
) -> RubricOutcome:
    """Score one conversation from {judge_slot: {criterion: verdict}} (pure; no database)."""
    if policy not in ("both", "either"):
        raise ValueError(f"policy must be 'both' or 'either', got {policy!r}")
    judges = sorted(verdicts)
    combined: dict[str, str] = {}
    safety_failed = False
    errored: set[str] = set()
    missing: list[str] = []
    for cid in rubric.criterion_ids():
        crit = rubric.criteria[cid]
        per_judge = [v[cid] for v in verdicts.values() if cid in v]
        if not per_judge:
            missing.append(cid)
            combined[cid] = "fail"
            if cid in rubric.safety_gates:
                safety_failed = True
            continue
        if "ERROR" in per_judge:
            errored.add(cid)
        statuses = [_status(v, crit.na_valid) for v in per_judge]
        if cid in rubric.safety_gates and "fail" in statuses:
            safety_failed = True
        if policy == "both":
            status = "fail" if "fail" in statuses else "pass" if "pass" in statuses else "na"
        else:
            status = "pass" if "pass" in statuses else "na" if "na" in statuses else "fail"
        combined[cid] = status
    weighted = 0.0
    weight_total = 0.0
    for cat in rubric.categories.values():
        assessed = [combined[c] for c in cat.criteria if combined[c] != "na"]
        if not assessed:
            continue
        weighted += cat.weight * assessed.count("pass") / len(assessed)
        weight_total += cat.weight
    # Every criterion NA (only possible when all are na_valid) leaves nothing to fail.
    score = round(weighted / weight_total, 6) if weight_total else 1.0
    failed = [cid for cid in rubric.criterion_ids() if combined[cid] == "fail"]
    return RubricOutcome(
        score=score,
        passed=score >= rubric.pass_threshold and not safety_failed,
        safety_failed=safety_failed,
        failed_criteria=failed,
        judges=judges,
        errored_criteria=sorted(errored),
        missing_criteria=missing,
        rubric_version=rubric.version,
    )


def _load_verdicts(
    session: Session, conversation_ids: Sequence[str], rubric_version: str,
    judges: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, str]]]:
    """{conversation_id: {judge: {criterion: verdict}}} for one rubric version."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    ids = list(dict.fromkeys(conversation_ids))
    for start in range(0, len(ids), 5000):
        stmt = select(
            Judgment.conversation_id, Judgment.judge, Judgment.criterion, Judgment.verdict
        ).where(
            Judgment.conversation_id.in_(ids[start:start + 5000]),
            Judgment.rubric_version == rubric_version,
        )
        if judges:
            stmt = stmt.where(Judgment.judge.in_(list(judges)))
        for cid, judge, criterion, verdict in session.execute(stmt):
            out.setdefault(cid, {}).setdefault(judge, {})[criterion] = verdict
    return out


def rubric_outcomes(
    session: Session,
    conversation_ids: list[str],
    rubric_version: str | None = None,
    policy: Literal["both", "either"] = "both",
) -> dict[str, RubricOutcome]:
    """Score each judged conversation from the `judgments` table.

    `rubric_version` None means the current rubric file. Conversations without any judgment for
    that version are absent from the result (not judged yet ≠ failed).
    """
    rubric = rubric_for_version(session, rubric_version)
    stored = _load_verdicts(session, conversation_ids, rubric.version)
    return {cid: score_verdicts(rubric, verdicts, policy) for cid, verdicts in stored.items()}


def cohen_kappa(confusion: dict[str, int]) -> float | None:
    """Cohen's kappa from {"A/B": count} verdict pairs; None when chance agreement is 1
    (e.g. both judges always said YES: agreement says nothing about their reliability)."""
    total = sum(confusion.values())
    if not total:
        return None
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    observed = 0
    for key, n in confusion.items():
        a, b = key.split("/")
        first[a] = first.get(a, 0) + n
        second[b] = second.get(b, 0) + n
        observed += n if a == b else 0
    expected = sum(first[k] * second.get(k, 0) for k in first) / (total * total)
    if expected >= 1.0:
        return None
    return round((observed / total - expected) / (1 - expected), 4)


def judge_agreement(
    session: Session,
    conversation_ids: Sequence[str],
    rubric_version: str | None = None,
    judges: tuple[str, str] = ("judge", "judge2"),
) -> dict[str, Any]:
    """Per-criterion agreement between two judges over conversations both judged.

    Pairs where either verdict is ERROR are left out (counted as `errored`); agreement is on the
    raw verdict (YES/NO/NA), with Cohen's kappa beside it (agreement beyond chance).
    `disagreement_rate` is over all compared (conversation, criterion) pairs;
    `conversation_disagreement_rate` is the share of conversations with any disagreement.
    """
    rubric = rubric_for_version(session, rubric_version)
    stored = _load_verdicts(session, conversation_ids, rubric.version, judges)
    first, second = judges
    per_criterion: dict[str, dict[str, Any]] = {}
    compared_total = agree_total = 0
    conversations_compared = conversations_disagreeing = 0
    for cid in rubric.criterion_ids():
        per_criterion[cid] = {"compared": 0, "agree": 0, "errored": 0, "agreement": None,
                              "confusion": {}}
    for verdicts in stored.values():
        a, b = verdicts.get(first, {}), verdicts.get(second, {})
        any_compared = any_disagree = False
        for cid in rubric.criterion_ids():
            if cid not in a or cid not in b:
                continue
            row = per_criterion[cid]
            if "ERROR" in (a[cid], b[cid]):
                row["errored"] += 1
                continue
            row["compared"] += 1
            key = f"{a[cid]}/{b[cid]}"
            row["confusion"][key] = row["confusion"].get(key, 0) + 1
            any_compared = True
            if a[cid] == b[cid]:
                row["agree"] += 1
            else:
                any_disagree = True
        if any_compared:
            conversations_compared += 1
            conversations_disagreeing += int(any_disagree)
    pooled: dict[str, int] = {}
    for row in per_criterion.values():
        compared_total += row["compared"]
        agree_total += row["agree"]
        if row["compared"]:
            row["agreement"] = round(row["agree"] / row["compared"], 4)
        row["kappa"] = cohen_kappa(row["confusion"])
        for key, n in row["confusion"].items():
            pooled[key] = pooled.get(key, 0) + n
    return {
        "rubric_version": rubric.version,
        "judges": list(judges),
        "per_criterion": per_criterion,
        "compared": compared_total,
        "agreement_rate": round(agree_total / compared_total, 4) if compared_total else None,
        "disagreement_rate": (
            round(1 - agree_total / compared_total, 4) if compared_total else None
        ),
        "kappa": cohen_kappa(pooled),
        "conversations_compared": conversations_compared,
        "conversation_disagreement_rate": (
            round(conversations_disagreeing / conversations_compared, 4)
            if conversations_compared else None
        ),
    }


# ---- judging ---------------------------------------------------------------------------------
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
    from tasks.tag.taggers import _clip

    return {
        "rubric_name": rubric.name,
        "messages": [{"role": m["role"], "content": _clip(m["content"])} for m in messages],
        "system_prompt": _clip(system_prompt),
    }


def criterion_messages(rubric: Rubric, criterion_id: str, messages: Sequence[dict[str, str]],
                       system_prompt: str = "") -> list[dict[str, str]]:
    """The per-criterion judge prompt (include/prompts/judge/criterion.jinja2)."""
    from tasks.tag.taggers import render_block

    context = _judge_context(rubric, messages, system_prompt)
    context.update(criterion_id=criterion_id, criterion=rubric.criteria[criterion_id])
    return [{"role": "system", "content": render_block("judge/criterion.jinja2", "system", context)},
            {"role": "user", "content": render_block("judge/criterion.jinja2", "user", context)}]


def combined_messages(rubric: Rubric, messages: Sequence[dict[str, str]],
                      system_prompt: str = "") -> list[dict[str, str]]:
    """All criteria in one judge prompt (include/prompts/judge/combined.jinja2)."""
    from tasks.tag.taggers import render_block

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


def judge_shard(shard: dict[str, Any], cfg: TaggingConfig) -> dict[str, Any]:
    """Stage entry point (DAG): judge a shard's conversations; see `tasks.tag.stage.judge_shard`."""
    from tasks.tag.stage import judge_shard as run

    return run(shard, cfg)
