"""De-identification: what counts as PII, how it is scrubbed, and salted user hashes."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from tasks.datasets.deid import (
    PII_DETECTORS,
    PII_KINDS,
    PiiFound,
    assert_no_pii,
    find_pii,
    hash_user_id,
    names_in,
    scan_files,
    scrub_text,
    scrub_value,
)

POSITIVES = [
    ("write to john.doe+news@example.co.uk today", "email", "john.doe+news@example.co.uk"),
    ("call (555) 123-4567", "phone", "(555) 123-4567"),
    ("call 555-123-4567 or", "phone", "555-123-4567"),
    ("or 555.123.4567", "phone", "555.123.4567"),
    ("ring +44 20 7946 0958", "phone", "+44 20 7946 0958"),
    ("text +14155552671", "phone", "+14155552671"),
    ("+33 6 12 34 56 78", "phone", "+33 6 12 34 56 78"),
    ("office 020 7946 0958", "phone", "020 7946 0958"),
    ("link https://x.com/reset?token=abc123 now", "url", "https://x.com/reset?token=abc123"),
    ("https://a.io/p?foo=1&api_key=XYZ", "url", "https://a.io/p?foo=1&api_key=XYZ"),
    ("https://user:pw@host.com/x", "url", "https://user:pw@host.com/x"),
    ("see https://ex.com/r/8f14e45fceea167a5a36dedd4bea2543 ok", "url",
     "https://ex.com/r/8f14e45fceea167a5a36dedd4bea2543"),
    ("key sk-" "abcdefghijklmnopqrstuvwx", "secret", "sk-" "abcdefghijklmnopqrstuvwx"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz12", "secret",
     "Bearer abcdefghijklmnopqrstuvwxyz12"),
    ("AKIA" "IOSFODNN7EXAMPLE", "secret", "AKIA" "IOSFODNN7EXAMPLE"),
]
NEGATIVES = [
    "on 2024-05-14 at 10:30", "score 0.95 of 1,000,000 users", "python 3.11.2",
    "10.000.000 people", "dwell 120000 ms", "epoch 1713340444",
    "https://docs.python.org/3/library/re.html", "https://example.com/search?q=hello&page=2",
    "I slept 7-8 hours", "room 101, floor 3", "1 000 000", "ISBN 978-3-16-148410-0",
    "192.168.1.1", "age band 50-64", "[EMAIL] [PHONE] [URL] [SECRET] [NAME]",
    "a3f5c0ffee0123456789abcdef0123456789abcdef0123456789abcdef012345",
]


@pytest.mark.parametrize(("text", "kind", "match"), POSITIVES)
def test_pii_is_found_with_its_kind_and_exact_span(text, kind, match):
    found = find_pii(text)
    assert [(m.kind, m.text) for m in found] == [(kind, match)]


@pytest.mark.parametrize("text", NEGATIVES)
def test_ordinary_numbers_dates_and_plain_urls_are_not_pii(text):
    assert find_pii(text) == []


@pytest.mark.parametrize("text", [t for t, _, _ in POSITIVES] + NEGATIVES)
def test_the_gate_detectors_agree_with_the_scrubber(text):
    # The gate runs PII_DETECTORS; find_pii spans come from the full patterns. They must agree.
    detected = any(re.search(d, text) for d in PII_DETECTORS)
    matched = any(re.search(k.pattern, text) for k in PII_KINDS)
    assert detected == matched == bool(find_pii(text))


def test_scrub_replaces_each_kind_with_its_placeholder():
    text = ("Mail ana@corp.io, call 555-123-4567, open https://corp.io/x?sig=abcd1234 "
            "with sk-" "ABCDEFGHIJKLMNOPQRSTUVWX.")
    assert scrub_text(text) == "Mail [EMAIL], call [PHONE], open [URL] with [SECRET]."
    assert find_pii(scrub_text(text)) == []


def test_names_from_known_fields_are_scrubbed_as_whole_words_not_lowercase():
    names = names_in({"profile": {"first_name": "Will", "full_name": "Ada Lovelace"}})
    assert names == {"Will", "Ada Lovelace", "Ada", "Lovelace"}
    text = "Will said ADA LOVELACE will call Ada; Adam and lovelace-like stay."
    assert scrub_text(text, names) == (
        "[NAME] said [NAME] will call [NAME]; Adam and lovelace-like stay.")


def test_user_ids_are_hmac_sha256_with_the_secret_salt():
    expected = hmac.new(b"pepper", b"user-42", hashlib.sha256).hexdigest()
    assert hash_user_id("user-42", salt="pepper") == expected
    assert hash_user_id("user-42", salt="other") != expected
    assert hash_user_id("user-42") == hash_user_id("user-42")  # settings salt, stable
    assert len(hash_user_id("user-42")) == 64


def test_scrub_value_hashes_ids_blanks_name_fields_and_scrubs_strings():
    value = {"user_id": "u-1", "name": "Bo Chen", "note": "ping bo@chen.dev",
             "history": [{"text": "Bo Chen called"}], "count": 3}
    out = scrub_value(value, names_in(value), salt="s")
    assert out == {"user_id": hash_user_id("u-1", salt="s"), "name": "[NAME]",
                   "note": "ping [EMAIL]", "history": [{"text": "[NAME] called"}], "count": 3}


def test_scan_files_reports_pii_and_raw_ids_and_skips_images(tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"text": "all clear"}\n')
    (tmp_path / "bad.json").write_text('{"contact": "x@y.org", "uid": "raw-user-7"}')
    (tmp_path / "img.png").write_bytes(b"\x89PNG x@y.org")
    findings = scan_files(sorted(tmp_path.iterdir()), extra_literals=["raw-user-7"])
    assert {(f["path"].rsplit("/", 1)[1], f["kind"]) for f in findings} == {
        ("bad.json", "email"), ("bad.json", "literal")}
    with pytest.raises(PiiFound) as info:
        assert_no_pii(sorted(tmp_path.iterdir()))
    assert "bad.json" in str(info.value) and info.value.findings[0]["kind"] == "email"
