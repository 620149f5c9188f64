"""Reaction windows (seed 004): done 15 s–2 min inclusive is positive, dismiss under 5 s is
negative — checked at the edges, in the pure rule and through Postgres."""

from __future__ import annotations

import pytest

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Interaction, Reaction
from tasks.core.ids import stable_id
from tasks.signals.stage import SignalConfig, classify_reaction, count_new_signals

CFG = SignalConfig()
EDGES = [
    ("dismiss", 4999, "negative"),   # 4.999 s
    ("dismiss", 5000, None),         # 5 s: not "under 5 s"
    ("done", 14999, None),
    ("done", 15000, "positive"),     # 15 s
    ("done", 120000, "positive"),    # 120 s
    ("done", 120001, None),          # 120.001 s
    ("dismiss", 0, "negative"),
    ("done", 4000, None),            # a quick done is not a signal
    ("dismiss", 60000, None),        # a slow dismiss is not a signal
    ("like", 30000, None),           # other reactions are not signals
]


@pytest.mark.parametrize(("reaction", "dwell_ms", "label"), EDGES)
def test_reaction_window_edges(reaction, dwell_ms, label):
    assert classify_reaction(reaction, dwell_ms, CFG) == label


def test_windows_are_configurable():
    cfg = SignalConfig(done_min_ms=10000, done_max_ms=60000, dismiss_max_ms=3000)
    assert classify_reaction("done", 10000, cfg) == "positive"
    assert classify_reaction("done", 60001, cfg) is None
    assert classify_reaction("dismiss", 2999, cfg) == "negative"
    assert classify_reaction("dismiss", 3000, cfg) is None


def _store(engine, events: list[tuple[str, int]], prefix: str = "w") -> list[str]:
    ids = [stable_id(prefix, i) for i in range(len(events))]
    with session_scope(engine) as s:
        upsert(s, Interaction, [{"id": iid, "user_hash": f"u{i}", "variant": "champion",
                                 "model_name": "m", "response": "tip"}
                                for i, iid in enumerate(ids)])
        upsert(s, Reaction, [{"id": stable_id(iid, "r"), "interaction_id": iid,
                              "reaction": reaction, "dwell_ms": dwell}
                             for iid, (reaction, dwell) in zip(ids, events, strict=True)])
    return ids


def test_window_edges_through_the_database(fresh_engine):
    _store(fresh_engine, [(r, d) for r, d, _ in EDGES])
    counts = count_new_signals(engine=fresh_engine)
    assert (counts["positive"], counts["negative"]) == (2, 2)
    assert counts["reactions"] == 9  # the "like" is not read at all
    assert counts["reactions_outside_windows"] == 5
    assert counts["enough"] is False


def test_an_interaction_with_both_a_positive_and_a_negative_reaction_is_conflicting(fresh_engine):
    (iid,) = _store(fresh_engine, [("done", 30000)], prefix="c")
    with session_scope(fresh_engine) as s:
        upsert(s, Reaction, [{"id": stable_id(iid, "r2"), "interaction_id": iid,
                              "reaction": "dismiss", "dwell_ms": 1000}])
    counts = count_new_signals(engine=fresh_engine)
    assert (counts["positive"], counts["negative"], counts["conflicting"]) == (0, 0, 1)
