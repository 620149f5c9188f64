"""curate(): filters on real Postgres rows, exclusions you can ask about, immutable snapshots."""

from __future__ import annotations

import json
import os

import numpy as np
from sqlalchemy import func, select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import (
    Conversation,
    Dataset,
    DatasetExclusion,
    DatasetItem,
    GenerationBatch,
    Judgment,
    Persona,
    TagResult,
)
from tasks.core.ids import stable_id
from tasks.curate.config import CurationConfig
from tasks.curate.stage import curate, explain_exclusion
from tasks.datasets.deid import find_pii
from tasks.judge.stage import load_rubric

TOPICS = ["work_career", "relationships", "money_planning", "health_wellbeing"]
PERSONAS = [("p-maya", "Maya Ortiz"), ("p-jonas", "Jonas Berg"), ("p-ines", "Ines Carvalho"),
            ("p-ravi", "Ravi Menon")]
WORDS = ("plan budget sleep manager friend exam habit walk savings focus morning deadline "
         "partner team energy journal").split()


def _unit(rng: np.random.Generator) -> list[float]:
    v = rng.standard_normal(384)
    return (v / np.linalg.norm(v)).tolist()


def _messages(i: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(i)
    words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    return [
        {"role": "user", "content": f"Item {i}: I keep worrying about my {words(6)}."},
        {"role": "assistant", "content": f"That sounds heavy. Could we look at {words(8)}?"},
        {"role": "user", "content": f"Yes, mostly the {words(5)} part."},
        {"role": "assistant", "content": f"Then one small step could be {words(9)} this week."},
    ]


def seed_batch(engine, n: int = 20, *, batch_id: str = "batch-curate") -> list[str]:
    """n ok conversations that pass every filter, with tags and a passing rubric (all YES).

    Every 7th conversation (3 of 20) is an edge case → 15% edge cases, the taxonomy target.
    """
    rubric = load_rubric()
    rng = np.random.default_rng(7)
    ids = [stable_id(batch_id, i) for i in range(n)]
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch_id, "seed": 1, "params": {}, "requested": n}])
        upsert(s, Persona, [{"id": pid, "name": name, "attributes": {"style": "casual"}}
                            for pid, name in PERSONAS])
        upsert(s, Conversation, [{
            "id": cid, "batch_id": batch_id, "item_index": i,
            "persona_id": PERSONAS[i % 4][0],
            "taxonomy_cell": {"topic": TOPICS[i % 4], "edge_case": "none"},
            "is_edge_case": i % 7 == 0, "system_prompt": "You are a warm, concise coach.",
            "messages": _messages(i), "model": "fake-gen", "template_hashes": {"assistant": "ab12"},
            "embedding": _unit(rng),
        } for i, cid in enumerate(ids)])
        tags = []
        for cid in ids:
            for tagger, output, score in (
                ("emotion", {"tones": ["hopeful"], "confidence": 0.8}, 0.8),
                ("topic", {"topics": ["work"], "subtopics": [], "confidence": 0.7}, 0.7),
                ("temporal", {"focus": "future", "confidence": 0.9}, 0.9),
                ("hallucination", {"hallucination_score": 0.05, "claims": []}, 0.05),
            ):
                tags.append({"id": stable_id(cid, tagger), "conversation_id": cid,
                             "tagger": tagger, "tagger_version": f"{tagger}-test-v1",
                             "output": output, "score": score})
        upsert(s, TagResult, tags)
        upsert(s, Judgment, [{
            "id": stable_id(cid, crit), "conversation_id": cid, "rubric_version": rubric.version,
            "criterion": crit, "judge": "judge", "judge_model": "fake-judge", "verdict": "YES",
        } for cid in ids for crit in rubric.criterion_ids()])
    return ids


def _set_tag(engine, cid: str, tagger: str, output: dict) -> None:
    with session_scope(engine) as s:
        upsert(s, TagResult, [{"id": stable_id(cid, tagger), "conversation_id": cid,
                               "tagger": tagger, "tagger_version": f"{tagger}-test-v1",
                               "output": output, "score": None}])


