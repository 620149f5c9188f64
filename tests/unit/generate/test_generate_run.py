"""Generation end to end against the fake OpenAI server and a fresh Postgres database.

Covers the stage contract the DAG relies on (plan → shards → finalize), faults, dedup against the
batch and the stored set, failure recording, role-leak cleanup, split endpoints, preview without
writes, document scenarios and provenance.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tasks.core.db.engine import session_scope
from tasks.core.db.models import Conversation, GenerationBatch, LlmCacheEntry, Persona
from tasks.core.settings import get_settings
from tasks.generate import (
    GenerationConfig,
    GenerationError,
    finalize_batch,
    format_preview,
    generate_shard,
    plan_batch,
    preview,
    run_generation,
)
from tests.fakes.fake_openai import FakeOpenAIServer
from tests.fakes.generation_replies import classify

REPLY = "tests.fakes.generation_replies:reply"


def _point_settings_at(engine, patch: pytest.MonkeyPatch) -> None:
    patch.setenv("DATABASE_URL", engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def db(make_engine):
    """One migrated database for the module (tests filter by batch id); settings point at it."""
    engine = make_engine("tuneloop_gen")
    with pytest.MonkeyPatch.context() as patch:
        _point_settings_at(engine, patch)
        yield engine
    get_settings.cache_clear()


@pytest.fixture()
def isolated_db(fresh_engine, monkeypatch):
    """A database of its own, for tests about what else is stored."""
    _point_settings_at(fresh_engine, monkeypatch)
    yield fresh_engine
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(responder=REPLY) as fake:
        yield fake


def _cfg(base_url: str, **overrides) -> GenerationConfig:
    values = {"count": 8, "turns": 2, "seed": 3, "concurrency": 8, "dedup": False,
              "generator_base_url": base_url, "user_sim_base_url": base_url,
              "generator_model": "fake-model", "user_sim_model": "fake-model"}
    values.update(overrides)
    return GenerationConfig(**values)


def _rows(engine, batch_id: str | None = None) -> list[Conversation]:
    with session_scope(engine) as session:
        query = select(Conversation).order_by(Conversation.item_index)
        if batch_id:
            query = query.where(Conversation.batch_id == batch_id)
        return list(session.scalars(query))


def _count(engine, model) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_twenty_percent_faults_every_item_generated_or_recorded_failed(db):
    with FakeOpenAIServer(responder=REPLY, fault_rate=0.2, hang_s=1.0, retry_after_s=0.01,
                          seed=11) as faulty:
        cfg = _cfg(faulty.base_url, count=30, timeout_s=0.5, max_retries=1, use_cache=False)
        summary = run_generation(cfg)
        stats = faulty.stats()
    rows = _rows(db, summary["batch_id"])
    assert sorted(r.item_index for r in rows) == list(range(30))  # none lost, none twice
    assert {r.status for r in rows} <= {"ok", "failed"}
    failed = [r for r in rows if r.status == "failed"]
    ok = [r for r in rows if r.status == "ok"]
    assert failed and ok, stats  # faults happened and most items still made it
    for row in failed:
        assert "llm call failed" in row.failure_reason or "truncated" in row.failure_reason
    for row in ok:
        assert [m["role"] for m in row.messages] == ["user", "assistant"] * 2
        assert all(m["content"].strip() for m in row.messages)
    assert (summary["ok"], summary["failed"], summary["missing"]) == (len(ok), len(failed), 0)
    assert sum(stats[k] for k in ("429", "500", "hang", "malformed", "truncated")) > 0


@pytest.mark.slow
def test_plan_shards_finalize_like_the_dag_with_dedup_and_coverage(db, server):
    cfg = _cfg(server.base_url, count=12, shard_size=5, dedup=True)
    plan = plan_batch(cfg)
    assert [(s["start"], s["stop"]) for s in plan["shards"]] == [(0, 5), (5, 10), (10, 12)]
    as_xcom = cfg.model_dump(mode="json")
    results = [generate_shard(shard, as_xcom) for shard in plan["shards"]]
    assert [r["generated"] for r in results] == [5, 5, 2]
    summary = finalize_batch(plan["batch_id"])  # the config comes from the batch row
    assert summary["status"] == "done" and summary["missing"] == 0
    assert summary["ok"] + summary["failed"] + summary["duplicate"] == 12

    rerun = generate_shard(plan["shards"][0])
    assert (rerun["generated"], rerun["skipped"]) == (0, 5)

    with session_scope(db) as session:
        batch = session.get(GenerationBatch, plan["batch_id"])
        coverage, status = batch.coverage, batch.status
    assert status == "done"
    dimensions = coverage["dimensions"]
    assert {"topic", "subtopic", "tone", "difficulty", "edge_case", "mode", "scenario",
            "communication_style", "author_profile"} <= set(dimensions)
    assert all({"target", "achieved", "count"} == set(v) for v in dimensions["topic"].values())
    rows = _rows(db, plan["batch_id"])
    ok_rows = [r for r in rows if r.status == "ok"]
    assert all(r.embedding is not None and len(r.embedding) == 384 for r in ok_rows)
    assert all(r.opening_embedding is not None for r in ok_rows)


def test_every_conversation_carries_its_provenance(db, server):
    cfg = _cfg(server.base_url, count=3, seed=26)
    summary = run_generation(cfg)
    row = _rows(db, summary["batch_id"])[0]
    assert row.batch_id == summary["batch_id"]
    assert set(row.taxonomy_cell) >= {"topic", "subtopic", "tone", "edge_case", "mode", "scenario"}
    assert set(row.template_hashes) == {
        "generation/system_prompt.jinja2", "generation/assistant.jinja2",
        "generation/persona_question.jinja2", "generation/user_simulator.jinja2"}
    assert row.params["generator"]["model"] == "fake-model"
    assert row.params["user_sim"]["endpoint"] == f"{server.base_url}#fake-model"
    assert row.params["generator"]["temperature"] == cfg.temperature
    assert len(row.params["flaws_by_turn"]) == 2 and row.params["persona"]["name"]
    assert row.token_usage["calls"] == 4 and row.token_usage["completion_tokens"] > 0
    assert set(row.token_usage["by_role"]) == {"user_sim", "generator"}
    assert len(row.timings["calls"]) == 4 and row.timings["total_s"] > 0
    assert row.seed > 0 and row.system_prompt.startswith("You are Tune")
    with session_scope(db) as session:
        assert session.get(Persona, row.persona_id) is not None


@pytest.mark.slow
def test_repeated_openings_are_duplicates_within_a_batch_and_against_stored(isolated_db):
    with FakeOpenAIServer(responder="tests.fakes.generation_replies:duplicate_openings_reply") as s:
        first = run_generation(_cfg(s.base_url, count=15, turns=1, dedup=True))
        second = run_generation(_cfg(s.base_url, count=6, turns=1, seed=99, dedup=True))
    rows = _rows(isolated_db, first["batch_id"])
    ok_by_opening = {}
    for row in rows:
        if row.status == "ok":
            assert row.messages[0]["content"] not in ok_by_opening  # one survivor per question
            ok_by_opening[row.messages[0]["content"]] = row.id
    assert len(ok_by_opening) == 3 and first["duplicate"] == 15 - 3
    for row in rows:
        if row.status == "duplicate":
            assert row.duplicate_of == ok_by_opening[row.messages[0]["content"]]
            assert "opening cosine" in row.failure_reason
    # every opening of the second batch was already stored by the first
    assert second["duplicate"] == 6 and second["ok"] == 0
    for row in _rows(isolated_db, second["batch_id"]):
        assert row.duplicate_of in ok_by_opening.values() and "stored" in row.failure_reason


def test_looping_assistant_turns_are_recorded_failures_with_the_text(db):
    with FakeOpenAIServer(responder="tests.fakes.generation_replies:looping_reply") as looping:
        summary = run_generation(_cfg(looping.base_url, count=4, seed=21))
    assert (summary["failed"], summary["ok"]) == (4, 0)
    for row in _rows(db, summary["batch_id"]):
        assert row.failure_reason.startswith("turn 1 assistant: looping")
        assert [m["role"] for m in row.messages] == ["user", "assistant"]


def test_failed_items_are_kept_on_rerun_unless_retry_failed(db, server):
    with FakeOpenAIServer(responder="tests.fakes.generation_replies:looping_reply") as looping:
        first = run_generation(_cfg(looping.base_url, count=4, seed=22))
        assert first["failed"] == 4
        served = looping.stats()["total"]
        again = run_generation(_cfg(looping.base_url, count=4, seed=22))
        assert (again["generated"], again["failed"]) == (0, 4)
        assert looping.stats()["total"] == served  # nothing re-requested
        # a retry must not replay the failed replies from the response cache: new seeds
        retried_same = run_generation(_cfg(looping.base_url, count=4, seed=22, retry_failed=True))
        assert (retried_same["generated"], retried_same["failed"]) == (4, 4)
        assert looping.stats()["total"] == served + 8  # user + assistant call per item, uncached
    assert {r.params["attempt"] for r in _rows(db, first["batch_id"])} == {1}
    retried = run_generation(_cfg(server.base_url, count=4, seed=22, retry_failed=True))
    assert (retried["generated"], retried["ok"], retried["failed"]) == (4, 4, 0)
    assert retried["batch_id"] == first["batch_id"]
    assert {r.params["attempt"] for r in _rows(db, first["batch_id"])} == {2}


def test_role_leaks_and_template_tokens_never_reach_storage(db):
    with FakeOpenAIServer(responder="tests.fakes.generation_replies:leaky_reply") as leaky:
        summary = run_generation(_cfg(leaky.base_url, count=4, seed=23))
    assert summary["ok"] == 4
    for row in _rows(db, summary["batch_id"]):
        for message in row.messages:
            content = message["content"]
            assert "<|im_" not in content and not content.startswith(("User:", "Assistant:"))
            assert "thanks, bye" not in content and not content.startswith('"')


def test_user_simulator_and_assistant_use_their_own_endpoints(db):
    with FakeOpenAIServer(responder=REPLY, model_ids=("sim-model",)) as sim, \
            FakeOpenAIServer(responder=REPLY, model_ids=("gen-model",)) as gen:
        cfg = _cfg(gen.base_url, count=3, user_sim_base_url=sim.base_url,
                   user_sim_model="sim-model", generator_model="gen-model")
        summary = run_generation(cfg)
        sim_kinds = {classify(r) for r in sim.requests}
        gen_kinds = {classify(r) for r in gen.requests}
    assert sim_kinds == {"question", "user_sim"} and gen_kinds == {"assistant"}
    row = _rows(db, summary["batch_id"])[0]
    assert row.model == "gen-model" and row.params["user_sim"]["model"] == "sim-model"


def test_preview_renders_conversations_without_writing_anything(db, server):
    before = [_count(db, m) for m in (Conversation, GenerationBatch, LlmCacheEntry, Persona)]
    items = preview(_cfg(server.base_url, count=10, seed=24), 3)
    assert [i["index"] for i in items] == [0, 1, 2]
    assert all(len(i["messages"]) == 4 for i in items if i["status"] == "ok")
    text = format_preview(items)
    assert "preview 1/3" in text and items[0]["messages"][0]["content"][:30] in text
    after = [_count(db, m) for m in (Conversation, GenerationBatch, LlmCacheEntry, Persona)]
    assert after == before


def test_preview_ids_match_the_full_run(db, server):
    cfg = _cfg(server.base_url, count=4, seed=25)
    previewed = [i["id"] for i in preview(cfg, 2)]
    summary = run_generation(cfg)
    assert [r.id for r in _rows(db, summary["batch_id"])][:2] == previewed


def test_document_scenarios_open_with_a_long_document(db, server):
    summary = run_generation(_cfg(server.base_url, count=2, turns=1, document_share=1.0))
    assert summary["ok"] == 2
    for row in _rows(db, summary["batch_id"]):
        assert row.taxonomy_cell["scenario"] == "document" and row.taxonomy_cell["doc_type"]
        assert len(row.messages[0]["content"].split()) >= 500
        assert "generation/document_scenario.jinja2" in row.template_hashes


def test_a_shard_of_another_config_is_refused(db, server):
    plan = plan_batch(_cfg(server.base_url, count=4, seed=27))
    with pytest.raises(GenerationError, match="pass the same config"):
        generate_shard(plan["shards"][0], _cfg(server.base_url, count=4, seed=28))


def test_a_shard_of_an_unplanned_batch_says_to_plan_first(db):
    with pytest.raises(GenerationError, match="run plan_batch"):
        generate_shard({"batch_id": "nope", "start": 0, "stop": 1})


def test_user_stop_sequences_reach_user_turns_only_and_are_recorded(db):
    with FakeOpenAIServer(responder=REPLY, model_ids=("sim-model",)) as sim, \
            FakeOpenAIServer(responder=REPLY, model_ids=("gen-model",)) as gen:
        cfg = _cfg(gen.base_url, count=2, user_sim_base_url=sim.base_url,
                   user_sim_model="sim-model", generator_model="gen-model",
                   user_stop=["\n\n"])
        summary = run_generation(cfg)
        sim_stops = [r.get("stop") for r in sim.requests]
        gen_stops = [r.get("stop") for r in gen.requests]
    assert sim_stops and all(s == ["\n\n"] for s in sim_stops)
    assert gen_stops and all(s is None for s in gen_stops)
    row = _rows(db, summary["batch_id"])[0]
    assert row.params["user_sim"]["stop"] == ["\n\n"]


def test_assistant_stop_and_token_budget_reach_assistant_turns_only(db):
    with FakeOpenAIServer(responder=REPLY, model_ids=("sim-model",)) as sim, \
            FakeOpenAIServer(responder=REPLY, model_ids=("gen-model",)) as gen:
        cfg = _cfg(gen.base_url, count=2, user_sim_base_url=sim.base_url,
                   user_sim_model="sim-model", generator_model="gen-model",
                   max_tokens=300, assistant_stop=["\n\n"], assistant_max_tokens=120)
        summary = run_generation(cfg)
        sim_requests, gen_requests = list(sim.requests), list(gen.requests)
    assert sim_requests and all(r.get("stop") is None and r["max_tokens"] == 300
                                for r in sim_requests)
    assert gen_requests and all(r.get("stop") == ["\n\n"] and r["max_tokens"] == 120
                                for r in gen_requests)
    row = _rows(db, summary["batch_id"])[0]
    assert row.params["generator"]["stop"] == ["\n\n"]
    assert row.params["generator"]["max_tokens"] == 120
    assert "stop" not in row.params["user_sim"]
