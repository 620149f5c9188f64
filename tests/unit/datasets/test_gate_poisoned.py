"""The GE gate blocks each kind of poisoned batch and names the expectation that caught it.

Batches are fed to the gate directly (rows → `gate_frame` → `run_curated_gate`), so the row
filters cannot remove the poison first.
"""

from __future__ import annotations

import pytest

from tasks.curate.stage import CandidateRow, CurationConfig, gate_frame
from tasks.datasets.gate import (
    COMPLETE_FIELDS,
    EDGE_CASE_SHARE,
    HALLUCINATION_WITHIN_MAX,
    NO_PII,
    REQUIRED_TAGGERS_PRESENT,
    UNIQUE_CONVERSATION_HASHES,
    GateSpec,
    pii_column,
    run_curated_gate,
)

N = 200
CFG = CurationConfig(tokenizer=None)
SPEC = GateSpec(max_hallucination=0.1, min_emotion_confidence=0.3,
                required_taggers=["emotion", "topic", "temporal", "hallucination"],
                require_rubric_pass=True, max_turns=10, min_words=3, max_words=500,
                sequence_len=1024, edge_case_target=0.15, edge_case_tolerance=0.05,
                min_rows=100, min_topic_diversity=5, min_persona_diversity=10)


def clean_rows(n: int = N) -> list[CandidateRow]:
    rows = []
    for i in range(n):
        tags = {"emotion": {"tones": ["calm"], "confidence": 0.7},
                "topic": {"topics": ["work"], "confidence": 0.8},
                "temporal": {"focus": "present", "confidence": 0.9},
                "hallucination": {"hallucination_score": 0.02 + (i % 5) / 100, "claims": []}}
        row = CandidateRow(
            conversation_id=f"conv-{i:04d}",
            messages=[{"role": "user", "content": f"Question {i} about my week and plans?"},
                      {"role": "assistant", "content": f"Answer {i}: start with one small step."}],
            persona_id=f"persona-{i % 20}", taxonomy_cell={"topic": f"topic-{i % 7}"},
            is_edge_case=(i % 20) < 3,  # exactly 15%
            tags=tags, rubric={"score": 0.9, "passed": True, "safety_failed": False})
        row.turns, row.words, row.tokens = 1, 14, 60
        rows.append(row)
    return rows


def gate(rows: list[CandidateRow], docs_dir=None) -> dict:
    texts = ["\n".join(m["content"] for m in r.messages) for r in rows]
    return run_curated_gate(gate_frame(rows, texts, CFG), SPEC, docs_dir=docs_dir)


@pytest.fixture(scope="module")
def clean_result(tmp_path_factory):
    return gate(clean_rows(), docs_dir=tmp_path_factory.mktemp("docs"))


def test_clean_batch_passes_every_expectation(clean_result):
    assert clean_result["success"] is True
    assert clean_result["failed_expectations"] == []
    names = {r["name"] for r in clean_result["results"]}
    assert {HALLUCINATION_WITHIN_MAX, UNIQUE_CONVERSATION_HASHES, REQUIRED_TAGGERS_PRESENT,
            EDGE_CASE_SHARE, NO_PII, "tokens_within_sequence_len", "words_within_bounds",
            "turns_within_bounds", "min_topic_diversity", "min_persona_diversity",
            "min_dataset_size", "safety_gates_clear", "rubric_passed"} <= names
    assert clean_result["statistics"]["rows"] == N
    assert clean_result["data_docs"].endswith("index.html")


def test_hallucination_above_threshold_in_20_percent_of_rows_is_blocked():
    rows = clean_rows()
    for row in rows[::5]:
        row.tags["hallucination"] = {"hallucination_score": 0.4, "claims": []}
    result = gate(rows)
    assert result["success"] is False
    assert result["failed_expectations"] == [HALLUCINATION_WITHIN_MAX]
    detail = next(r for r in result["results"] if r["name"] == HALLUCINATION_WITHIN_MAX)
    assert detail["unexpected_count"] == N // 5
    assert "conv-0000" in detail["sample_ids"]


def test_duplicate_conversations_are_blocked():
    rows = clean_rows()
    for row in rows[100:110]:
        row.content_hash = rows[0].content_hash
    result = gate(rows)
    assert result["failed_expectations"] == [UNIQUE_CONVERSATION_HASHES]


def test_missing_tags_are_blocked():
    rows = clean_rows()
    for row in rows[:30]:
        del row.tags["emotion"]
    result = gate(rows)
    # The missing tagger is named, and the emotion confidence it would have given is absent.
    assert result["failed_expectations"] == [COMPLETE_FIELDS, REQUIRED_TAGGERS_PRESENT]
    detail = next(r for r in result["results"] if r["name"] == REQUIRED_TAGGERS_PRESENT)
    assert detail["unexpected_count"] == 30


