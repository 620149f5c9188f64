"""Reaction-log rows, pure: dwell and timestamp parsing, action aliases, every reason a row is
bad, `where` filters, and the readers' line numbers and column checks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tasks.signals.import_config import load_mapping
from tasks.signals.import_rows import (
    ImportSourceError,
    RowProblem,
    lookup,
    parse_dwell_ms,
    parse_row,
    parse_timestamp,
    read_csv,
    read_jsonl,
    selected,
)

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data" / "import"


@pytest.fixture(scope="module")
def tips():
    return load_mapping("tip_scores")


def _row(**overrides) -> dict:
    row = {"user_id": "priya@example.com", "created_at": "2026-03-02T08:15:00Z",
           "context_json": '{"user_name": "Priya", "goal": "focus"}',
           "tip_content": "Try a focus block.", "kind": "focus", "source": "llm",
           "reaction": "done", "dwell_ms": "30000"}
    row.update(overrides)
    return {k: v for k, v in row.items() if v is not ...}


# ---- values ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "unit", "ms"), [
    ("30000", "ms", 30000), (30000, "ms", 30000), (" 1500.4 ", "ms", 1500), ("30", "s", 30000),
    (2.5, "s", 2500), (Decimal("0.75"), "s", 750), ("0", "ms", 0),
])
def test_dwell_in_seconds_or_milliseconds_becomes_whole_milliseconds(value, unit, ms):
    assert parse_dwell_ms(value, unit) == ms


@pytest.mark.parametrize(("value", "reason"), [
    ("abc", "unparseable dwell 'abc' (dwell_unit: ms: a number of milliseconds)"),
    ("-5", "dwell '-5' is not a finite number >= 0"),
    ("nan", "dwell 'nan' is not a finite number >= 0"),
    (True, "unparseable dwell True"),
])
def test_an_unparseable_dwell_says_why(value, reason):
    with pytest.raises(RowProblem) as exc:
        parse_dwell_ms(value, "ms")
    assert str(exc.value).startswith(reason)


@pytest.mark.parametrize(("value", "fmt", "tz", "expected"), [
    ("2026-03-02T08:15:00Z", "iso8601", "UTC", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
    ("2026-03-02T09:15:00+01:00", "iso8601", "UTC", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
    ("2026-03-02 09:15:00", "iso8601", "Europe/Berlin", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
    ("1772439300", "unix_s", "UTC", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
    (1772439300000, "unix_ms", "UTC", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
    ("02/03/2026 08:15", "%d/%m/%Y %H:%M", "UTC", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
    (datetime(2026, 3, 2, 8, 15), "iso8601", "UTC", datetime(2026, 3, 2, 8, 15, tzinfo=UTC)),
])
def test_timestamps_in_every_format_become_utc(value, fmt, tz, expected):
    parsed = parse_timestamp(value, fmt, tz)
    assert parsed == expected and parsed.utcoffset().total_seconds() == 0


@pytest.mark.parametrize(("value", "fmt"), [("yesterday", "iso8601"), ("1772439300", "iso8601"),
                                            ("2026-03-02", "unix_s"), ("2026", "%d/%m/%Y")])
def test_an_unparseable_timestamp_names_the_format_and_the_fix(value, fmt):
    with pytest.raises(RowProblem, match=rf"unparseable timestamp '{value}' \(timestamp_format: "):
        parse_timestamp(value, fmt)


def test_a_dotted_column_reaches_into_nested_objects():
    values = {"event": {"user": {"id": "u-1"}}, "a.b": 1}
    assert lookup(values, "event.user.id") == "u-1"
    assert lookup(values, "a.b") == 1
    assert lookup(values, "event.missing") is lookup(values, "nope")


# ---- rows --------------------------------------------------------------------------------------
def test_a_good_row_parses_with_its_json_prompt_and_context_columns(tips):
    parsed = parse_row(_row(reaction="Completed"), tips)
    assert parsed.user == "priya@example.com"
    assert parsed.prompt == {"user_name": "Priya", "goal": "focus"}
    assert parsed.action == "done"  # the mapping's alias
    assert (parsed.dwell_ms, parsed.timestamp) == (30000, datetime(2026, 3, 2, 8, 15, tzinfo=UTC))
    assert parsed.fields == {"kind": "focus"}


def test_a_plain_text_prompt_stays_text(tips):
    assert parse_row(_row(context_json="{not json"), tips).prompt == "{not json"
    assert parse_row(_row(context_json="How do I focus?"), tips).prompt == "How do I focus?"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"dwell_ms": ...}, "missing column 'dwell_ms'"),
    ({"dwell_ms": ..., "created_at": ...}, "missing column 'dwell_ms', 'created_at'"),
    ({"user_id": "  "}, "empty user (column 'user_id')"),
    ({"tip_content": ""}, "empty response (column 'tip_content')"),
    ({"dwell_ms": "12s"}, "unparseable dwell '12s'"),
    ({"created_at": "soon"}, "unparseable timestamp 'soon'"),
    ({"reaction": "shared"}, "unknown action 'shared'; map it under actions: (e.g. shared: done)"),
    ({"created_at": "2099-01-01T00:00:00Z"}, "timestamp '2099-01-01T00:00:00Z' is in the future"),
])
def test_a_bad_row_says_why(tips, overrides, reason):
    with pytest.raises(RowProblem) as exc:
        parse_row(_row(**overrides), tips, not_after=datetime(2027, 1, 1, tzinfo=UTC))
    assert reason in str(exc.value)


def test_every_reason_of_a_bad_row_is_reported_at_once(tips):
    with pytest.raises(RowProblem) as exc:
        parse_row(_row(dwell_ms="x", reaction="meh", created_at="?"), tips)
    assert str(exc.value).count("; ") >= 2
    for part in ("unparseable dwell 'x'", "unparseable timestamp '?'", "unknown action 'meh'"):
        assert part in str(exc.value)


def test_where_filters_rows_out_but_a_missing_where_column_is_bad(tips):
    assert selected(_row(), tips)
    assert not selected(_row(source="rule"), tips)
    no_source = _row(source=...)
    assert selected(no_source, tips)  # not filtered: parse_row reports it
    with pytest.raises(RowProblem, match="missing column 'source'"):
        parse_row(no_source, tips)


# ---- readers -----------------------------------------------------------------------------------
def test_csv_records_carry_the_line_they_start_on(tips):
    rows = list(read_csv(DATA / "tip_scores.csv", tips))
    # Line 1 is the header; the third record's tip spans lines 4-5.
    assert [r.number for r in rows] == [2, 3, 4, 6, 7, 8]
    assert rows[2].values["tip_content"].startswith("Keep a glass of water on your desk.\n")


def test_csv_blank_lines_and_short_records(tmp_path, tips):
    path = tmp_path / "tips.csv"
    path.write_text("user_id,created_at,context_json,tip_content,kind,source,reaction,dwell_ms\n"
                    "\n"
                    "u1,2026-03-02T08:15:00Z,hi,tip,focus,llm,done,30000\n"
                    "u2,2026-03-02T08:15:00Z,hi\n")
    rows = list(read_csv(path, tips))
    assert [r.number for r in rows] == [3, 4]
    with pytest.raises(RowProblem, match="missing column 'tip_content', 'reaction', 'dwell_ms'"):
        parse_row(rows[1].values, tips)


def test_a_csv_header_without_a_mapped_column_is_refused_whole(tmp_path, tips):
    path = tmp_path / "tips.csv"
    path.write_text("user_id,created_at,prompt,tip_content,reaction,dwell_ms,source\n")
    with pytest.raises(ImportSourceError) as exc:
        list(read_csv(path, tips))
    assert "file tips.csv has no column 'context_json'" in str(exc.value)
    assert "its columns are user_id, created_at, prompt" in str(exc.value)


@pytest.mark.parametrize(("content", "reason"), [
    ("", "is empty"), (b"user_id\n\xff\xfe\n", "is not UTF-8 text"),
])
def test_an_unreadable_csv_says_why(tmp_path, tips, content, reason):
    path = tmp_path / "tips.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ImportSourceError, match=reason):
        list(read_csv(path, tips))


def test_jsonl_lines_that_are_no_record_are_reported_by_line(tmp_path):
    path = tmp_path / "tips.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n{oops\n[1, 2]\n" + json.dumps({"b": 2}) + "\n")
    rows = list(read_jsonl(path))
    assert [(r.number, r.values is None) for r in rows] == [
        (1, False), (3, True), (4, True), (5, False)]
    assert rows[1].problem.startswith("not valid JSON")
    assert rows[2].problem == "not a JSON object (a list)"


def test_the_shipped_jsonl_example_reads_with_nested_prompts(tips):
    rows = list(read_jsonl(DATA / "tip_scores.jsonl"))
    assert [r.number for r in rows] == [1, 2, 4]
    parsed = parse_row(rows[0].values, tips)
    assert parsed.prompt["goal"] == "focus" and parsed.dwell_ms == 20000
