"""Schema: migrations upgrade/downgrade cleanly; deterministic ids make writes upserts."""

from __future__ import annotations

from sqlalchemy import func, inspect, select

from tasks.core.db.engine import downgrade, migrate, session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch
from tasks.core.ids import stable_id

EXPECTED_TABLES = {
    "generation_batches", "personas", "conversations", "tag_results", "tag_failures",
    "judgments", "datasets", "dataset_items", "dataset_exclusions", "interactions", "reactions",
    "deployments", "comparison_reports", "llm_cache",
}


def test_migrations_upgrade_downgrade_upgrade(fresh_engine):
    assert EXPECTED_TABLES <= set(inspect(fresh_engine).get_table_names())
    downgrade(fresh_engine, "base")
    assert not (EXPECTED_TABLES & set(inspect(fresh_engine).get_table_names()))
    migrate(fresh_engine)
    migrate(fresh_engine)  # idempotent
    assert EXPECTED_TABLES <= set(inspect(fresh_engine).get_table_names())


def test_upsert_twice_keeps_one_row_with_latest_values(fresh_engine):
    batch_id = stable_id("batch", 7)
    conv_id = stable_id(batch_id, "cell", 0)
    with session_scope(fresh_engine) as s:
        upsert(s, GenerationBatch, [{"id": batch_id, "seed": 7, "params": {}, "requested": 1}])
    for text in ("first", "second"):
        with session_scope(fresh_engine) as s:
            upsert(s, Conversation, [{
                "id": conv_id, "batch_id": batch_id, "item_index": 0,
                "messages": [{"role": "user", "content": text}],
            }])
    with session_scope(fresh_engine) as s:
        assert s.scalar(select(func.count()).select_from(Conversation)) == 1
        assert s.get(Conversation, conv_id).messages[0]["content"] == "second"


def test_stable_id_is_deterministic_and_input_sensitive():
    assert stable_id("a", 1) == stable_id("a", 1)
    assert stable_id("a", 1) != stable_id("a", 2)
    assert stable_id("a", "1b") != stable_id("a1", "b")