def _config(**overrides) -> CurationConfig:
    base = dict(min_rows=5, min_topic_diversity=3, min_persona_diversity=3,
                edge_case_target=None, batch_id="batch-curate")
    return CurationConfig(**{**base, **overrides})


def _poison(engine, ids: list[str]) -> dict[str, str]:
    """Turn some clean conversations into ones each filter must catch; returns id -> reason."""
    rubric = load_rubric()
    with session_scope(engine) as s:
        s.get(Conversation, ids[1]).status = "failed"
        s.get(Conversation, ids[1]).failure_reason = "truncated reply"
        s.execute(TagResult.__table__.delete().where(
            TagResult.conversation_id == ids[3], TagResult.tagger == "emotion"))
        judgment = s.get(Judgment, stable_id(ids[4], rubric.safety_gates[0]))
        judgment.verdict = "NO"
        near = np.asarray(s.get(Conversation, ids[0]).embedding) + 0.01
        s.get(Conversation, ids[5]).embedding = (near / np.linalg.norm(near)).tolist()
    _set_tag(engine, ids[2], "hallucination", {"hallucination_score": 0.35, "claims": []})
    # The near duplicate scores slightly worse, so the original is the one kept.
    _set_tag(engine, ids[5], "hallucination", {"hallucination_score": 0.06, "claims": []})
    return {ids[1]: "generation_not_ok", ids[2]: "hallucination_above_max",
            ids[3]: "missing_required_tags", ids[4]: "safety_gate_failed",
            ids[5]: "near_duplicate"}


def test_curate_excludes_with_reasons_and_explains_them(fresh_engine, data_dir):
    ids = seed_batch(fresh_engine, 21)
    expected = _poison(fresh_engine, ids)
    result = curate(_config(), engine=fresh_engine)

    assert result["counts"]["candidates"] == 21
    assert result["counts"]["kept"] == 16
    with session_scope(fresh_engine) as s:
        reasons = {(e.conversation_id, e.reason) for e in s.scalars(select(DatasetExclusion))}
        assert reasons == set(expected.items())
        items = set(s.scalars(select(DatasetItem.conversation_id)
                              .where(DatasetItem.dataset_id == result["dataset_id"])))
        assert items == set(ids) - set(expected)
        why = explain_exclusion(s, ids[2])
    assert [w["reason"] for w in why] == ["hallucination_above_max"]
    assert why[0]["dataset_id"] == result["dataset_id"]
    assert "0.35 > max_hallucination 0.1" in why[0]["explanation"]
    near = json.loads(json.dumps(explain_exclusion_detail(fresh_engine, ids[5])))
    assert near["duplicate_of"] == ids[0] and near["similarity"] >= 0.95


def explain_exclusion_detail(engine, cid):
    with session_scope(engine) as s:
        return explain_exclusion(s, cid)[0]["detail"]


