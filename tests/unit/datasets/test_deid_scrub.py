"""Scrubbing: typed placeholders, pseudonyms, records and messages, salted user ids, file scans."""

from __future__ import annotations

import json

import pytest

from tasks.core.secrets import DEV_USER_HASH_SALT
from tasks.core.settings import SettingsError, get_settings, load_settings
from tasks.datasets import deid
from tasks.datasets.deid import (
    REDACTED,
    PiiFound,
    Pseudonyms,
    assert_no_pii,
    find_pii,
    hash_user_id,
    names_in,
    scan_files,
    scrub_messages,
    scrub_text,
    scrub_value,
)


def test_each_category_gets_its_typed_placeholder():
    text = ("I'm Priya, mail priya@example.in, card 4111 1111 1111 1111, "
            "IBAN DE89 3704 0044 0532 0130 00, key AKIA" "IOSFODNN7EXAMPLE")
    assert scrub_text(text) == ("I'm <PERSON>, mail <EMAIL>, card <CREDIT_CARD>, "
                                "IBAN <IBAN>, key <SECRET>")


def test_an_email_glued_to_a_phone_scrubs_to_two_placeholders_and_stays_clean():
    out = scrub_text("jane@corp.io+44 20 7946 0958")
    assert out == "<EMAIL><PHONE>"
    assert find_pii(out) == [] and scrub_text(out) == out


def test_pseudonyms_are_consistent_within_a_conversation_and_in_reading_order():
    messages = [{"role": "user", "content": "Priya met Tom. Write to priya@example.in"},
                {"role": "assistant", "content": "Tell Priya and tom... I mean Tom, hi."},
                {"role": "user", "content": "PRIYA@example.in again"}]
    out = scrub_messages(messages, pseudonymize=True)
    assert [m["content"] for m in out] == [
        "<PERSON_1> met <PERSON_2>. Write to <EMAIL_1>",
        "Tell <PERSON_1> and tom... I mean <PERSON_2>, hi.",
        "<EMAIL_1> again"]
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    # a new conversation starts numbering afresh
    assert scrub_messages(messages[2:], pseudonymize=True)[0]["content"] == "<EMAIL_1> again"


def test_same_phone_written_two_ways_is_one_pseudonym():
    pseudonyms = Pseudonyms()
    out = scrub_text("+44 20 7946 0958 or +442079460958", pseudonyms=pseudonyms)
    assert out == "<PHONE_1> or <PHONE_1>"


def test_records_scrub_name_fields_hash_user_ids_and_keep_clean_values_uncopied():
    record = {"user_id": "u-17", "name": "Ada Lovelace", "note": "Ada says hi",
              "nested": [{"email": "ada@example.org"}], "n": 3}
    out = scrub_value(record, names_in(record), salt="s" * 32)
    assert out == {"user_id": hash_user_id("u-17", "s" * 32), "name": "<PERSON>",
                   "note": "<PERSON> says hi", "nested": [{"email": "<EMAIL>"}], "n": 3}
    assert record["name"] == "Ada Lovelace"  # the input is untouched
    clean = {"topic": "sleep", "scores": [0.1, 0.2]}
    assert scrub_value(clean) is clean


def test_a_64_hex_user_id_is_hashed_like_any_other_never_passed_through():
    already = "a" * 64
    hashed = hash_user_id(already, "s" * 32)
    assert hashed != already and len(hashed) == 64
    assert scrub_value({"user": already}, salt="s" * 32) == {"user": hashed}


def _only_problem(error: pytest.ExceptionInfo[SettingsError]) -> str:
    """The one problem line of a settings error (its first line is the heading)."""
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 1, problems
    return problems[0].strip()


def test_production_refuses_a_missing_or_default_salt_naming_the_variable(production):
    # Every other production secret is valid (the `production` fixture): only the salt is wrong.
    production.delenv("TUNELOOP_USER_HASH_SALT", raising=False)
    with pytest.raises(SettingsError, match="TUNELOOP_USER_HASH_SALT.*secrets.token_hex") as err:
        load_settings()
    assert _only_problem(err).startswith("TUNELOOP_USER_HASH_SALT: ")
    production.setenv("TUNELOOP_USER_HASH_SALT", DEV_USER_HASH_SALT)
    with pytest.raises(SettingsError, match="TUNELOOP_USER_HASH_SALT") as err:
        load_settings()
    assert _only_problem(err).startswith("TUNELOOP_USER_HASH_SALT: ")
    production.setenv("TUNELOOP_USER_HASH_SALT", "f" * 64)
    assert load_settings().env == "production"


def test_hashing_with_the_default_salt_outside_dev_mode_is_an_error(production):
    production.setenv("TUNELOOP_USER_HASH_SALT", "f" * 64)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="TUNELOOP_USER_HASH_SALT"):
            hash_user_id("u-1", DEV_USER_HASH_SALT)
        assert len(hash_user_id("u-1")) == 64
    finally:
        get_settings.cache_clear()


def test_text_still_showing_pii_after_the_rounds_is_redacted_whole(monkeypatch):
    from tasks.datasets.deid import scrub

    monkeypatch.setattr(scrub, "find_pii",
                        lambda text, names=(): [deid.PiiMatch("EMAIL", 0, 1, text[:1])])
    assert scrub_text("anything") == REDACTED


def test_scrub_counts_categories_it_replaced():
    from collections import Counter

    counts: Counter[str] = Counter()
    scrub_text("a@example.com b@example.com +44 20 7946 0958", counts=counts)
    assert counts == {"EMAIL": 2, "PHONE": 1}


def test_file_findings_name_path_line_and_category_never_the_value(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"messages": [{"content": "ok"}]}) + "\n"
        + json.dumps({"messages": [{"content": "mail j\u00fcrgen@beispiel.de"}]},
                     ensure_ascii=True) + "\n")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG jane@example.com")
    findings = scan_files(sorted(tmp_path.iterdir()))
    assert findings == [{"path": str(tmp_path / "train.jsonl"), "line": 2, "kind": "EMAIL"}]
    with pytest.raises(PiiFound) as caught:
        assert_no_pii(sorted(tmp_path.iterdir()))
    assert "EMAIL" in str(caught.value) and "train.jsonl:2" in str(caught.value)
    assert "beispiel" not in str(caught.value)


def test_raw_user_ids_are_found_as_literals(tmp_path):
    (tmp_path / "meta.json").write_text('{"user": "user-42"}')
    assert scan_files([tmp_path / "meta.json"], extra_literals=["user-42"]) == [
        {"path": str(tmp_path / "meta.json"), "line": 1, "kind": "literal"}]
