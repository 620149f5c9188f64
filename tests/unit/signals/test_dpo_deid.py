"""DPO pairs leave de-identified: an interaction pair whose request, responses and context carry an
email, a phone, a card number and a known name yields DPO records (training and provenance files)
in which `find_pii` finds nothing and none of the raw values occurs."""

from __future__ import annotations

import json
import re

import pytest

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Interaction, Reaction
from tasks.core.ids import stable_id
from tasks.core.settings import get_settings
from tasks.datasets.deid import find_pii, names_in
from tasks.signals.stage import SignalConfig, build_reaction_dataset

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
CONTEXT = {"user_name": "Jane Doe", "user_id": "user-jane-7", "email": EMAIL,
           "note": f"card on file {CARD}"}
NAMES = names_in(CONTEXT)  # "Jane Doe", "Jane", "Doe"
RAW = (EMAIL, PHONE, "Jane", "Doe", "user-jane-7")
REQUEST = [
    {"role": "system", "content": "You help Jane Doe plan her week."},
    {"role": "user", "content": f"I'm Jane. Email me at {EMAIL} or call {PHONE}; "
                                f"my card is {CARD}."},
]
REPLIES = {
    "chosen": f"Sure Jane: the plan goes to {EMAIL}, and never share {CARD} in chat.",
    "rejected": f"Call {PHONE}, Doe.",
}

def occurs(raw: str, text: str) -> bool:
    """`raw` in `text` as a whole word ("Doe" is not in the rubric's "Does")."""
    return re.search(rf"(?<!\w){re.escape(raw)}(?!\w)", text) is not None


@pytest.fixture(scope="module")
def dpo_text(make_engine, tmp_path_factory) -> str:
    """Everything under the snapshot's dpo/ folder, built from one same-context pair."""
    engine = make_engine()
    with session_scope(engine) as session:
        upsert(session, Interaction, [{
            "id": stable_id("dpo-deid", which), "user_hash": "user-jane-7", "variant": "champion",
            "model_name": "tip-generator", "context": CONTEXT, "request_messages": REQUEST,
            "response": reply} for which, reply in REPLIES.items()])
        upsert(session, Reaction, [
            {"id": stable_id("dpo-deid-r", "chosen"), "reaction": "done", "dwell_ms": 30_000,
             "interaction_id": stable_id("dpo-deid", "chosen")},
            {"id": stable_id("dpo-deid-r", "rejected"), "reaction": "dismiss", "dwell_ms": 900,
             "interaction_id": stable_id("dpo-deid", "rejected")}])
    with pytest.MonkeyPatch.context() as mp:
        data = tmp_path_factory.mktemp("dpo-deid") / "data"
        mp.setenv("TUNELOOP_DATA_DIR", str(data))
        get_settings.cache_clear()
        try:
            result = build_reaction_dataset(
                SignalConfig(min_positive=1, min_negative=1, pair_by_embedding=False),
                engine=engine)
        finally:
            get_settings.cache_clear()
    assert result["counts"]["dpo_pairs"] == 1
    files = sorted((data / "datasets" / result["dataset_id"] / "dpo").glob("*.jsonl"))
    text = "".join(path.read_text(encoding="utf-8") for path in files)
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 2  # the pair's training line and its provenance twin
    assert all(r["prompt"] and r["chosen"][0]["content"] and r["rejected"][0]["content"]
               for r in records)
    return text


def test_dpo_records_hold_no_pii_and_no_raw_value(dpo_text):
    assert find_pii(dpo_text, NAMES) == []
    assert not [raw for raw in RAW if occurs(raw, dpo_text)]


def test_dpo_records_keep_the_text_around_the_placeholders(dpo_text):
    record = json.loads(dpo_text.splitlines()[0])
    assert [m["role"] for m in record["prompt"]] == ["system", "user"]
    assert record["prompt"][1]["content"].startswith("I'm ")
    assert "plan goes to" in record["chosen"][0]["content"]


def test_dpo_records_hold_no_card_number(dpo_text):
    assert CARD not in dpo_text
