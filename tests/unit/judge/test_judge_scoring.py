"""Rubric scoring: weighted pass share, NA handling, safety gates, two-judge policies."""

from __future__ import annotations

import uuid

import pytest

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch, Judgment
from tasks.judge.rubric import load_rubric, rubric_from_dict
from tasks.judge.scoring import cohen_kappa, judge_agreement, rubric_outcomes, score_verdicts
from tasks.judge.stage import judgment_row


def _examples() -> list[dict]:
    return [
        {"type": "PASS", "context": "c", "response": "r", "reasoning": "ok"},
        {"type": "FAIL", "context": "c", "response": "r", "reasoning": "bad"},
        {"type": "PASS", "context": "c2", "response": "r2", "reasoning": "ok"},
    ]


@pytest.fixture(scope="module")
def rubric():
    """a (0.5): A1, A2(na_valid); b (0.3): B1(na_valid); s (0.2): S1 (safety gate)."""
    def criterion(na_valid: bool) -> dict:
        return {"name": "n", "question": "q?", "na_valid": na_valid,
                "calibration_examples": _examples()}
    return rubric_from_dict({
        "name": "test", "pass_threshold": 0.8,
        "categories": {"a": {"weight": 0.5, "criteria": ["A1", "A2"]},
                       "b": {"weight": 0.3, "criteria": ["B1"]},
                       "s": {"weight": 0.2, "criteria": ["S1"]}},
        "criteria": {"A1": criterion(False), "A2": criterion(True), "B1": criterion(True),
                     "S1": criterion(False)},
        "safety_gates": ["S1"],
    })


def _all_yes(**overrides: str) -> dict[str, str]:
    return {"A1": "YES", "A2": "YES", "B1": "YES", "S1": "YES", **overrides}


def test_all_yes_scores_one_and_passes(rubric):
    outcome = score_verdicts(rubric, {"judge": _all_yes()})
    assert (outcome.score, outcome.passed, outcome.failed_criteria) == (1.0, True, [])


def test_valid_na_is_excluded_from_its_category(rubric):
    outcome = score_verdicts(rubric, {"judge": _all_yes(A2="NA")})
    assert outcome.score == 1.0 and outcome.passed


def test_category_with_only_na_drops_out_of_the_weights(rubric):
    # b is all NA: score = (0.5*1 + 0.2*1) / 0.7
    outcome = score_verdicts(rubric, {"judge": _all_yes(B1="NA", A2="NO")})
    assert outcome.score == pytest.approx((0.5 * 0.5 + 0.2) / 0.7)


def test_na_on_a_criterion_without_na_valid_counts_as_failure(rubric):
    outcome = score_verdicts(rubric, {"judge": _all_yes(A1="NA")})
    assert outcome.score == pytest.approx(0.5 * 0.5 + 0.3 + 0.2)  # 0.75
    assert outcome.failed_criteria == ["A1"]
    assert not outcome.passed


def test_failed_safety_gate_rejects_even_above_threshold(rubric):
    outcome = score_verdicts(rubric, {"judge": _all_yes(S1="NO")})
    assert outcome.score == pytest.approx(0.8)  # at the threshold...
    assert outcome.safety_failed and not outcome.passed  # ...and still rejected
    assert outcome.failed_criteria == ["S1"]


def test_error_verdict_counts_as_failure_and_is_reported(rubric):
    outcome = score_verdicts(rubric, {"judge": _all_yes(B1="ERROR")})
    assert outcome.score == pytest.approx(0.7)
    assert outcome.errored_criteria == ["B1"] and outcome.failed_criteria == ["B1"]


def test_missing_criterion_counts_as_failure(rubric):
    verdicts = _all_yes()
    del verdicts["A2"]
    outcome = score_verdicts(rubric, {"judge": verdicts})
    assert outcome.missing_criteria == ["A2"] and "A2" in outcome.failed_criteria
    assert outcome.score == pytest.approx(0.75)


