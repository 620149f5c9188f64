"""Row filters at their boundaries, near-duplicate pruning, and the seeded split (pure, no DB)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.curate.config import CurationConfig
from tasks.curate.filters import (
    apply_filters,
    assign_splits,
    explain,
    filter_emotion_confidence,
    filter_hallucination,
    filter_malformed,
    filter_required_taggers,
    filter_rubric_pass,
    filter_safety_gates,
    filter_tokens,
    filter_turns,
    filter_words,
    near_duplicates,
)
from tasks.curate.rows import CandidateRow

CFG = CurationConfig(tokenizer=None, max_hallucination=0.1, min_emotion_confidence=0.5,
                     max_turns=3, min_words=5, max_words=10, sequence_len=100)


def row(**kw) -> CandidateRow:
    base = dict(conversation_id=kw.pop("cid", "c1"),
                messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}],
                persona_id="p1", taxonomy_cell={"topic": "work"},
                tags={"emotion": {"confidence": 0.8}, "topic": {"topics": ["work"]},
                      "temporal": {"focus": "now"}, "hallucination": {"hallucination_score": 0.0}},
                rubric={"score": 1.0, "passed": True, "safety_failed": False, "failed_criteria": []})
    base.update(kw)
    return CandidateRow(**base)


def with_score(tagger: str, key: str, value: float) -> CandidateRow:
    r = row()
    r.tags[tagger] = {key: value}
    return r


@pytest.mark.parametrize(("value", "excluded"), [(0.0, False), (0.1, False),
                                                  (0.1000001, True), (0.9, True)])
def test_hallucination_at_the_threshold_is_kept_above_is_dropped(value, excluded):
    result = filter_hallucination(with_score("hallucination", "hallucination_score", value), CFG)
    assert (result is not None) is excluded
    if excluded:
        assert result.reason == "hallucination_above_max"
        assert result.detail == {"value": value, "threshold": 0.1}


def test_hallucination_filter_off_when_threshold_is_null():
    cfg = CFG.model_copy(update={"max_hallucination": None})
    assert filter_hallucination(with_score("hallucination", "hallucination_score", 1.0), cfg) is None


@pytest.mark.parametrize(("value", "excluded"), [(0.4999, True), (0.5, False), (0.51, False)])
def test_emotion_confidence_at_the_minimum_is_kept_below_is_dropped(value, excluded):
    result = filter_emotion_confidence(with_score("emotion", "confidence", value), CFG)
    assert (result is not None) is excluded
    if excluded:
        assert result.reason == "emotion_confidence_below_min"


def test_required_taggers_all_present_is_kept_one_missing_is_named():
    assert filter_required_taggers(row(), CFG) is None
    r = row()
    del r.tags["temporal"]
    result = filter_required_taggers(r, CFG)
    assert result.reason == "missing_required_tags"
    assert result.detail["missing"] == ["temporal"]


def test_rubric_pass_required_drops_failed_and_unjudged_rows():
    assert filter_rubric_pass(row(), CFG) is None
    failed = row(rubric={"score": 0.6, "passed": False, "safety_failed": False,
                         "failed_criteria": ["HP1"]})
    assert filter_rubric_pass(failed, CFG).reason == "rubric_failed"
    assert filter_rubric_pass(row(rubric=None), CFG).reason == "rubric_not_judged"
    lenient = CFG.model_copy(update={"require_rubric_pass": False})
    assert filter_rubric_pass(failed, lenient) is None
    assert filter_rubric_pass(row(rubric=None), lenient) is None


def test_safety_gate_failure_drops_even_when_rubric_pass_is_not_required():
    unsafe = row(rubric={"score": 0.95, "passed": False, "safety_failed": True,
                         "failed_criteria": ["SF1"]})
    lenient = CFG.model_copy(update={"require_rubric_pass": False})
    result = filter_safety_gates(unsafe, lenient)
    assert result.reason == "safety_gate_failed"
    assert result.detail["failed_criteria"] == ["SF1"]
    assert filter_safety_gates(row(), lenient) is None


@pytest.mark.parametrize(("turns", "excluded"), [(3, False), (4, True)])
def test_turns_bound(turns, excluded):
    r = row()
    r.turns = turns
    assert (filter_turns(r, CFG) is not None) is excluded


@pytest.mark.parametrize(("words", "excluded"), [(4, True), (5, False), (10, False), (11, True)])
def test_word_bounds(words, excluded):
    r = row()
    r.words = words
    assert (filter_words(r, CFG) is not None) is excluded


@pytest.mark.parametrize(("tokens", "excluded"), [(100, False), (101, True)])
def test_tokens_against_sequence_len(tokens, excluded):
    r = row()
    r.tokens = tokens
    result = filter_tokens(r, CFG)
    assert (result is not None) is excluded
    if excluded:
        assert explain(result.reason, result.detail) == "101 tokens > sequence_len 100"


def test_conversation_must_end_with_an_assistant_reply():
    r = row(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "and?"}])
    result = filter_malformed(r, CFG)
    assert result.reason == "malformed_messages"
    assert "last message is from 'user'" in explain(result.reason, result.detail)
    assert filter_malformed(row(), CFG) is None


def test_every_failing_filter_is_recorded_for_a_row():
    bad = row(cid="bad", rubric={"score": 0.2, "passed": False, "safety_failed": True,
                                 "failed_criteria": ["SF2"]})
    bad.tags["hallucination"] = {"hallucination_score": 0.5}
    del bad.tags["topic"]
    bad.turns, bad.words, bad.tokens = 1, 7, 50
    kept, exclusions, _ = apply_filters([bad], CFG.model_copy(update={"dedup_threshold": None}))
    assert kept == []
    assert {e["reason"] for e in exclusions} == {
        "hallucination_above_max", "missing_required_tags", "safety_gate_failed"}


def test_failed_generation_is_excluded_for_that_reason_only():
    failed = row(cid="f", status="failed", failure_reason="empty reply", tags={}, rubric=None)
    _, exclusions, _ = apply_filters([failed], CFG)
    assert [(e["reason"], e["detail"]["failure_reason"]) for e in exclusions] == [
        ("generation_not_ok", "empty reply")]


def _rows_with_vectors(vectors: np.ndarray) -> list[CandidateRow]:
    rows = []
    for i, v in enumerate(vectors):
        r = row(cid=f"c{i:03d}", embedding=v,
                messages=[{"role": "user", "content": f"question number {i} about plans"},
                          {"role": "assistant", "content": f"reply {i} with one concrete step"}])
        r.turns, r.words, r.tokens = 1, 8, 40
        rows.append(r)
    return rows


def _pair(cosine: float) -> np.ndarray:
    return np.asarray([[1.0, 0.0, 0.0], [cosine, float(np.sqrt(1 - cosine**2)), 0.0]])


@pytest.mark.parametrize(("cosine", "pruned"), [(0.94, False), (0.96, True), (1.0, True)])
def test_near_duplicate_pruning_around_the_threshold(cosine, pruned):
    rows = _rows_with_vectors(_pair(cosine))
    cfg = CFG.model_copy(update={"dedup_threshold": 0.95})
    kept, exclusions, dedup = apply_filters(rows, cfg)
    assert len(kept) == (1 if pruned else 2)
    if pruned:
        assert exclusions[0]["reason"] == "near_duplicate"
        assert exclusions[0]["detail"]["duplicate_of"] == "c000"
        assert dedup == {"threshold": 0.95, "method": "exact", "pruned": 1}


def test_the_better_scored_row_of_a_duplicate_pair_survives():
    rows = _rows_with_vectors(_pair(0.99))
    rows[0].tags["hallucination"] = {"hallucination_score": 0.08}  # c000 is worse than c001
    kept, exclusions, _ = apply_filters(rows, CFG)
    assert [r.conversation_id for r in kept] == ["c001"]
    assert exclusions[0]["conversation_id"] == "c000"


def test_exact_content_duplicates_are_dropped_before_embeddings_are_needed():
    a = row(cid="a")
    b = row(cid="b")  # same messages → same content hash; no embeddings anywhere
    for r in (a, b):
        r.turns, r.words, r.tokens = 1, 6, 30
    kept, exclusions, _ = apply_filters([a, b], CFG)
    assert [r.conversation_id for r in kept] == ["a"]
    assert exclusions == [{"conversation_id": "b", "reason": "duplicate_content",
                           "detail": {"duplicate_of": "a"}}]


def test_lsh_finds_the_same_planted_near_duplicates_as_the_exact_search():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((3000, 384)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    planted = base[:25] + 0.15 * rng.standard_normal((25, 384)).astype(np.float32) / np.sqrt(384)
    vectors = np.vstack([base, planted])
    ids = [f"v{i}" for i in range(len(vectors))]
    exact, method_exact = near_duplicates(ids, vectors, 0.95, method="exact")
    lsh, method_lsh = near_duplicates(ids, vectors, 0.95, method="lsh")
    assert (method_exact, method_lsh) == ("exact", "lsh")
    assert set(exact) == set(range(3000, 3025))
    assert {k: v[0] for k, v in lsh.items()} == {k: v[0] for k, v in exact.items()}


def test_split_is_seeded_exact_in_size_and_stable_when_rows_are_added():
    rows = [row(cid=f"c{i}") for i in range(100)]
    assign_splits(rows, 0.1, seed=13)
    val = {r.conversation_id for r in rows if r.split == "validation"}
    assert len(val) == 10
    again = [row(cid=f"c{i}") for i in range(100)]
    assign_splits(again, 0.1, seed=13)
    assert {r.conversation_id for r in again if r.split == "validation"} == val
    other = [row(cid=f"c{i}") for i in range(100)]
    assign_splits(other, 0.1, seed=14)
    assert {r.conversation_id for r in other if r.split == "validation"} != val
    grown = [row(cid=f"c{i}") for i in range(110)]
    assign_splits(grown, 0.1, seed=13)
    grown_val = {r.conversation_id for r in grown if r.split == "validation"}
    assert len(grown_val) == 11 and len(grown_val & val) >= 9
