"""One user cannot steer a reaction dataset: each hashed user contributes at most
`max_examples_per_user` examples, the same ones whatever else is in the dataset."""

from __future__ import annotations

import pytest

from tasks.core.db.engine import session_scope
from tasks.signals.config import SignalConfig, SignalConfigError
from tasks.signals.stage import build_reaction_dataset, label_interactions, over_user_cap
from tests.unit.signals.served import CFG, dataset_interactions, interaction, store, user, user_says

CAP = 3


def _tips(engine, who: str, count: int, start: int = 0) -> list[str]:
    """`count` single-turn interactions of user `who`, each rated done after 30 s."""
    rows = [interaction(f"{who}-{k}", user(who), [user_says(f"tip {k} please")], f"tip {k}",
                        minute=k) for k in range(start, start + count)]
    store(engine, rows, {r["id"]: ("done", 30_000) for r in rows})
    return [r["id"] for r in rows]


def _kept(engine, cfg: SignalConfig) -> set[str]:
    with session_scope(engine) as session:
        labels = label_interactions(session, cfg)
    return set(labels.positive) | set(labels.negative)


def test_a_prolific_user_contributes_at_most_the_cap_and_the_rest_is_counted(
        fresh_engine, data_dir):
    prolific = _tips(fresh_engine, "prolific", 8)
    modest = _tips(fresh_engine, "modest", 2)
    result = build_reaction_dataset(CFG.model_copy(update={"max_examples_per_user": CAP}),
                                    engine=fresh_engine)
    in_dataset = dataset_interactions(fresh_engine, result["dataset_id"])
    assert len(in_dataset & set(prolific)) == CAP
    assert set(modest) <= in_dataset
    assert result["counts"]["capped_per_user"] == 8 - CAP
    assert result["counts"]["positive"] == CAP + 2


def test_which_examples_stay_is_a_stable_hash_order(fresh_engine):
    ids = _tips(fresh_engine, "prolific", 6)
    cfg = CFG.model_copy(update={"max_examples_per_user": CAP})
    first = _kept(fresh_engine, cfg)
    _tips(fresh_engine, "someone-else", 4)  # other users change nothing
    assert _kept(fresh_engine, cfg) & set(ids) == first
    # More of the user's interactions: a new one enters only by sorting before a kept one.
    dropped = over_user_cap({i: "u" for i in ids}, CAP)
    assert first == set(ids) - dropped
    assert over_user_cap({i: "u" for i in reversed(ids)}, CAP) == dropped


def test_a_cap_of_zero_keeps_everything(fresh_engine):
    ids = _tips(fresh_engine, "prolific", 5)
    assert _kept(fresh_engine, CFG.model_copy(update={"max_examples_per_user": 0})) == set(ids)


def test_the_default_cap_is_50():
    assert SignalConfig().max_examples_per_user == 50


def test_a_negative_cap_is_refused_with_the_fix():
    with pytest.raises(SignalConfigError, match=r"max_examples_per_user must be >= 0 \(got -1\); "
                                                r"set max_examples_per_user: 50"):
        SignalConfig.from_params({"max_examples_per_user": -1})


def test_anonymous_traffic_is_capped_per_api_client(fresh_engine):
    """Anonymous requests get a random user hash each (as the router makes them), so without a
    per-client bucket one client could send any number of anonymous examples."""
    rows = []
    for client in ("web", "app"):
        for k in range(5):
            row = interaction(f"{client}-anon-{k}", user(f"anon:{client}-{k}"),
                              [user_says(f"anonymous tip {k}")], f"tip {k}", minute=k,
                              client_id=client)
            row["context"] = {**row["context"], "anonymous": True}
            rows.append(row)
    store(fresh_engine, rows, {r["id"]: ("done", 30_000) for r in rows})
    kept = _kept(fresh_engine, CFG.model_copy(update={"max_examples_per_user": CAP}))
    assert len({i for i in kept if i.startswith("web-")}) == CAP
    assert len({i for i in kept if i.startswith("app-")}) == CAP