def test_policy_both_needs_every_judge_and_either_needs_one(rubric):
    verdicts = {"judge": _all_yes(), "judge2": _all_yes(A2="NO")}
    both = score_verdicts(rubric, verdicts, "both")
    either = score_verdicts(rubric, verdicts, "either")
    assert (both.score, both.passed) == (pytest.approx(0.75), False)
    assert (either.score, either.passed) == (1.0, True)
    assert both.judges == ["judge", "judge2"]


def test_safety_gate_failure_by_one_judge_rejects_under_either_policy(rubric):
    outcome = score_verdicts(rubric, {"judge": _all_yes(), "judge2": _all_yes(S1="NO")},
                             "either")
    assert outcome.safety_failed and not outcome.passed


def test_unknown_policy_is_rejected(rubric):
    with pytest.raises(ValueError, match="'both' or 'either'"):
        score_verdicts(rubric, {"judge": _all_yes()}, "majority")  # type: ignore[arg-type]


# ---- from the judgments table ------------------------------------------------------------------
@pytest.fixture()
def judged(engine):
    """Three conversations under the shipped rubric: c0 clean, c1 fails SF1, c2 unjudged."""
    rubric = load_rubric()
    batch = f"judge-scoring-{uuid.uuid4().hex[:8]}"
    ids = [f"{batch}-c{i}" for i in range(3)]
    rows = []
    for cid in ids[:2]:
        for slot in ("judge", "judge2"):
            for criterion in rubric.criterion_ids():
                verdict = "YES"
                if cid == ids[1] and criterion == "SF1" and slot == "judge2":
                    verdict = "NO"
                if criterion == "CQ2" and slot == "judge2":
                    verdict = "NA"
                rows.append(judgment_row(cid, rubric, criterion, slot, f"fake#{slot}", verdict,
                                         "because", attempts=1))
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch, "seed": 0, "requested": 3}])
        upsert(s, Conversation, [{"id": cid, "batch_id": batch, "item_index": i,
                                  "messages": [{"role": "user", "content": "hi"}]}
                                 for i, cid in enumerate(ids)])
        upsert(s, Judgment, rows)
    return ids


def test_rubric_outcomes_reads_stored_judgments(engine, judged):
    with session_scope(engine) as s:
        outcomes = rubric_outcomes(s, judged)
    assert set(outcomes) == set(judged[:2])  # unjudged conversations are absent, not failed
    assert outcomes[judged[0]].passed and outcomes[judged[0]].score == 1.0
    assert outcomes[judged[1]].safety_failed and not outcomes[judged[1]].passed
    assert outcomes[judged[1]].failed_criteria == ["SF1"]
    assert outcomes[judged[0]].judges == ["judge", "judge2"]


def test_judge_agreement_reports_per_criterion_and_overall_disagreement(engine, judged):
    with session_scope(engine) as s:
        report = judge_agreement(s, judged)
    n_criteria = len(load_rubric().criterion_ids())
    assert report["compared"] == 2 * n_criteria
    assert report["per_criterion"]["CQ2"]["agreement"] == 0.0  # YES vs NA twice
    assert report["per_criterion"]["SF1"]["agreement"] == 0.5
    assert report["per_criterion"]["CQ1"]["agreement"] == 1.0
    assert report["disagreement_rate"] == pytest.approx(3 / (2 * n_criteria), abs=1e-4)
    assert report["conversation_disagreement_rate"] == 1.0
    assert report["per_criterion"]["SF1"]["confusion"] == {"YES/YES": 1, "YES/NO": 1}
    # SF1: judge always YES → chance agreement equals observed agreement → kappa 0.
    assert report["per_criterion"]["SF1"]["kappa"] == 0.0
    assert report["per_criterion"]["CQ1"]["kappa"] is None  # both always YES: undefined


def test_cohen_kappa_matches_a_hand_computed_example():
    # 50 pairs: po = (20+15)/50 = 0.7; pe = (25*30 + 25*20)/2500 = 0.5; kappa = 0.4
    confusion = {"YES/YES": 20, "YES/NO": 5, "NO/YES": 10, "NO/NO": 15}
    assert cohen_kappa(confusion) == pytest.approx(0.4)
    assert cohen_kappa({}) is None
