"""Reaction-signal datasets: SFT rows and DPO pairs from real rows, refusal below the minimum,
the nightly skip decision, and no PII in any output file."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sqlalchemy import func, select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Dataset, DatasetItem, Interaction, Reaction
from tasks.core.ids import stable_id
from tasks.core.settings import get_settings
from tasks.datasets.deid import find_pii, hash_user_id, scan_files
from tasks.signals.stage import (
    InsufficientSignals,
    SignalConfig,
    build_reaction_dataset,
    build_reaction_dataset_or_skip,
    count_new_signals,
    nightly_decision,
    pair_signals,
)

FIRST = ["Zephyrine", "Quillon", "Marisol", "Thaddeus", "Oriane", "Bastiaan", "Ludovica",
         "Percival", "Ximena", "Evander"]
LAST = ["Okonkwo", "Vasquez-Lindgren", "Haverbrook", "Castellanos", "Nakashima"]
SMALL = SignalConfig(min_positive=100, min_negative=100, pair_by_embedding=False)


def planted_event(i: int) -> dict:
    first, last = FIRST[i % len(FIRST)], LAST[i % len(LAST)]
    email = f"{first.lower()}.{last.lower()}{i}@mail.example.com"
    phone = f"+1 415 555 {i:04d}"
    token_url = f"https://app.example.com/cb?token=tok{i:06d}secret"
    topic = i % 7
    return {
        "i": i, "first": first, "last": last, "email": email, "phone": phone, "url": token_url,
        "user": f"user-{i}",
        "context": {"user_name": f"{first} {last}", "user_id": f"user-{i}", "email": email,
                    "phone": phone, "note": f"callback {token_url}", "kind": "focus",
                    "topic": topic},
        "messages": [{"role": "system", "content": "You write one short, kind tip."},
                     {"role": "user", "content": f"I'm {first}. Reach me at {email} or "
                                                 f"{phone}. Topic {topic}: staying focused."}],
        "response": f"Hi {first}! Try a 10-minute walk, then one task. Stuck? Write {email}.",
    }


def reaction_for(i: int) -> tuple[str, int]:
    """500 positives (done in window), 400 negatives (quick dismiss), 100 outside windows."""
    k = i % 10
    if k < 5:
        return "done", 15000 + (i * 97) % 105001
    if k < 9:
        return "dismiss", (i * 13) % 5000
    return ("done", 3000) if i % 20 == 9 else ("dismiss", 9000)


def store(engine, events: list[dict], reactions: list[tuple[str, int]]) -> None:
    with session_scope(engine) as s:
        upsert(s, Interaction, [{
            "id": stable_id("ix", e["i"]), "user_hash": e["user"], "variant": "champion",
            "model_name": "tip-generator", "context": e["context"],
            "request_messages": e["messages"], "response": e["response"]} for e in events])
        upsert(s, Reaction, [{
            "id": stable_id("rx", e["i"]), "interaction_id": stable_id("ix", e["i"]),
            "reaction": r, "dwell_ms": d} for e, (r, d) in zip(events, reactions, strict=True)])


@pytest.fixture()
def thousand(fresh_engine):
    events = [planted_event(i) for i in range(1000)]
    store(fresh_engine, events, [reaction_for(i) for i in range(1000)])
    return events


@pytest.fixture(scope="module")
def built(make_engine, tmp_path_factory):
    """The 1000 planted events, built once for the tests that only read the result."""
    engine = make_engine()
    events = [planted_event(i) for i in range(1000)]
    store(engine, events, [reaction_for(i) for i in range(1000)])
    mp = pytest.MonkeyPatch()
    data = tmp_path_factory.mktemp("signals") / "data"
    mp.setenv("TUNELOOP_DATA_DIR", str(data))
    get_settings.cache_clear()
    try:
        yield engine, data, events, build_reaction_dataset(SMALL, engine=engine)
    finally:
        mp.undo()
        get_settings.cache_clear()


def test_1000_pii_planted_events_leave_no_pii_in_any_output(built):
    _, data_dir, thousand, result = built
    assert result["gate_passed"], result["failed_expectations"]
    assert json.loads(json.dumps(result)) == result  # XCom-safe
    root = data_dir / "datasets" / result["dataset_id"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {"openai", "sharegpt", "alpaca", "dpo", "stats", "gate"} <= {
        p.relative_to(root).parts[0] for p in files}
    names = set(FIRST) | set(LAST)
    raw = [e["email"] for e in thousand] + [e["phone"] for e in thousand] + [
        e["url"] for e in thousand] + [e["user"] + '"' for e in thousand]
    assert scan_files(files, names=names, extra_literals=raw) == []
    everything = "\n".join(p.read_text() for p in files if p.suffix in (".json", ".jsonl", ".html"))
    for needle in ("mail.example.com", "555 0", "token=tok", "Zephyrine", "Okonkwo", '"user-1"'):
        assert needle not in everything
    found = find_pii(everything)
    assert not found, [everything[max(0, m.start - 60):m.end + 60] for m in found]
    # De-identified, not destroyed: the text keeps its shape around placeholders.
    sft = [json.loads(x) for x in open(result["train_path"])]
    assert sft[0]["messages"][-1]["content"].startswith("Hi <PERSON>! Try a 10-minute walk")
    assert "Reach me at <EMAIL> or <PHONE>" in sft[0]["messages"][1]["content"]
    meta = json.loads(open(root / "openai" / "train.provenance.jsonl").readline())["metadata"]
    assert meta["user"] in {hash_user_id(f"user-{i}") for i in range(1000)}
    assert meta["context"]["user_id"] == meta["user"]
    assert meta["context"]["user_name"] == "<PERSON>"


def test_sft_rows_come_from_positives_and_pairs_from_same_context(built):
    engine, _, _, result = built
    counts = result["counts"]
    assert (counts["positive"], counts["negative"]) == (500, 400)
    assert counts["reactions_outside_windows"] == 100
    assert counts["sft_rows"] == 500 == counts["sft_train"] + counts["sft_validation"]
    assert 20 <= counts["sft_validation"] <= 80  # ~10%, seeded per interaction
    labels = {i: "positive" if i % 10 < 5 else "negative" for i in range(1000) if i % 10 < 9}
    per_topic = Counter((i % 7, label) for i, label in labels.items())
    expected_pairs = sum(min(per_topic[(t, "positive")], per_topic[(t, "negative")])
                         for t in range(7))
    assert counts["dpo_pairs"] == counts["dpo_pairs_same_context"] == expected_pairs
    pair = json.loads(open(result["dpo_path"]).readline())
    assert set(pair) == {"prompt", "chosen", "rejected"}
    assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
    with session_scope(engine) as s:
        items = s.scalar(select(func.count()).select_from(DatasetItem)
                         .where(DatasetItem.dataset_id == result["dataset_id"]))
        assert items == 500 + 2 * expected_pairs
        assert s.get(Dataset, result["dataset_id"]).kind == "reaction"


def test_below_the_minimum_the_build_refuses_with_the_counts(fresh_engine, data_dir, thousand):
    with pytest.raises(InsufficientSignals) as info:
        build_reaction_dataset(SignalConfig(), engine=fresh_engine)  # default 500 / 500
    assert (info.value.positive, info.value.negative) == (500, 400)
    assert "400 negative (need >= 500)" in str(info.value)
    assert "positive (need" not in str(info.value)  # 500 positives are enough
    skipped = build_reaction_dataset_or_skip(SignalConfig(), engine=fresh_engine)
    assert skipped["built"] is False and skipped["negative"] == 400
    with session_scope(fresh_engine) as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0


def test_nightly_decision_counts_only_signals_not_in_the_last_reaction_dataset(
        fresh_engine, data_dir, thousand):
    lonely = [planted_event(i) for i in range(2000, 2030)]
    for e in lonely:  # a context no positive shares: these negatives stay unpaired
        e["messages"][1]["content"] = "Something nobody liked."
    store(fresh_engine, lonely, [("dismiss", 500)] * len(lonely))
    before = nightly_decision(100, 100, engine=fresh_engine)
    assert before["retrain"] is True and before["since_dataset_id"] is None
    built = build_reaction_dataset_or_skip(SMALL, engine=fresh_engine)
    assert built["built"] is True
    assert built["counts"]["negatives_unpaired"] >= 30

    after = nightly_decision(100, 100, engine=fresh_engine)
    assert after["retrain"] is False and after["since_dataset_id"] == built["dataset_id"]
    assert (after["positive"], after["negative"]) == (0, 0)
    assert "skipping retrain" in after["reason"] and "0 positive < 100" in after["reason"]

    new = [planted_event(i) for i in range(1000, 1003)]
    store(fresh_engine, new, [("done", 20000), ("dismiss", 100), ("done", 999999)])
    fresh = count_new_signals(built["dataset_id"], SMALL, engine=fresh_engine)
    assert (fresh["positive"], fresh["negative"]) == (1, 1)


def test_rebuilding_the_same_signals_is_a_noop(built, monkeypatch):
    engine, data_dir, _, first = built
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    root = data_dir / "datasets" / first["dataset_id"]
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    second = build_reaction_dataset(SMALL, engine=engine)
    monkeypatch.undo()
    get_settings.cache_clear()
    assert first["created"] and not second["created"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes
    assert first["dataset_id"] == second["dataset_id"]


@pytest.mark.slow
def test_unpaired_signals_pair_by_embedding_near_identical_context(fresh_engine, data_dir):
    prompts = ["How do I stay focused at work this afternoon?",
               "How can I stay focused at work this afternoon?",
               "What should I cook for a quick dinner tonight?"]
    events = []
    for i, prompt in enumerate(prompts):
        e = planted_event(i)
        e["context"] = {"kind": "focus", "n": i}
        e["messages"] = [{"role": "user", "content": prompt}]
        events.append(e)
    store(fresh_engine, events, [("done", 30000), ("dismiss", 1000), ("dismiss", 1000)])
    from tasks.core.db.engine import session_scope as scope
    from tasks.signals.stage import label_interactions, load_signals

    cfg = SignalConfig(min_positive=1, min_negative=1, pair_similarity=0.9)
    with scope(fresh_engine) as s:
        signals = load_signals(s, label_interactions(s, cfg))
    pairs = pair_signals(signals, cfg)
    assert len(pairs) == 1
    assert pairs[0].how == "embedding" and pairs[0].similarity >= 0.9
    assert pairs[0].rejected.prompt[0]["content"] == prompts[1]


def test_pseudonymize_keeps_one_placeholder_per_person_within_an_interaction(fresh_engine):
    from tasks.core.db.engine import session_scope as scope
    from tasks.signals.stage import label_interactions, load_signals

    events = [planted_event(0)]
    store(fresh_engine, events, [("done", 30000)])
    cfg = SignalConfig(min_positive=1, min_negative=0, pseudonymize=True)
    with scope(fresh_engine) as s:
        [signal] = load_signals(s, label_interactions(s, cfg), pseudonymize=True)
    assert signal.prompt[-1]["content"] == (
        "I'm <PERSON_1>. Reach me at <EMAIL_1> or <PHONE_1>. Topic 0: staying focused.")
    assert signal.response.startswith("Hi <PERSON_1>! Try a 10-minute walk")
    assert signal.response.endswith("Write <EMAIL_1>.")
    assert signal.context["email"] == "<EMAIL_1>"
