"""Importing reaction logs into real Postgres: the tip_scores CSV and JSONL examples and a SQL
table become de-identified interactions + reactions marked as imported; a re-import adds
nothing; bad rows fail the run and write nothing unless allowed; the reaction dataset trains on
an imported positive; only rows marked as imported count as shown answers; `tuneloop forget`
covers imported rows and a re-import does not bring them back."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from tasks.core.db.engine import session_scope
from tasks.core.db.models import Interaction, Reaction
from tasks.core.ids import hash_user
from tasks.signals.erasure import forget_user
from tasks.signals.import_config import ImportConfig
from tasks.signals.import_rows import parse_row
from tasks.signals.importing import (
    ImportRejected,
    ImportSourceError,
    deidentified_event,
    import_reactions,
)
from tasks.signals.labels import label_interactions
from tasks.signals.stage import build_reaction_dataset, count_new_signals
from tests.unit.signals.served import CFG, SALT, exported_rows, interaction, snapshot_text, store

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data" / "import"
CSV_LOG, JSONL_LOG = DATA / "tip_scores.csv", DATA / "tip_scores.jsonl"
COLUMNS = ["user_id", "created_at", "context_json", "tip_content", "kind", "source", "reaction",
           "dwell_ms"]
# What the example logs hold that must never reach the database.
RAW_PII = ("priya", "sharma", "tom baker", "example.com", "7946 0958", "ana costa", "okafor")


def _import(engine, source: Path | None = None, **params):
    params.setdefault("file", str(source or CSV_LOG))
    return import_reactions(ImportConfig(mapping="tip_scores", **params), engine=engine,
                            salt=SALT)


def _counts(engine) -> tuple[int, int]:
    with session_scope(engine) as session:
        return (session.scalar(select(func.count()).select_from(Interaction)),
                session.scalar(select(func.count()).select_from(Reaction)))


def _dump(engine) -> str:
    with engine.connect() as conn:
        rows = [*conn.execute(text("SELECT * FROM interactions")),
                *conn.execute(text("SELECT * FROM reactions"))]
    return json.dumps([list(r) for r in rows], default=str).lower()


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _tip(user: str, minute: int, reaction: str = "done", dwell_ms: object = 30000,
         **overrides) -> dict:
    row = {"user_id": user, "created_at": f"2026-03-05T10:{minute:02d}:00Z",
           "context_json": json.dumps({"goal": "focus", "n": minute}),
           "tip_content": f"Tip number {minute}.", "kind": "focus", "source": "llm",
           "reaction": reaction, "dwell_ms": dwell_ms}
    row.update(overrides)
    return row


# ---- files -------------------------------------------------------------------------------------
def test_the_tip_scores_csv_becomes_marked_deidentified_interactions_and_reactions(fresh_engine):
    result = _import(fresh_engine)

    assert (result["rows"], result["filtered"], result["bad"], result["valid"]) == (6, 1, 0, 5)
    assert (result["interactions_inserted"], result["reactions_inserted"]) == (5, 5)
    assert result["imported"] and result["source"] == "csv" and result["name"] == "tip_scores"
    with session_scope(fresh_engine) as session:
        rows = list(session.scalars(select(Interaction).order_by(Interaction.created_at)))
        reactions = {r.interaction_id: r for r in session.scalars(select(Reaction))}
    assert {(r.variant, r.client_id, r.status, r.model_name) for r in rows} == {
        ("imported", "import:tip_scores", "ok", "tip-generator")}
    assert all(r.context["source"] == "import" and r.context["import"]["name"] == "tip_scores"
               for r in rows)
    first = rows[0]
    assert first.user_hash == hash_user("priya.sharma@example.com", SALT)  # the router's hash
    assert first.created_at == datetime(2026, 3, 2, 8, 15, tzinfo=UTC)
    assert first.request_messages == [{"role": "user", "content":
                                       '{"goal":"focus","time_of_day":"morning",'
                                       '"user_name":"<PERSON>"}'}]
    assert first.response == "<PERSON>, try a 25-minute focus block before email."
    assert first.context["fields"] == {"kind": "focus"}
    assert (reactions[first.id].reaction, reactions[first.id].dwell_ms) == ("done", 30000)
    hydration = rows[2]  # "completed" (an alias), a +01:00 offset, a phone in a two-line tip
    assert reactions[hydration.id].reaction == "done"
    assert hydration.created_at == datetime(2026, 3, 2, 11, 40, tzinfo=UTC)
    assert "call <PHONE> if" in hydration.response
    dump = _dump(fresh_engine)
    assert not [pii for pii in RAW_PII if pii in dump]


def test_reimporting_the_same_log_inserts_nothing(fresh_engine):
    _import(fresh_engine)
    before = _counts(fresh_engine)
    again = _import(fresh_engine)
    assert _counts(fresh_engine) == before == (5, 5)
    assert (again["interactions_inserted"], again["reactions_inserted"]) == (0, 0)
    assert again["already_imported"] == 5


def test_the_jsonl_log_imports_with_its_nested_prompts(fresh_engine):
    result = _import(fresh_engine, JSONL_LOG)
    assert (result["source"], result["rows"], result["interactions_inserted"]) == ("jsonl", 3, 3)
    with session_scope(fresh_engine) as session:
        prompts = [r.request_messages[0]["content"] for r in session.scalars(select(Interaction))]
    assert '{"goal":"focus","time_of_day":"morning","user_name":"<PERSON>"}' in prompts
    assert not [pii for pii in RAW_PII if pii in _dump(fresh_engine)]


def test_any_bad_row_fails_the_run_and_writes_nothing(fresh_engine, tmp_path):
    log = _write_csv(tmp_path / "tips.csv", [
        _tip("u1", 1), _tip("u2", 2, dwell_ms="soon"), _tip("u3", 3),
        _tip("u4", 4, reaction="shared"), _tip("u5", 5)])

    with pytest.raises(ImportRejected) as exc:
        _import(fresh_engine, log)

    assert _counts(fresh_engine) == (0, 0)
    summary = exc.value.summary
    assert summary["imported"] is False and summary["bad"] == 2
    assert [(b["line"], b["reason"].split(" (")[0].split(";")[0]) for b in summary["bad_rows"]] \
        == [(3, "unparseable dwell 'soon'"), (5, "unknown action 'shared'")]
    message = str(exc.value)
    assert "2 bad row(s)" in message and "line 3: unparseable dwell 'soon'" in message
    assert "nothing was imported" in message and "max_bad_rows (--allow-bad N)" in message


def test_allowed_bad_rows_are_skipped_and_reported(fresh_engine, tmp_path):
    log = _write_csv(tmp_path / "tips.csv", [
        _tip("u1", 1), _tip("u2", 2, dwell_ms="soon"), _tip("u3", 3), _tip("u4", 4, user_id="")])
    result = _import(fresh_engine, log, max_bad_rows=2)
    assert (result["bad"], result["valid"], result["interactions_inserted"]) == (2, 2, 2)
    assert [b["line"] for b in result["bad_rows"]] == [3, 5]
    assert result["bad_rows"][1]["reason"] == "empty user (column 'user_id')"
    assert _counts(fresh_engine) == (2, 2)


def test_one_bad_row_over_the_allowance_rejects_and_still_counts_them_all(fresh_engine,
                                                                            tmp_path):
    log = _write_csv(tmp_path / "tips.csv", [
        _tip("u1", 1, dwell_ms="x"), _tip("u2", 2, dwell_ms="y"), _tip("u3", 3),
        _tip("u4", 4, dwell_ms="z")])
    with pytest.raises(ImportRejected) as exc:
        _import(fresh_engine, log, max_bad_rows=1)
    assert exc.value.summary["bad"] == 3 and _counts(fresh_engine) == (0, 0)


def test_a_dry_run_counts_what_it_would_insert_and_writes_nothing(fresh_engine):
    result = _import(fresh_engine, dry_run=True)
    assert (result["imported"], result["dry_run"], result["interactions_inserted"]) == (
        False, True, 5)
    assert _counts(fresh_engine) == (0, 0)


def test_duplicate_keys_are_one_interaction_with_each_distinct_reaction(fresh_engine, tmp_path):
    log = _write_csv(tmp_path / "tips.csv", [
        _tip("u1", 1), _tip("u1", 1, reaction="dismiss", dwell_ms=900), _tip("u1", 1)])
    result = _import(fresh_engine, log)
    assert (result["duplicates"], result["interactions_inserted"],
            result["reactions_inserted"]) == (2, 1, 2)


def test_rows_older_than_the_retention_period_are_skipped(fresh_engine, monkeypatch):
    from tasks.core.settings import get_settings

    monkeypatch.setenv("TUNELOOP_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    try:
        result = import_reactions(ImportConfig(mapping="tip_scores", file=str(CSV_LOG)),
                                  engine=fresh_engine, salt=SALT,
                                  now=datetime(2026, 4, 2, 8, 0, tzinfo=UTC))
    finally:
        monkeypatch.delenv("TUNELOOP_RETENTION_DAYS")
        get_settings.cache_clear()
    # 30 days before 2026-04-02 08:00: only the 2026-03-03 09:00 row is recent enough.
    assert (result["expired"], result["interactions_inserted"]) == (4, 1)


def test_the_id_is_the_natural_key_not_the_scrubbed_text(fresh_engine):
    from tasks.signals.import_config import load_mapping

    mapping = load_mapping("tip_scores")
    base = _tip("priya@example.com", 1, tip_content="Call Priya at +44 20 7946 0958.")
    first, _ = deidentified_event(parse_row(base, mapping), mapping, "csv", salt=SALT)
    other_answer, _ = deidentified_event(parse_row({**base, "tip_content": "Walk."}, mapping),
                                         mapping, "csv", salt=SALT)
    other_prompt, _ = deidentified_event(parse_row({**base, "context_json": '{"n": 99}'},
                                                   mapping), mapping, "csv", salt=SALT)
    assert first["id"] == other_answer["id"] != other_prompt["id"]
    assert "priya" not in json.dumps(first).lower()


# ---- SQL ---------------------------------------------------------------------------------------
@pytest.fixture()
def app_db(make_database):
    """A separate application database with a tip_scores table (jsonb context, int dwell)."""
    url = make_database("tuneloop_app")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE tip_scores (id serial PRIMARY KEY, user_id text, "
            "created_at timestamptz, context_json jsonb, tip_content text, kind text, "
            "source text, reaction text, dwell_ms integer)"))
        conn.execute(text(
            "INSERT INTO tip_scores (user_id, created_at, context_json, tip_content, kind, "
            "source, reaction, dwell_ms) VALUES "
            "('priya.sharma@example.com', '2026-03-02T08:15:00Z', "
            " '{\"user_name\": \"Priya Sharma\", \"goal\": \"focus\"}', "
            " 'Priya, try a 25-minute focus block.', 'focus', 'llm', 'done', 30000), "
            "('tom@example.com', '2026-03-02T08:20:00Z', '{\"goal\": \"focus\"}', "
            " '100% focus: check mail every minute.', 'focus', 'llm', 'dismiss', 1200), "
            "('ana@example.com', '2026-03-02T09:00:00Z', '{\"goal\": \"sleep\"}', "
            " 'Share this tip.', 'sleep', 'llm', 'shared', 40000), "
            "('sam@example.com', '2026-03-02T10:00:00Z', '{\"goal\": \"sleep\"}', "
            " 'A rule tip.', 'sleep', 'rule', 'done', 40000)"))
    yield url, engine
    engine.dispose()


# `%` and `::` pass through untouched: the query is sent without bind parameters.
QUERY = ("SELECT * FROM tip_scores WHERE tip_content LIKE '%' AND source::text <> 'none' "
         "ORDER BY created_at")


def test_a_sql_query_imports_and_reports_a_bad_row_by_row_and_key(fresh_engine, app_db):
    url, _ = app_db
    result = import_reactions(ImportConfig(mapping="tip_scores", sql=QUERY, source_url=url,
                                           max_bad_rows=1), engine=fresh_engine, salt=SALT)

    assert (result["source"], result["rows"], result["filtered"]) == ("sql", 4, 1)
    assert (result["bad"], result["interactions_inserted"], result["reactions_inserted"]) == (
        1, 2, 2)
    [bad] = result["bad_rows"]
    assert bad["row"] == 3 and bad["reason"].startswith("unknown action 'shared'")
    assert bad["key"]["timestamp"].startswith("2026-03-02 09:00:00")
    assert bad["key"]["user"] == hash_user("ana@example.com", SALT)[:12]
    assert bad["key"]["prompt"].startswith("sha256:")
    assert "ana@example.com" not in json.dumps(result)
    with session_scope(fresh_engine) as session:
        priya = session.scalar(select(Interaction).where(
            Interaction.user_hash == hash_user("priya.sharma@example.com", SALT)))
    assert priya.context["import"]["format"] == "sql"
    assert priya.request_messages[0]["content"] == '{"goal":"focus","user_name":"<PERSON>"}'
    assert not [pii for pii in RAW_PII if pii in _dump(fresh_engine)]
    again = import_reactions(ImportConfig(mapping="tip_scores", sql=QUERY, source_url=url,
                                          max_bad_rows=1), engine=fresh_engine, salt=SALT)
    assert again["interactions_inserted"] == 0 and _counts(fresh_engine) == (2, 2)


@pytest.mark.parametrize(("query", "reason"), [
    ("SELECT *, nextval('tip_scores_id_seq') FROM tip_scores", "in a read-only transaction"),
    ("WITH gone AS (DELETE FROM tip_scores RETURNING *) SELECT * FROM gone",
     "data-modifying statements"),
])
def test_the_query_cannot_write(fresh_engine, app_db, query, reason):
    url, engine = app_db
    with pytest.raises(ImportSourceError, match=f"the sql query failed: .*{reason}"):
        import_reactions(ImportConfig(mapping="tip_scores", sql=query, source_url=url),
                         engine=fresh_engine, salt=SALT)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM tip_scores")) == 4
        assert conn.scalar(text("SELECT last_value FROM tip_scores_id_seq")) == 4
    assert _counts(fresh_engine) == (0, 0)


def test_a_query_without_a_mapped_column_is_refused(fresh_engine, app_db):
    url, _ = app_db
    with pytest.raises(ImportSourceError, match="the sql query's result has no column "
                                                "'context_json', 'tip_content', 'reaction', "
                                                "'dwell_ms', 'source' .*; its columns are "
                                                "user_id, created_at"):
        import_reactions(ImportConfig(mapping="tip_scores", source_url=url,
                                      sql="SELECT user_id, created_at FROM tip_scores"),
                         engine=fresh_engine, salt=SALT)


# ---- the dataset and the security rules --------------------------------------------------------
def test_the_reaction_dataset_trains_on_the_imported_positive(fresh_engine, data_dir):
    _import(fresh_engine)
    result = build_reaction_dataset(CFG, engine=fresh_engine)

    assert result["gate_passed"], result["failed_expectations"]
    counts = result["counts"]
    assert (counts["positive"], counts["negative"], counts["reactions_outside_windows"]) == (
        2, 2, 1)
    sft = exported_rows(result, "openai")
    assert {"role": "assistant", "content": "<PERSON>, try a 25-minute focus block before "
                                            "email."} in [m for r in sft for m in r["messages"]]
    assert result["counts"]["dpo_pairs_same_context"] == 1  # focus/morning: done vs dismiss
    text_out = snapshot_text(result).lower()
    assert not [pii for pii in RAW_PII if pii in text_out]


MARKS = {"variant": "imported", "client_id": "import:tip_scores", "source": "import"}
UNMARKED = {
    "no_source": {"source": None},
    "other_source": {"source": "router"},
    "no_client": {"client_id": None},
    "router_client": {"client_id": "tips-app"},
    "mirror_variant": {"variant": "mirror"},
    "source_only_in_metadata": {"source": None, "metadata": {"source": "import"}},
}


def test_only_rows_marked_as_imported_count_as_shown_answers(fresh_engine):
    rows, reactions = [], {}
    for name, change in {"marked": {}, **UNMARKED}.items():
        marks = {**MARKS, **change}
        context = {"source": marks["source"]} if marks["source"] else {}
        if "metadata" in marks:
            context["metadata"] = marks["metadata"]
        row = interaction(name, hash_user(name, SALT), [{"role": "user", "content": "q"}],
                          "a tip", minute=1, variant=marks["variant"],
                          client_id=marks["client_id"])
        rows.append({**row, "context": context})
        reactions[name] = ("done", 30_000)
    store(fresh_engine, rows, reactions)
    with session_scope(fresh_engine) as session:
        labels = label_interactions(session, CFG)
    assert labels.positive == ["marked"]
    assert labels.not_served == len(UNMARKED)


def test_forget_covers_imported_rows_and_a_reimport_does_not_bring_them_back(fresh_engine):
    _import(fresh_engine)
    priya = hash_user("priya.sharma@example.com", SALT)

    erased = forget_user("priya.sharma@example.com", engine=fresh_engine, salt=SALT)

    assert (erased["reactions_deleted"], erased["interactions_erased"]) == (2, 2)
    again = _import(fresh_engine)
    assert (again["erased"], again["interactions_inserted"], again["reactions_inserted"]) == (
        2, 0, 0)
    with session_scope(fresh_engine) as session:
        hers = list(session.scalars(select(Interaction).where(Interaction.user_hash == priya)))
        assert session.scalar(select(func.count()).select_from(Reaction).where(
            Reaction.interaction_id.in_([r.id for r in hers]))) == 0
    assert all(r.erased_at is not None and r.response == "" and r.request_messages == []
               for r in hers)
    # Her two positives are gone from the signals; the rest of the log still counts.
    counts = count_new_signals(cfg=CFG, engine=fresh_engine)
    assert (counts["positive"], counts["negative"], counts["reactions_erased"]) == (0, 2, 0)


def test_long_dwells_of_a_log_do_not_trip_the_snapshots_pii_scan(fresh_engine, data_dir,
                                                                  tmp_path):
    """The dwell histogram once took its range from the longest dwell: edges such as
    8333.333333 or 168000.0 read as phone numbers and the build refused its own stats."""
    log = _write_csv(tmp_path / "tips.csv", [
        _tip("u1", 1), _tip("u2", 2, dwell_ms=200_000), _tip("u3", 3, dwell_ms=999_999),
        _tip("u4", 4, dwell_ms=3_600_000), _tip("u5", 5, dwell_ms=10**10)])
    _import(fresh_engine, log)
    result = build_reaction_dataset(CFG, engine=fresh_engine)
    assert result["gate_passed"], result["failed_expectations"]
    stats = json.loads((Path(result["artifact_uri"].removeprefix("file://")) / "stats" /
                        "stats.json").read_text())
    edges = stats["histograms"]["dwell_ms_done"]["edges"]
    assert all(isinstance(e, int) and e % 1000 == 0 for e in edges)
    assert edges[-1] == 24 * 3600 * 1000  # a day at most; longer dwells fall in the last bin
