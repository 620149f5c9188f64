"""`tuneloop scrub`: text lines or JSONL on stdin → scrubbed stream on stdout, counts on stderr."""

from __future__ import annotations

import io
import json

import pytest

from tasks.cli import main
from tasks.datasets.deid.stream import StreamError, scrub_lines


def test_plain_lines_are_scrubbed_one_by_one():
    out = list(scrub_lines(["mail jane@example.com\n", "nothing here\n", "\n"]))
    assert out == ["mail <EMAIL>", "nothing here", ""]


def test_fields_scrub_only_the_named_values_through_objects_and_lists():
    record = {"id": "jane@example.com", "name": "Priya Sharma",
              "messages": [{"role": "user", "content": "I'm Priya, +44 20 7946 0958"}]}
    [line] = scrub_lines([json.dumps(record)], fields=["messages.content"])
    out = json.loads(line)
    assert out["id"] == "jane@example.com" and out["name"] == "Priya Sharma"  # not asked for
    assert out["messages"] == [{"role": "user", "content": "I'm <PERSON>, <PHONE>"}]


def test_jsonl_without_fields_scrubs_every_string_and_hashes_user_ids():
    [line] = scrub_lines([json.dumps({"user_id": "u-1", "note": "call +44 20 7946 0958"})],
                         jsonl=True)
    out = json.loads(line)
    assert out["note"] == "call <PHONE>" and len(out["user_id"]) == 64


def test_a_line_that_is_not_json_names_the_line_and_the_fix():
    with pytest.raises(StreamError, match="line 2 is not JSON.*without --field"):
        list(scrub_lines(['{"a": 1}', "oops"], fields=["a"]))


def test_the_command_streams_stdin_to_stdout_and_reports_counts_not_values(monkeypatch, capsys):
    lines = ["Hi, I'm Priya: priya@example.in", "card 4111 1111 1111 1111 and bob@example.org"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["scrub", "--report", "--pseudonyms"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["Hi, I'm <PERSON_1>: <EMAIL_1>",
                                         "card <CREDIT_CARD_1> and <EMAIL_1>"]
    report = json.loads(captured.err.strip().splitlines()[-1])
    assert report == {"lines": 2, "replaced": 4,
                      "categories": {"CREDIT_CARD": 1, "EMAIL": 2, "PERSON": 1}}
    assert "priya" not in captured.err.lower()


def test_the_command_fails_with_exit_1_on_a_bad_json_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"a": "x"}\nnot json\n'))
    assert main(["scrub", "--field", "a"]) == 1
    assert "line 2 is not JSON" in capsys.readouterr().err
