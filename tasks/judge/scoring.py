"""Rubric scoring: stored verdicts → a score and a pass/fail decision, and two-judge agreement.

Rules (one place, used by curation and evaluation): per judge and criterion, YES → pass; NO →
fail; NA → excluded if the criterion is `na_valid`, otherwise fail; ERROR (the judge gave no
parseable verdict) → fail, since an unverified criterion must not let a conversation through.
Across judges, policy "both" → a criterion passes only if no judge failed it; "either" → it passes
if any judge passed it; safety gates ignore the policy: any judge's failure of a safety gate
rejects the conversation. score = Σ weight·(passed / assessed) over categories with at least one
assessed criterion, divided by the sum of those categories' weights; passed = score ≥
pass_threshold and no safety gate failed; a criterion missing from the stored judgments counts as
failed. `score_verdicts` applies the rules to one conversation (pure), `rubric_outcomes` to the
`judgments` table, and `judge_agreement` reports how often the two judges agree (with Cohen's kappa).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks.core.db.models import Judgment
from tasks.judge.rubric import Rubric, rubric_for_version

Policy = Literal["both", "either"]


@dataclass
class RubricOutcome:
    """The rubric decision for one conversation (see the module docstring for the rules)."""

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