def test_edge_case_share_off_target_is_blocked():
    rows = clean_rows()
    for row in rows[:80]:
        row.is_edge_case = True  # 40% + the 15% already among the rest
    result = gate(rows)
    assert result["failed_expectations"] == [EDGE_CASE_SHARE]
    detail = next(r for r in result["results"] if r["name"] == EDGE_CASE_SHARE)
    assert detail["observed_value"] > 0.2


def test_edge_case_share_at_the_tolerance_edge_passes():
    rows = clean_rows()
    for row in rows:
        row.is_edge_case = False
    for row in rows[:40]:  # 20% = 0.15 + 0.05
        row.is_edge_case = True
    assert gate(rows)["success"] is True


def test_planted_pii_is_blocked_and_not_copied_into_data_docs(tmp_path):
    rows = clean_rows()
    planted = ["reach me at dana.k@example.com", "my number is (415) 867-5309",
               "reset: https://acme.io/reset?token=9f8e7d6c5b4a", "key sk-" "live0123456789abcdefghij",
               "card 4111 1111 1111 1111", "IBAN DE89 3704 0044 0532 0130 00"]
    for row, pii in zip(rows[10:16], planted, strict=True):
        row.messages[0]["content"] += " " + pii
    result = gate(rows, docs_dir=tmp_path / "docs")
    assert result["failed_expectations"] == [NO_PII]
    detail = next(r for r in result["results"] if r["name"] == NO_PII and not r["success"])
    assert detail["unexpected_count"] == 6
    ids = [f"conv-{i:04d}" for i in range(10, 16)]
    assert sorted(detail["sample_ids"]) == ids
    # the report names each row and its category, never the value
    assert detail["pii_findings"] == [
        {"row": row, "categories": [category]} for row, category in zip(
            ids, ["EMAIL", "PHONE", "URL", "SECRET", "CREDIT_CARD", "IBAN"], strict=True)]
    html = "".join(p.read_text(errors="ignore") for p in (tmp_path / "docs").rglob("*.html"))
    assert "6 unexpected values found" in html  # the failure is reported ...
    for needle in ("dana.k@example.com", "867-5309", "9f8e7d6c5b4a", "sk-live0123", "4111",
                   "DE89"):
        assert needle not in html and needle not in str(result)  # ... the PII itself is not


def test_known_person_names_are_caught_without_being_written_into_the_suite(tmp_path):
    rows = clean_rows()
    rows[3].messages[1]["content"] += " Zorvana will follow up."
    texts = ["\n".join(m["content"] for m in r.messages) for r in rows]
    pii = pii_column(texts, [{"Zorvana"}] * len(texts))
    assert pii[3] == "PERSON" and set(pii[:3] + pii[4:]) == {""}
    result = run_curated_gate(gate_frame(rows, texts, CFG, pii), SPEC, docs_dir=tmp_path)
    assert result["failed_expectations"] == [NO_PII]
    html = "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.html"))
    assert "Zorvana" not in html


def test_an_empty_batch_fails_the_size_and_diversity_checks_without_crashing():
    result = gate([])
    assert result["success"] is False
    assert set(result["failed_expectations"]) == {
        "min_dataset_size", "min_topic_diversity", "min_persona_diversity", EDGE_CASE_SHARE}


def test_edge_case_tolerance_widens_to_the_sampling_error_of_a_small_dataset():
    """27 rows with 2 edge cases (7.4%) is within chance of a 15% rate; 200 rows at 7.5% is not."""
    spec = GateSpec(edge_case_target=0.15, edge_case_tolerance=0.05)
    low, high, allowed = spec.edge_case_bounds(27)
    assert allowed == pytest.approx(2.576 * (0.15 * 0.85 / 27) ** 0.5)
    assert low < 2 / 27 < high
    assert spec.edge_case_bounds(10_000)[2] == 0.05  # large datasets: the fixed tolerance
    strict = GateSpec(edge_case_target=0.15, edge_case_tolerance=0.05, edge_case_sampling_z=None)
    assert strict.edge_case_bounds(27)[2] == 0.05

    rows = clean_rows()
    for row in rows:
        row.is_edge_case = False
    for row in rows[:15]:  # 7.5% of 200: outside 0.15 ± 0.065
        row.is_edge_case = True
    result = gate(rows)
    assert result["failed_expectations"] == [EDGE_CASE_SHARE]
    small = rows[:27]
    for row in small:
        row.is_edge_case = False
    small[0].is_edge_case = small[1].is_edge_case = True
    texts = ["\n".join(m["content"] for m in r.messages) for r in small]
    small_spec = SPEC.model_copy(update={"min_rows": 1})
    result = run_curated_gate(gate_frame(small, texts, CFG), small_spec)
    assert result["success"] is True, result["failed_expectations"]
