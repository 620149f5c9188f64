"""Mirror-mode judge requests are de-identified: the pairwise judge (possibly a hosted LLM) is
sent a production user's request and both answers with their PII scrubbed, and never a raw
email, phone, card number or a name known from the interaction's context."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Interaction
from tasks.core.ids import stable_id
from tasks.core.llm import LLMClient
from tasks.core.settings import Endpoint
from tasks.datasets.deid import find_pii, has_pii, names_in
from tasks.shadow.compare import compare_variants
from tasks.shadow.pairwise import deid_pair
from tasks.shadow.stage import deploy_challenger

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
CONTEXT = {"user_name": "Jane Doe", "plan": "pro"}
NAMES = names_in(CONTEXT)  # "Jane Doe", "Jane", "Doe"
RAW = (EMAIL, PHONE, "Jane", "Doe")

def occurs(raw: str, text: str) -> bool:
    """`raw` in `text` as a whole word ("Doe" is not in the rubric's "Does")."""
    return re.search(rf"(?<!\w){re.escape(raw)}(?!\w)", text) is not None


def mirrored_pair(engine, model_name: str) -> str:
    """A mirror deployment with one (champion, challenger) pair full of PII; its id."""
    deployment_id = deploy_challenger("2", champion_version="1", mode="mirror", share=1.0,
                                      model_name=model_name, engine=engine)["deployment_id"]
    champion_id = stable_id("deid-champion", deployment_id)
    request = [
        {"role": "system", "content": "You are helping Jane Doe with her account."},
        {"role": "user", "content": f"Hi, I'm Jane. Reach me at {EMAIL} or {PHONE}. "
                                    f"Why was my card {CARD} charged twice?"},
    ]
    rows = [
        {"id": champion_id, "variant": "champion", "model_version": "1", "mirror_of": None,
         "response": f"Sorry Jane, I've emailed {EMAIL} about card {CARD}."},
        {"id": stable_id("deid-mirror", deployment_id), "variant": "mirror",
         "model_version": "2", "mirror_of": champion_id,
         "response": f"Doe, we will call {PHONE} today."},
    ]
    with session_scope(engine) as session:
        upsert(session, Interaction, [{
            **row, "user_hash": "u" * 64, "deployment_id": deployment_id, "model_name": "m",
            "context": CONTEXT, "request_messages": request, "latency_ms": 1.0, "status": "ok",
        } for row in rows])
    return deployment_id


@pytest.fixture(scope="module")
def judge_body(make_engine, fake_llm_module) -> str:
    """Every request body the judge received for the pair, as one JSON text."""
    engine = make_engine("tuneloop_shadow_deid")
    deployment_id = mirrored_pair(engine, f"shadow-deid-{uuid.uuid4().hex[:8]}")
    client = LLMClient([Endpoint(base_url=fake_llm_module.base_url, model="fake-model")],
                       max_retries=0)
    report = compare_variants(deployment_id, min_samples=1, judge_client=client, engine=engine)
    assert report["pairwise"]["pairs"] == 1
    requests = fake_llm_module.requests
    assert len(requests) >= 2  # both orders (plus corrective follow-ups: the fake echoes)
    return json.dumps(requests, ensure_ascii=False)


@pytest.fixture(scope="module")
def fake_llm_module():
    """tests/conftest.py's `fake_llm`, once for the module."""
    from tests.fakes.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        yield server


def test_the_judge_request_holds_no_pii_and_no_raw_value(judge_body):
    assert "## Reply A" in judge_body  # it is the pairwise prompt
    assert find_pii(judge_body, NAMES) == []
    assert not [raw for raw in RAW if occurs(raw, judge_body)]


def test_the_judge_still_sees_the_conversation_around_the_placeholders(judge_body):
    assert "charged twice" in judge_body and "we will call" in judge_body


def test_the_judge_request_holds_no_card_number(judge_body):
    assert CARD not in judge_body


def test_deid_pair_scrubs_names_from_the_context_and_keeps_roles():
    pair = {"messages": [{"role": "user", "content": "I'm Jane, jane.doe@example.com"}],
            "context": CONTEXT, "champion_response": "Hello Jane Doe",
            "challenger_response": f"Call {PHONE}"}
    messages, champion, challenger = deid_pair(pair)
    assert [m["role"] for m in messages] == ["user"]
    assert not any(has_pii(text, NAMES) for text in (messages[0]["content"], champion,
                                                     challenger))
    assert pair["champion_response"] == "Hello Jane Doe"  # the input is left untouched
