"""The offline default with a real 135M model: bad structured output becomes recorded failures.

SmolLM2-135M (the bundled model behind the local model server) rarely writes the JSON a tagger
asks for. Whatever it writes, every (conversation, tagger) must end with a stored result or with
one `tag_failures` row per attempt holding the raw reply and the reason; never a crash.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch, TagFailure, TagResult
from tasks.core.weights import SMOLLM2_NAME
from tasks.tag.config import TaggingConfig
from tasks.tag.stage import tag_shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_server():
    from serving.model_server import running_model_server

    with running_model_server(0, num_threads=1) as base_url:
        yield base_url


def test_small_model_output_is_stored_or_recorded_as_failures_never_a_crash(engine,
                                                                            smollm2_server):
    batch = f"smoltest-{uuid.uuid4().hex[:10]}"
    cid = f"{batch}-c0"
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch, "seed": 0, "requested": 1}])
        upsert(s, Conversation, [{"id": cid, "batch_id": batch, "item_index": 0, "messages": [
            {"role": "user", "content": "I'm nervous about my exam tomorrow."},
            {"role": "assistant", "content": "A study shows 90% of students feel that way."}]}])
    cfg = TaggingConfig(taggers=["temporal", "hallucination"], backends={"temporal": "llm"},
                        tagger_base_url=smollm2_server, tagger_model=SMOLLM2_NAME, judges=[],
                        retries=2, max_tokens=40, use_cache=False, batch_ids=[batch])
    counts = tag_shard({"ids": [cid]}, cfg)
    with session_scope(engine) as s:
        results = {r.tagger: r for r in s.scalars(
            select(TagResult).where(TagResult.conversation_id == cid))}
        failures = s.scalars(select(TagFailure).where(TagFailure.conversation_id == cid)).all()
    for tagger in ("temporal", "hallucination"):
        mine = sorted(f.attempt for f in failures if f.tagger == tagger)
        if tagger in results:
            assert mine == list(range(1, results[tagger].attempts))
            assert results[tagger].output["method"] == f"llm:{SMOLLM2_NAME}"
        else:
            assert mine == [1, 2]  # both attempts recorded
    for failure in failures:
        assert failure.error  # a reason for every failed attempt...
        assert failure.raw_output is not None  # ...and what the model actually said
    assert sum(counts["tagged"].values()) + sum(counts["failed"].values()) == 2
    assert sum(counts["failed_attempts"].values()) == len(failures)
