"""What tasks.datasets.deid detects, with which category and exact span — and what it leaves."""

from __future__ import annotations

import pytest

from tasks.datasets.deid import CATEGORIES, find_pii, pii_categories

POSITIVES = [
    # emails: plain, plus-addressed, internationalised, obfuscated, full-width
    ("write to john.doe+news@example.co.uk today", "EMAIL", "john.doe+news@example.co.uk"),
    ("schreib an jürgen.müller@beispiel.de bitte", "EMAIL", "jürgen.müller@beispiel.de"),
    ("mail bob [at] example [dot] org please", "EMAIL", "bob [at] example [dot] org"),
    ("mail bob (at) example (dot) com", "EMAIL", "bob (at) example (dot) com"),
    ("reach bob at example dot org tomorrow", "EMAIL", "bob at example dot org"),
    ("mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ now", "EMAIL", "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
    # phones (phonenumbers VALID for US/GB/DE/FR/IN/BR)
    ("call (415) 555-2671 after six", "PHONE", "(415) 555-2671"),
    ("ring +44 20 7946 0958", "PHONE", "+44 20 7946 0958"),
    ("ruf an: +49 30 901820", "PHONE", "+49 30 901820"),
    ("mon portable +33 6 12 34 56 78", "PHONE", "+33 6 12 34 56 78"),
    ("whatsapp +91 98765 43210", "PHONE", "+91 98765 43210"),
    ("meu celular +55 11 91234-5678", "PHONE", "+55 11 91234-5678"),
    ("call me at 4155552671", "PHONE", "4155552671"),
    # checksummed numbers
    ("card 4111 1111 1111 1111 expires", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("amex 378282246310005.", "CREDIT_CARD", "378282246310005"),
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN", "DE89 3704 0044 0532 0130 00"),
    ("to GB82WEST12345698765432", "IBAN", "GB82WEST12345698765432"),
    ("my server is 203.0.113.54", "IP_ADDRESS", "203.0.113.54"),
    ("from 2001:db8:85a3::8a2e:370:7334 today", "IP_ADDRESS", "2001:db8:85a3::8a2e:370:7334"),
    ("my SSN is 536-90-4399", "US_SSN", "536-90-4399"),
    ("NI number AB123456C", "UK_NINO", "AB123456C"),
    ("aadhaar 2345 6789 0124", "IN_AADHAAR", "2345 6789 0124"),
    ("PAN ABCPE1234F", "IN_PAN", "ABCPE1234F"),
    # secrets
    ("key AKIA" "IOSFODNN7EXAMPLE in prod", "SECRET", "AKIA" "IOSFODNN7EXAMPLE"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "SECRET",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("token ghp_" "abcdefghijklmnopqrstuvwxyz0123456789", "SECRET",
     "ghp_" "abcdefghijklmnopqrstuvwxyz0123456789"),
    ("use xoxb-" "123456789012-abcdefABCDEF", "SECRET", "xoxb-" "123456789012-abcdefABCDEF"),
    ("short sk-" "abc123def456ghi7 key", "SECRET", "sk-" "abc123def456ghi7"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz12", "SECRET",
     "abcdefghijklmnopqrstuvwxyz12"),
    ("login with password=hunter2 ok", "SECRET", "hunter2"),
    ("passwd: S3cr3t!x", "SECRET", "S3cr3t!x"),
    ('config api_key="a1b2c3d4e5"', "SECRET", "a1b2c3d4e5"),
    # URLs that carry a secret or an identity
    ("link https://x.com/reset?token=abc123 now", "URL", "https://x.com/reset?token=abc123"),
    ("https://user:pw@host.com/x", "URL", "https://user:pw@host.com/x"),
    ("see https://www.linkedin.com/in/jane-doe-4821.", "URL",
     "https://www.linkedin.com/in/jane-doe-4821"),
    # dates of birth (only after a birth cue), addresses, names
    ("I was born on 14 March 1987 in Leeds", "DATE_OF_BIRTH", "14 March 1987"),
    ("DOB: 03/07/1990", "DATE_OF_BIRTH", "03/07/1990"),
    ("Geburtsdatum: 12.05.1979", "DATE_OF_BIRTH", "12.05.1979"),
    ("I live at 221B Baker Street, London NW1 6XE", "ADDRESS",
     "221B Baker Street, London NW1 6XE"),
    ("Hauptstraße 5, 10115 Berlin", "ADDRESS", "Hauptstraße 5, 10115 Berlin"),
    ("au 12 rue de Rivoli, 75001 Paris", "ADDRESS", "12 rue de Rivoli, 75001 Paris"),
    ("my name is Priya Sharma", "PERSON", "Priya Sharma"),
    ("this is Lucas from billing", "PERSON", "Lucas"),
    ("Dear Mr. Okafor, thanks", "PERSON", "Mr. Okafor"),
    ("Thanks,\nTom", "PERSON", "Tom"),
    ("I spoke with Fatima Khan yesterday", "PERSON", "Fatima Khan"),
]

NEGATIVES = [
    "on 2024-05-14 at 10:30", "score 0.95 of 1,000,000 users", "python 3.11.2",
    "10.000.000 people", "dwell 120000 ms", "epoch 1713340444", "order #48213",
    "https://docs.python.org/3/library/re.html", "https://example.com/search?q=hello&page=2",
    "I slept 7-8 hours", "room 101, floor 3", "ISBN 978-3-16-148410-0", "age band 50-64",
    "<EMAIL> <PHONE> <URL> <SECRET> <PERSON> <PERSON_2>",
    "a3f5c0ffee0123456789abcdef0123456789abcdef0123456789abcdef012345",
    "Will this work? May I ask? Grace period ends. Mark the task done. Hope that helps.",
    "token = get_token()", "password = os.environ['DB_PASSWORD']", "the password is incorrect",
    "api_key: ${API_KEY}", "We moved the team to Berlin and use Google Docs.",
    "git clone git@github.com:org/repo.git", "pip install torch==2.13.0",
    "Hi there, hello team!", "the meeting is on Monday",
]


@pytest.mark.parametrize(("text", "kind", "match"), POSITIVES)
def test_pii_is_found_with_its_category_and_exact_span(text, kind, match):
    found = find_pii(text)
    assert [(m.kind, m.text) for m in found] == [(kind, match)]
    assert all(text[m.start:m.end] == m.text for m in found)


@pytest.mark.parametrize("text", NEGATIVES)
def test_numbers_versions_dates_code_plain_urls_and_placeholders_are_not_pii(text):
    assert find_pii(text) == []


def test_every_category_is_covered_by_a_positive_example():
    assert {kind for _, kind, _ in POSITIVES} == set(CATEGORIES)


def test_invalid_checksums_are_not_reported():
    assert find_pii("card 4111 1111 1111 1112") == []               # Luhn fails
    assert find_pii("IBAN DE89 3704 0044 0532 0130 01") == []       # mod-97 fails
    assert find_pii("ip 999.12.1.300") == []


def test_weak_patterns_need_context():
    assert find_pii("order 536904399 shipped") == []            # 9 digits: not an SSN alone
    assert [m.kind for m in find_pii("SSN 536904399")] == ["US_SSN"]
    assert find_pii("the number 234567890124 again") == []       # Verhoeff-valid, no context


def test_a_zero_width_space_does_not_hide_a_card_and_the_span_covers_it():
    text = "card 4111\u200b1111 1111 1111 ok"
    [match] = find_pii(text)
    assert match.kind == "CREDIT_CARD" and match.text == "4111\u200b1111 1111 1111"


def test_glued_entities_are_each_found():
    assert [(m.kind, m.text) for m in find_pii("jane@corp.io+44 20 7946 0958")] == [
        ("EMAIL", "jane@corp.io"), ("PHONE", "+44 20 7946 0958")]


def test_known_names_match_whole_words_in_any_capitalisation_except_lower():
    names = {"Will Turner", "Will", "Turner"}
    assert [m.text for m in find_pii("Will said WILL and Turner", names)] == [
        "Will", "WILL", "Turner"]
    assert find_pii("we will see", names) == []


def test_ambiguous_dictionary_names_need_context_or_a_surname():
    assert find_pii("Grace period is over") == []
    assert [m.text for m in find_pii("I met Grace Kim at noon")] == ["Grace Kim"]
    assert [m.text for m in find_pii("Hi Grace, thanks")] == ["Grace"]


def test_categories_are_reported_sorted_without_values():
    assert pii_categories("mail a.b@example.com or +44 20 7946 0958") == ["EMAIL", "PHONE"]


def test_a_configured_spacy_model_adds_the_persons_its_ner_finds(tmp_path, monkeypatch):
    import spacy

    from tasks.core.settings import get_settings
    from tasks.datasets.deid import detect

    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Zorblax Quint"}])
    nlp.to_disk(tmp_path / "model")
    assert find_pii("ask Zorblax Quint") == []  # not in any dictionary
    monkeypatch.setenv("TUNELOOP_DEID_SPACY_MODEL", str(tmp_path / "model"))
    get_settings.cache_clear()
    try:
        assert [(m.kind, m.text) for m in find_pii("ask Zorblax Quint")] == [
            ("PERSON", "Zorblax Quint")]
    finally:
        get_settings.cache_clear()
        detect._detector.cache_clear()


def test_a_missing_spacy_model_is_an_error_naming_the_variable(monkeypatch):
    from tasks.core.settings import get_settings
    from tasks.datasets.deid import detect

    monkeypatch.setenv("TUNELOOP_DEID_SPACY_MODEL", "no_such_spacy_model")
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="TUNELOOP_DEID_SPACY_MODEL='no_such_spacy_model'"):
            find_pii("hello")
    finally:
        get_settings.cache_clear()
        detect._detector.cache_clear()
