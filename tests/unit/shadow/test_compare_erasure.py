"""Mirror-mode judging never sends erased or purged text (issue #15): a (champion, mirror) pair
reaches the pairwise judge only when neither row is erased (`erased_at`, or sent by an erased
user before the erasure was requested) nor past retention (`text_purged_at`). The timestamps
decide: the excluded rows here still hold their text, so only the predicate keeps them out."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Interaction, UserErasure
from tasks.core.ids import stable_id
from tasks.core.llm import LLMClient
from tasks.core.settings import Endpoint
from tasks.shadow.compare import compare_variants
from tasks.shadow.stage import deploy_challenger
from tests.fakes.fake_openai import FakeOpenAIServer

T0 = datetime(2026, 5, 1, tzinfo=UTC)
ERASURE_REQUESTED = T0 + timedelta(days=1)
# pair name -> (marks on the champion row, marks on the mirror row, user); "late" rows belong to
# a user in `user_erasures` whose erasure was requested after they were sent, "after" to that user
# once the erasure was requested (a signal again).
PAIRS = {
    "kept": ({}, {}, "kept"),
    "after": ({"created_at": ERASURE_REQUESTED + timedelta(hours=1)},
              {"created_at": ERASURE_REQUESTED + timedelta(hours=1)}, "erased-late"),
    "champion-erased": ({"erased_at": T0}, {}, "erased-champion"),
    "mirror-erased": ({}, {"erased_at": T0}, "erased-mirror"),
    "champion-purged": ({"text_purged_at": T0}, {}, "purged-champion"),
    "mirror-purged": ({}, {"text_purged_at": T0}, "purged-mirror"),
    "late": ({}, {}, "erased-late"),
}
JUDGED = {"kept", "after"}


def marker(pair: str, row: str) -> str:
    """A word in the pair's text that no other pair holds."""
    return f"zq{pair.replace('-', '')}{row}zq"


def seed_pairs(engine, deployment_id: str) -> dict[str, str]:
    """One mirrored pair per entry of PAIRS; returns the champion id by pair name."""
    rows, champions = [], {}
    for pair, (champion_marks, mirror_marks, user) in PAIRS.items():
        champion_id = stable_id("erasure-champion", deployment_id, pair)
        champions[pair] = champion_id
        user_hash = stable_id("user", user)
        request = [{"role": "user", "content": f"question {marker(pair, 'request')}"}]
        for variant, row_id, marks, mirror_of in (
                ("champion", champion_id, champion_marks, None),
                ("mirror", stable_id("erasure-mirror", champion_id), mirror_marks, champion_id)):
            rows.append({
                "id": row_id, "user_hash": user_hash, "deployment_id": deployment_id,
                "variant": variant, "model_name": "m",
                "model_version": "1" if variant == "champion" else "2", "context": {},
                "request_messages": request, "response": f"answer {marker(pair, variant)}",
                "latency_ms": 1.0, "mirror_of": mirror_of, "status": "ok",
                "created_at": T0, "erased_at": None, "text_purged_at": None, **marks})
    with session_scope(engine) as session:
        upsert(session, Interaction, rows)
        upsert(session, UserErasure, [{"user_hash": stable_id("user", "erased-late"),
                                       "requested_at": ERASURE_REQUESTED, "counts": {},
                                       "snapshots": []}])
    return champions


def prefers_first(request: dict) -> str:
    return json.dumps({"winner": "A", "reason": "first is best"})


@pytest.fixture(scope="module")
def judged(make_engine) -> tuple[dict, dict[str, str], str]:
    """(the comparison report, the champion id by pair name, every judge request as JSON)."""
    engine = make_engine("tuneloop_shadow_erasure")
    deployment_id = deploy_challenger(
        "2", champion_version="1", mode="mirror", share=1.0,
        model_name=f"shadow-erasure-{uuid.uuid4().hex[:8]}", engine=engine)["deployment_id"]
    champions = seed_pairs(engine, deployment_id)
    with FakeOpenAIServer(responder=prefers_first) as judge_server:
        client = LLMClient([Endpoint(base_url=judge_server.base_url, model="fake-model")],
                           max_retries=0)
        report = compare_variants(deployment_id, min_samples=1, judge_client=client,
                                  engine=engine)
        body = json.dumps(judge_server.requests, ensure_ascii=False)
    return report, champions, body


def test_only_pairs_without_erased_or_purged_rows_are_judged(judged):
    report, champions, _ = judged
    assert {p["champion_id"] for p in report["pairwise"]["details"]} == {
        champions[pair] for pair in JUDGED}
    assert report["pairwise"]["pairs"] == len(JUDGED)


@pytest.mark.parametrize("pair", sorted(set(PAIRS) - JUDGED))
def test_no_text_of_an_erased_or_purged_pair_reaches_the_judge(judged, pair):
    _, _, body = judged
    assert "## Reply A" in body  # the judge was asked about the other pairs
    leaked = [row for row in ("request", "champion", "mirror") if marker(pair, row) in body]
    assert leaked == [], f"{pair}: the judge was sent its {leaked} text"


@pytest.mark.parametrize("pair", sorted(JUDGED))
def test_a_pair_with_neither_row_erased_nor_purged_is_sent_whole(judged, pair):
    _, _, body = judged
    assert all(marker(pair, row) in body for row in ("request", "champion", "mirror"))
