"""Tagging against the fake OpenAI server and real Postgres: results, retries, replay, faults."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch, TagFailure, TagResult
from tasks.core.paths import PROMPTS_DIR
from tasks.tag import taggers as taggers_module
from tasks.tag.config import TaggingConfig
from tasks.tag.stage import latest_tags, plan_tagging, run_tagging, tag_shard
from tests.fakes.fake_openai import FakeOpenAIServer
from tests.fakes.tag_responders import FlakyResponder, garbage_responder, tagging_responder

ALL_LLM = {name: "llm" for name in ("emotion", "topic", "temporal", "belief", "hallucination")}


def seed(engine, n: int, *, batch: str | None = None, start: int = 0) -> tuple[str, list[str]]:
    """A batch of `n` distinct conversations (plus one failed row that must never be tagged)."""
    batch = batch or f"tagtest-{uuid.uuid4().hex[:10]}"
    ids = [f"{batch}-c{i:03d}" for i in range(start, start + n)]
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch, "seed": 0, "requested": n}], update=[])
        upsert(s, Conversation, [{
            "id": cid, "batch_id": batch, "item_index": start + i,
            "messages": [
                {"role": "user", "content": f"({cid}) I'm worried about my job interview "
                                            "tomorrow, I think I will fail."},
                {"role": "assistant", "content": "That sounds stressful. A study shows 73% of "
                                                 "people feel the same before interviews."},
            ]} for i, cid in enumerate(ids)])
        upsert(s, Conversation, [{"id": f"{batch}-failed", "batch_id": batch, "item_index": 999,
                                  "status": "failed", "messages": []}], update=[])
    return batch, ids


def config(server: FakeOpenAIServer, batch: str, **overrides) -> TaggingConfig:
    values = {"backends": ALL_LLM, "tagger_base_url": server.base_url,
              "tagger_model": "fake-model", "judges": [], "use_cache": False,
              "batch_ids": [batch], "retries": 3, "max_in_flight": 16}
    values.update(overrides)
    return TaggingConfig(**values)


def count(engine, model, **where) -> int:
    with session_scope(engine) as s:
        stmt = select(func.count()).select_from(model)
        for key, value in where.items():
            column = getattr(model, key)
            stmt = stmt.where(column.in_(value) if isinstance(value, list) else column == value)
        return int(s.scalar(stmt))


@pytest.fixture()
def server():
    with FakeOpenAIServer(responder=tagging_responder) as srv:
        yield srv


def test_all_five_taggers_store_one_result_each(engine, server, tmp_path):
    batch, ids = seed(engine, 3)
    progress: list[tuple[int, int]] = []
    report = run_tagging(config(server, batch), out_dir=tmp_path,
                         progress=lambda done, total: progress.append((done, total)))
    assert report["run"]["tagged"] == dict.fromkeys(ALL_LLM, 3)
    assert len(progress) == 15 and progress[-1] == (15, 15)
    assert server.stats()["total"] == 15  # the failed conversation was never sent
    assert count(engine, TagResult, conversation_id=ids) == 15
    assert count(engine, TagFailure, conversation_id=ids) == 0
    with session_scope(engine) as s:
        rows = {r.tagger: r for r in s.scalars(
            select(TagResult).where(TagResult.conversation_id == ids[0]))}
    assert rows["emotion"].output["tones"] == ["anxious", "supportive"]
    assert rows["emotion"].score == rows["emotion"].output["confidence"] == 0.9
    assert rows["hallucination"].score == rows["hallucination"].output["hallucination_score"]
    assert rows["hallucination"].output["claims"][0]["claim"].startswith("A study shows 73%")
    assert rows["belief"].output["beliefs"][0]["statement"].startswith("I think I will fail")
    assert rows["belief"].score == rows["belief"].output["confidence"] == 0.6
    assert all(r.output["method"] == "llm:fake-model" and r.attempts == 1 for r in rows.values())


def test_retries_stop_at_n_and_record_every_failed_attempt(engine):
    with FakeOpenAIServer(responder=garbage_responder) as srv:
        batch, ids = seed(engine, 2)
        counts = tag_shard({"ids": ids}, config(srv, batch, taggers=["emotion"], retries=4))
        assert srv.stats()["total"] == 8
        assert counts["failed"] == {"emotion": 2} and counts["tagged"] == {}
        assert counts["failed_attempts"] == {"emotion": 8}
        with session_scope(engine) as s:
            failures = s.scalars(select(TagFailure).where(TagFailure.conversation_id == ids[0])
                                 .order_by(TagFailure.attempt)).all()
        assert [f.attempt for f in failures] == [1, 2, 3, 4]
        assert all(f.raw_output == garbage_responder({}) for f in failures)
        assert all("no JSON" in f.error for f in failures)
        assert count(engine, TagResult, conversation_id=ids) == 0

        # A rerun tries again and continues the audit trail instead of overwriting it.
        tag_shard({"ids": ids}, config(srv, batch, taggers=["emotion"], retries=2))
        with session_scope(engine) as s:
            attempts = s.scalars(select(TagFailure.attempt).where(
                TagFailure.conversation_id == ids[0]).order_by(TagFailure.attempt)).all()
        assert attempts == [1, 2, 3, 4, 5, 6]


def test_flaky_model_succeeds_after_recorded_failures_with_corrective_retries(engine):
    flaky = FlakyResponder(failures=2)
    with FakeOpenAIServer(responder=flaky) as srv:
        batch, ids = seed(engine, 1)
        counts = tag_shard({"ids": ids}, config(srv, batch, taggers=["temporal"], retries=5))
        requests = srv.requests
    assert counts["tagged"] == {"temporal": 1} and counts["failed_attempts"] == {"temporal": 2}
    with session_scope(engine) as s:
        result = s.scalars(select(TagResult).where(TagResult.conversation_id == ids[0])).one()
        failures = s.scalars(select(TagFailure.attempt).where(
            TagFailure.conversation_id == ids[0]).order_by(TagFailure.attempt)).all()
    assert result.attempts == 3 and failures == [1, 2]
    assert len(requests) == 3
    assert requests[0]["temperature"] == 0.0 and len(requests[0]["messages"]) == 2
    # Later attempts quote the error back and sample, so they are not the same request again.
    assert requests[1]["messages"][-1]["content"].startswith("Your previous reply could not be")
    assert requests[1]["temperature"] == 0.7 and requests[1]["seed"] == 2


def test_rerun_tags_only_conversations_lacking_current_results(engine, server):
    batch, ids = seed(engine, 4)
    cfg = config(server, batch)
    run_tagging(cfg, out_dir=None)
    assert plan_tagging(cfg) == []
    server.reset()
    _, new_ids = seed(engine, 1, batch=batch, start=10)
    shards = plan_tagging(cfg)
    assert shards == [{"shard": 0, "first_id": new_ids[0], "last_id": new_ids[0], "count": 1}]
    report = run_tagging(cfg)
    assert report["run"]["tagged"] == dict.fromkeys(ALL_LLM, 1)
    assert server.stats()["total"] == 5
    assert count(engine, TagResult, conversation_id=ids + new_ids) == 25


def test_changed_template_retags_and_older_versions_stay_queryable(engine, server, tmp_path,
                                                                    monkeypatch):
    batch, ids = seed(engine, 3)
    cfg = config(server, batch, taggers=["emotion", "temporal"])
    old_version = cfg.build_taggers()[0].version
    run_tagging(cfg)
    server.reset()

    shutil.copytree(PROMPTS_DIR, tmp_path / "prompts")
    template = tmp_path / "prompts" / "taggers" / "emotion.jinja2"
    template.write_text(template.read_text().replace("on both sides", "on both sides of it"))
    monkeypatch.setattr(taggers_module, "PROMPTS_ROOT", tmp_path / "prompts")
    new_version = cfg.build_taggers()[0].version
    assert new_version != old_version
    assert len(plan_tagging(cfg)) == 1
    report = run_tagging(cfg)
    assert report["run"]["tagged"] == {"emotion": 3}  # temporal is unchanged: not re-run
    assert server.stats()["total"] == 3
    assert count(engine, TagResult, conversation_id=ids, tagger_version=old_version) == 3
    assert count(engine, TagResult, conversation_id=ids, tagger_version=new_version) == 3
    with session_scope(engine) as s:
        assert set(latest_tags(s, ids)[ids[0]]) == {"emotion", "temporal"}
        old = latest_tags(s, ids, versions={"emotion": old_version})
        assert set(old[ids[0]]) == {"emotion"}
        s.execute(TagResult.__table__.delete().where(TagResult.tagger_version == new_version,
                                                     TagResult.conversation_id.in_(ids)))
        # The old version is registered with an outdated template: not "current" any more.
        assert set(latest_tags(s, ids)[ids[0]]) == {"temporal"}


def test_latest_tags_uses_unregistered_versions_only_as_a_fallback(engine):
    batch, ids = seed(engine, 1)
    with session_scope(engine) as s:
        upsert(s, TagResult, [{
            "id": f"{batch}-x", "conversation_id": ids[0], "tagger": "emotion",
            "tagger_version": "written-elsewhere", "backend": "llm", "model": "m",
            "output": {"tones": ["sad"], "confidence": 0.4}, "score": 0.4, "attempts": 1}])
        assert latest_tags(s, ids) == {ids[0]: {"emotion": {"tones": ["sad"],
                                                             "confidence": 0.4}}}
        assert latest_tags(s, []) == {}


def test_plan_splits_work_into_small_id_range_shards(engine, server):
    batch, ids = seed(engine, 5)
    cfg = config(server, batch, shard_size=2, taggers=["temporal"])
    shards = plan_tagging(cfg)
    assert [s["count"] for s in shards] == [2, 2, 1]
    assert [(s["first_id"], s["last_id"]) for s in shards] == [
        (ids[0], ids[1]), (ids[2], ids[3]), (ids[4], ids[4])]
    counts = tag_shard(shards[1], cfg)
    assert counts["tagged"] == {"temporal": 2}
    tagged = {cid for cid, in _tagged(engine, ids)}
    assert tagged == {ids[2], ids[3]}
    assert [s["count"] for s in plan_tagging(cfg)] == [2, 1]


def _tagged(engine, ids):
    with session_scope(engine) as s:
        return s.execute(select(TagResult.conversation_id).where(
            TagResult.conversation_id.in_(ids))).all()


def test_twenty_percent_faults_leave_every_conversation_tagged_or_its_failure_recorded(engine):
    faults = ("429", "500", "malformed", "truncated")
    with FakeOpenAIServer(responder=tagging_responder, fault_rate=0.2, faults=faults,
                          seed=7) as srv:
        batch, ids = seed(engine, 12)
        report = run_tagging(config(srv, batch, retries=2))
        stats = srv.stats()
    assert sum(stats[f] for f in faults) > 0
    with session_scope(engine) as s:
        results = set(s.execute(select(TagResult.conversation_id, TagResult.tagger).where(
            TagResult.conversation_id.in_(ids))).tuples())
        failures = s.execute(select(TagFailure.conversation_id, TagFailure.tagger,
                                    TagFailure.error).where(
            TagFailure.conversation_id.in_(ids))).all()
    failed_pairs = {(cid, tagger) for cid, tagger, _ in failures}
    for cid in ids:
        for tagger in ALL_LLM:
            assert (cid, tagger) in results or (cid, tagger) in failed_pairs
    # Truncated replies are not retried inside the client; they surface as recorded attempts.
    assert stats["truncated"] == 0 or any("truncated" in e for _, _, e in failures)
    assert len(failures) == sum(report["run"]["failed_attempts"].values())
    assert sum(report["run"]["tagged"].values()) == len(results)


def test_stats_count_results_and_write_histograms(engine, server, tmp_path: Path):
    batch, ids = seed(engine, 4)
    report = run_tagging(config(server, batch), out_dir=tmp_path)
    stats = report["stats"]
    assert stats["conversations"] == 4
    assert stats["taggers"]["emotion"]["tagged"] == 4 and stats["taggers"]["emotion"]["failed"] == 0
    assert stats["taggers"]["hallucination"]["success_rate"] == 1.0
    assert stats["histograms"]["emotion_confidence"]["counts"][-1] == 4  # all at 0.9
    assert stats["histograms"]["hallucination_score"]["n"] == 4
    assert ["anxious", 4] in [list(x) for x in stats["frequencies"]["emotion.tones"]]
    assert [list(x) for x in stats["frequencies"]["temporal.focus"]] == [["future", 4]]
    for key in ("emotion_confidence_png", "hallucination_score_png"):
        assert Path(stats["files"][key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| anxious | 4 |" in Path(stats["files"]["frequencies"]).read_text()
