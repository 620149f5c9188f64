"""Erasure (`tuneloop forget`) and retention (`tuneloop retention`): a forgotten user's reactions
are gone, their interactions' text is wiped (the rows stay for existing snapshots' references),
the snapshots holding them are listed, a rerun changes nothing, and no later dataset reads them;
the retention purge wipes text by age, in batches, once, selecting by timestamps alone. Both through
the CLI too."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select, text

from tasks.cli import main
from tasks.core.db.engine import downgrade, migrate, session_scope
from tasks.core.db.models import DatasetItem, Interaction, Reaction, UserErasure
from tasks.core.settings import get_settings
from tasks.signals.erasure import (
    ErasureError,
    forget_user,
    forget_user_hash,
    nightly_retention,
    purge_expired_text,
)
from tasks.signals.stage import build_reaction_dataset, count_new_signals
from tests.unit.signals.served import (
    CFG,
    SALT,
    assistant_says,
    dataset_interactions,
    interaction,
    snapshot_text,
    store,
    user,
    user_says,
)

ALICE_SECRET = "alice-wrote-this-7781"


def _conversations(engine) -> dict[str, list[str]]:
    """alice: a served turn, a genuine follow-up (done) and a quick dismiss; bob: one done.
    Returns the interaction ids by user."""
    alice, bob = user("alice"), user("bob")
    first = [user_says(f"help me plan, {ALICE_SECRET}")]
    rows = [
        interaction("alice-1", alice, first, "Start with the hardest task.", minute=0),
        interaction("alice-2", alice, [*first, assistant_says("Start with the hardest task."),
                                       user_says("and then?")], "Then take a break.",
                    minute=1),
        interaction("alice-3", alice, [user_says("another tip")], "Drink water.", minute=2),
        interaction("bob-1", bob, [user_says("a tip for bob")], "Walk for ten minutes.",
                    minute=3),
    ]
    store(engine, rows, {"alice-2": ("done", 30_000), "alice-3": ("dismiss", 900),
                         "bob-1": ("done", 40_000)})
    return {"alice": ["alice-1", "alice-2", "alice-3"], "bob": ["bob-1"]}


@pytest.fixture()
def snapshot(fresh_engine, data_dir):
    """The conversations and a reaction dataset built from them (it holds alice)."""
    ids = _conversations(fresh_engine)
    result = build_reaction_dataset(CFG, engine=fresh_engine)
    assert {"alice-2", "alice-3", "bob-1"} <= dataset_interactions(fresh_engine,
                                                                   result["dataset_id"])
    return fresh_engine, ids, result


def test_forget_deletes_reactions_and_wipes_text_but_keeps_the_rows(snapshot):
    engine, ids, built = snapshot
    result = forget_user("alice", engine=engine, salt=SALT)

    assert result["user_hash"] == user("alice")
    assert (result["reactions_deleted"], result["interactions_erased"]) == (2, 3)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Reaction).where(
            Reaction.interaction_id.in_(ids["alice"]))) == 0
        rows = session.scalars(select(Interaction).where(Interaction.id.in_(ids["alice"])))
        for row in rows:
            assert (row.request_messages, row.response, row.context) == ([], "", {})
            assert row.erased_at is not None
        # Existing snapshots keep their references; bob is untouched.
        assert session.scalar(select(func.count()).select_from(DatasetItem).where(
            DatasetItem.interaction_id.in_(ids["alice"]))) >= 2
        assert session.get(Interaction, "bob-1").response == "Walk for ten minutes."
        assert session.scalar(select(func.count()).select_from(Reaction)) == 1
        erasure = session.get(UserErasure, user("alice"))
        assert erasure.counts == {"reactions_deleted": 2, "interactions_erased": 3, "runs": 1}
        assert erasure.snapshots == result["snapshots"]
    assert ALICE_SECRET not in json.dumps(result)


def test_forget_lists_the_snapshots_that_hold_the_user(snapshot):
    engine, _, built = snapshot
    result = forget_user("alice", engine=engine, salt=SALT)
    assert result["snapshots"] == [{
        "dataset_id": built["dataset_id"], "name": "reactions", "kind": "reaction",
        "artifact_uri": built["artifact_uri"], "items": 2}]  # alice-2 (SFT), alice-3 (unused)


def test_forget_twice_reports_nothing_new_and_the_same_snapshots(snapshot):
    engine, _, _ = snapshot
    first = forget_user("alice", engine=engine, salt=SALT)
    second = forget_user_hash(user("alice"), engine=engine)
    assert (second["reactions_deleted"], second["interactions_erased"]) == (0, 0)
    assert second["snapshots"] == first["snapshots"]
    assert second["totals"] == {"reactions_deleted": 2, "interactions_erased": 3, "runs": 2}


def test_the_next_dataset_leaves_a_forgotten_user_out(snapshot):
    engine, ids, built = snapshot
    forget_user("alice", engine=engine, salt=SALT)
    # A row of hers written late (the router replaying its outage spool), from before the
    # erasure, with its reaction: still hers, still erased.
    late = interaction("alice-late", user("alice"), [user_says("late")], "late answer",
                       minute=5)
    store(engine, [late], {"alice-late": ("done", 30_000)})
    rebuilt = build_reaction_dataset(CFG, engine=engine)
    assert rebuilt["dataset_id"] != built["dataset_id"]
    in_dataset = dataset_interactions(engine, rebuilt["dataset_id"])
    assert in_dataset == {"bob-1"}
    assert rebuilt["counts"]["reactions_erased"] == 1
    assert ALICE_SECRET not in snapshot_text(rebuilt)


def test_what_a_user_sends_after_the_erasure_is_a_signal_again(snapshot):
    engine, _, _ = snapshot
    erased = forget_user("alice", engine=engine, salt=SALT)
    after = datetime.fromisoformat(erased["requested_at"]) + timedelta(minutes=1)
    row = interaction("alice-back", user("alice"), [user_says("hello again")], "welcome",
                      minute=0)
    store(engine, [{**row, "created_at": after}], {"alice-back": ("done", 30_000)})
    assert count_new_signals(cfg=CFG, engine=engine)["positive"] == 2  # bob-1, alice-back


def test_forget_refuses_a_malformed_hash_and_an_empty_id(fresh_engine):
    with pytest.raises(ErasureError, match="not 64 hex characters.*--user ID"):
        forget_user_hash("alice", engine=fresh_engine)
    with pytest.raises(ErasureError, match="user id is empty"):
        forget_user("", engine=fresh_engine, salt=SALT)


def test_forget_of_an_unknown_user_is_a_harmless_record(fresh_engine):
    result = forget_user("nobody", engine=fresh_engine, salt=SALT)
    assert (result["reactions_deleted"], result["interactions_erased"]) == (0, 0)
    assert result["snapshots"] == []


def test_forget_hashes_with_the_routers_salt_by_default(fresh_engine, monkeypatch):
    monkeypatch.setenv("TUNELOOP_USER_HASH_SALT", SALT)
    get_settings.cache_clear()
    try:
        assert forget_user("carol", engine=fresh_engine)["user_hash"] == user("carol")
    finally:
        monkeypatch.delenv("TUNELOOP_USER_HASH_SALT")
        get_settings.cache_clear()


# ---- retention ---------------------------------------------------------------------------------
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _aged(engine) -> None:
    """Interactions 1, 10, 40 and 400 days old; the 40-day one has a done reaction."""
    rows = []
    for days in (1, 10, 40, 400):
        row = interaction(f"aged-{days}", user(f"user-{days}"), [user_says(f"{days} days")],
                          f"answer {days}", minute=0)
        rows.append({**row, "created_at": NOW - timedelta(days=days), "error": None})
    store(engine, rows, {"aged-40": ("done", 30_000)})


def _texts(engine) -> dict[str, tuple]:
    with session_scope(engine) as session:
        return {r.id: (r.response, r.request_messages, r.context, r.text_purged_at)
                for r in session.scalars(select(Interaction))}


def test_retention_wipes_the_text_of_interactions_older_than_n_days(fresh_engine):
    _aged(fresh_engine)
    result = purge_expired_text(30, engine=fresh_engine, now=NOW)
    assert result["interactions_purged"] == 2
    assert result["cutoff"] == (NOW - timedelta(days=30)).isoformat()
    texts = _texts(fresh_engine)
    for kept in ("aged-1", "aged-10"):
        assert texts[kept][0] == kept.replace("aged-", "answer ") and texts[kept][3] is None
    for purged in ("aged-40", "aged-400"):
        assert texts[purged][:3] == ("", [], {}) and texts[purged][3] == NOW


def test_retention_is_idempotent_and_batched(fresh_engine):
    _aged(fresh_engine)
    first = purge_expired_text(5, engine=fresh_engine, now=NOW, batch_size=1)
    assert (first["interactions_purged"], first["batches"]) == (3, 3)
    again = purge_expired_text(5, engine=fresh_engine, now=NOW + timedelta(hours=1))
    assert again["interactions_purged"] == 0
    assert _texts(fresh_engine)["aged-40"][3] == NOW  # the first purge's time stays


def test_a_retention_rerun_selects_by_timestamps_and_reads_no_text(fresh_engine):
    _aged(fresh_engine)
    assert purge_expired_text(5, engine=fresh_engine, now=NOW)["interactions_purged"] == 3
    updates: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("UPDATE interactions"):
            updates.append((statement, parameters))

    event.listen(fresh_engine, "before_cursor_execute", capture)
    try:
        again = purge_expired_text(5, engine=fresh_engine, now=NOW + timedelta(hours=1))
    finally:
        event.remove(fresh_engine, "before_cursor_execute", capture)
    assert (again["interactions_purged"], again["batches"], len(updates)) == (0, 0, 1)
    statement, parameters = updates[0]
    with fresh_engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # four rows: show the plan at scale
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(
            f"EXPLAIN (COSTS OFF) {statement}", parameters))
    # The age range on the partial index of the rows still to purge (PostgreSQL only uses it
    # when the query's predicate implies the index's), so purged and erased rows are never
    # walked; the IS NULL filter is the row-lock recheck PostgreSQL keeps for FOR UPDATE.
    assert "Index Scan using ix_interactions_retention_pending" in plan, plan
    assert "Index Cond: (created_at <" in plan, plan
    assert "Filter: ((text_purged_at IS NULL) AND (erased_at IS NULL))" in plan, plan
    assert not any(column in plan for column in ("response", "request_messages", "context",
                                                 "error")), plan


def test_the_retention_index_holds_the_purge_predicate_in_model_and_migration(fresh_engine):
    def definition() -> str | None:
        with fresh_engine.connect() as conn:
            return conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = "
                                    "'ix_interactions_retention_pending'"))

    assert definition() == (
        "CREATE INDEX ix_interactions_retention_pending ON public.interactions USING btree "
        "(created_at) WHERE ((text_purged_at IS NULL) AND (erased_at IS NULL))")
    declared = {index.name: index for index in Interaction.__table__.indexes}
    index = declared["ix_interactions_retention_pending"]
    assert [column.name for column in index.columns] == ["created_at"]
    assert str(index.dialect_options["postgresql"]["where"]) == (
        "text_purged_at IS NULL AND erased_at IS NULL")
    downgrade(fresh_engine, "0009")
    assert definition() is None
    migrate(fresh_engine)
    assert definition() is not None


def test_purged_interactions_are_never_signals(fresh_engine):
    _aged(fresh_engine)
    assert count_new_signals(cfg=CFG, engine=fresh_engine)["positive"] == 1
    purge_expired_text(30, engine=fresh_engine, now=NOW)
    counts = count_new_signals(cfg=CFG, engine=fresh_engine)
    assert counts["positive"] == 0 and counts["reactions_text_purged"] == 1


@pytest.mark.parametrize("days", [0, -3])
def test_retention_refuses_less_than_a_day(fresh_engine, days):
    with pytest.raises(ErasureError, match=r"retention days must be a whole number >= 1.*"
                                           r"TUNELOOP_RETENTION_DAYS=90"):
        purge_expired_text(days, engine=fresh_engine)


def test_the_nightly_retention_skips_while_the_setting_is_unset(fresh_engine, monkeypatch):
    monkeypatch.delenv("TUNELOOP_RETENTION_DAYS", raising=False)
    get_settings.cache_clear()
    _aged(fresh_engine)
    result = nightly_retention(engine=fresh_engine, now=NOW)
    assert result == {"skipped": True,
                      "reason": "TUNELOOP_RETENTION_DAYS is unset: interaction text is kept"}
    monkeypatch.setenv("TUNELOOP_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    try:
        result = nightly_retention(engine=fresh_engine, now=NOW)
    finally:
        monkeypatch.delenv("TUNELOOP_RETENTION_DAYS")
        get_settings.cache_clear()
    assert result["skipped"] is False and result["interactions_purged"] == 2


# ---- the CLI -----------------------------------------------------------------------------------
@pytest.fixture()
def cli_db(fresh_engine, data_dir, monkeypatch):
    """DATABASE_URL and the router's salt pointing the CLI at a fresh database."""
    monkeypatch.setenv("DATABASE_URL", fresh_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("TUNELOOP_USER_HASH_SALT", SALT)
    monkeypatch.delenv("TUNELOOP_RETENTION_DAYS", raising=False)
    get_settings.cache_clear()
    yield fresh_engine
    monkeypatch.undo()
    get_settings.cache_clear()


def _cli(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) <= 1, out
    return code, json.loads(lines[0]) if lines else None, err


def test_cli_forget_prints_the_counts_and_the_snapshots(cli_db, capsys):
    _conversations(cli_db)
    built = build_reaction_dataset(CFG, engine=cli_db)
    code, summary, err = _cli(["forget", "--user", "alice"], capsys)
    assert code == 0
    assert summary["user_hash"] == user("alice")
    assert (summary["reactions_deleted"], summary["interactions_erased"]) == (2, 3)
    assert [s["dataset_id"] for s in summary["snapshots"]] == [built["dataset_id"]]
    assert built["dataset_id"] in err and built["artifact_uri"] in err  # the list, for people
    assert "alice" not in err.replace(summary["user_hash"][:12], "")  # never the raw id

    code, again, _ = _cli(["forget", "--user-hash", user("alice")], capsys)
    assert code == 0
    assert (again["reactions_deleted"], again["interactions_erased"]) == (0, 0)
    assert again["snapshots"] == summary["snapshots"]


@pytest.mark.parametrize(("argv", "message"), [
    (["forget", "--user-hash", "not-a-hash"], "not 64 hex characters"),
    (["forget", "--user", ""], "user id is empty"),
    (["retention"], "pass --days N (e.g. --days 90) or set TUNELOOP_RETENTION_DAYS"),
])
def test_cli_refusals_exit_2_with_the_fix(cli_db, capsys, argv, message):
    code, summary, err = _cli(argv, capsys)
    assert code == 2 and summary is None
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["forget"], ["forget", "--user", "a", "--user-hash", "b" * 64],
                                  ["retention", "--days", "0"]])
def test_cli_bad_flags_exit_2(cli_db, capsys, argv):
    code, _, _ = _cli(argv, capsys)
    assert code == 2


def test_cli_retention_purges_with_days_or_the_setting(cli_db, capsys, monkeypatch):
    now = datetime.now(UTC)
    rows = [{**interaction(f"r-{d}", user(f"u-{d}"), [user_says("x")], "y", minute=0),
             "created_at": now - timedelta(days=d)} for d in (1, 50, 100)]
    store(cli_db, rows)
    code, summary, _ = _cli(["retention", "--days", "60"], capsys)
    assert code == 0 and summary["days"] == 60 and summary["interactions_purged"] == 1
    monkeypatch.setenv("TUNELOOP_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    code, summary, _ = _cli(["retention"], capsys)
    assert code == 0 and summary["days"] == 30 and summary["interactions_purged"] == 1
    code, summary, _ = _cli(["retention"], capsys)
    assert code == 0 and summary["interactions_purged"] == 0