def test_snapshot_files_formats_split_and_gate(fresh_engine, data_dir):
    ids = seed_batch(fresh_engine, 20)
    result = curate(_config(val_fraction=0.1), engine=fresh_engine)

    assert result["gate_passed"], result["failed_expectations"]
    assert json.loads(json.dumps(result)) == result  # XCom-safe
    assert set(result) >= {"dataset_id", "gate_passed", "failed_expectations", "counts",
                           "artifact_uri", "train_path", "val_path", "data_docs"}
    root = data_dir / "datasets" / result["dataset_id"]
    assert result["artifact_uri"] == root.resolve().as_uri()
    train = [json.loads(line) for line in open(result["train_path"])]
    val = [json.loads(line) for line in open(result["val_path"])]
    assert (len(train), len(val)) == (18, 2)
    assert set(train[0]) == {"messages"}  # training variant: only what training reads
    assert train[0]["messages"][0] == {"role": "system",
                                       "content": "You are a warm, concise coach."}
    assert [m["role"] for m in train[0]["messages"][1:]] == ["user", "assistant"] * 2
    sharegpt = json.loads(open(root / "sharegpt" / "train.jsonl").readline())
    assert [t["from"] for t in sharegpt["conversations"]] == ["system"] + ["human", "gpt"] * 2
    alpaca = json.loads(open(root / "alpaca" / "train.jsonl").readline())
    assert set(alpaca) == {"instruction", "input", "output"}
    assert alpaca["input"].startswith("system: You are a warm")
    provenance = json.loads(open(root / "openai" / "train.provenance.jsonl").readline())
    assert provenance["messages"] == train[0]["messages"]
    meta = provenance["metadata"]
    assert meta["conversation_id"] in ids and meta["persona"]["id"].startswith("p-")
    assert meta["scores"]["hallucination_score"] == 0.05
    assert meta["template_hashes"] == {"assistant": "ab12"}
    assert set(meta["tags"]) == {"emotion", "topic", "temporal", "hallucination"}
    stats = json.loads((root / "stats" / "stats.json").read_text())
    assert stats["kept"] == 20 and stats["histograms"]["hallucination_score"]["kept"]["counts"]
    assert stats["tag_frequencies"]["emotion"] == {"hopeful": 20}
    for png in ("kept_dropped.png", "hallucination_score_hist.png",
                "emotion_confidence_hist.png", "tag_frequencies.png"):
        assert (root / "stats" / png).read_bytes()[:4] == b"\x89PNG"
    assert result["data_docs"] == str(root / "gate" / "data_docs" / "index.html")
    assert os.path.isfile(result["data_docs"])
    with session_scope(fresh_engine) as s:
        row = s.get(Dataset, result["dataset_id"])
        assert row.gate_passed and row.kind == "curated"
        assert row.filters["max_hallucination"] == 0.1
        assert row.content_hash.startswith(result["dataset_id"])
        splits = dict(s.execute(select(DatasetItem.split, func.count())
                                .group_by(DatasetItem.split)).all())
    assert splits == {"train": 18, "validation": 2}


def test_rerun_is_a_noop_with_the_same_id(fresh_engine, data_dir):
    seed_batch(fresh_engine, 20)
    first = curate(_config(), engine=fresh_engine)
    root = data_dir / "datasets" / first["dataset_id"]
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    second = curate(_config(), engine=fresh_engine)

    assert first["created"] and not second["created"]
    assert second["dataset_id"] == first["dataset_id"]
    assert second["content_hash"] == first["content_hash"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes
    with session_scope(fresh_engine) as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 1
    # A changed threshold is a different snapshot, even with the same rows kept.
    third = curate(_config(max_hallucination=0.2), engine=fresh_engine)
    assert third["dataset_id"] != first["dataset_id"]


def test_gate_failure_is_recorded_not_raised(fresh_engine, data_dir):
    seed_batch(fresh_engine, 20)
    result = curate(_config(min_rows=50), engine=fresh_engine)

    assert result["gate_passed"] is False
    assert result["failed_expectations"] == ["min_dataset_size"]
    with session_scope(fresh_engine) as s:
        row = s.get(Dataset, result["dataset_id"])
        assert row.gate_passed is False
        assert row.gate_result["failed_expectations"] == ["min_dataset_size"]


def test_persona_names_and_contact_details_are_scrubbed(fresh_engine, data_dir):
    ids = seed_batch(fresh_engine, 20)
    with session_scope(fresh_engine) as s:
        conv = s.get(Conversation, ids[3])  # persona p-ravi "Ravi Menon"
        conv.messages = [
            {"role": "user", "content": "Hi, I'm Ravi. Mail me at ravi.menon@example.org or "
                                        "call +44 20 7946 0958 about my plan."},
            {"role": "assistant", "content": "Thanks Ravi, let's keep it here instead."},
        ]
    result = curate(_config(), engine=fresh_engine)

    assert result["gate_passed"], result["failed_expectations"]
    root = data_dir / "datasets" / result["dataset_id"]
    text = "".join(p.read_text() for p in root.rglob("*.jsonl"))
    assert "Ravi" not in text and "example.org" not in text and "7946" not in text
    assert "Hi, I'm <PERSON>. Mail me at <EMAIL> or call <PHONE>" in text
    assert not find_pii(text)
