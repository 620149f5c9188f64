"""extract_json / parse_structured on clean, noisy, truncated and wrong-typed LLM replies."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

from tasks.core.llm.structured import StructuredOutputError, extract_json, parse_structured


class Verdict(BaseModel):
    verdict: Literal["YES", "NO", "NA"]
    score: float
    reasoning: str = ""


def test_clean_object_parses() -> None:
    assert extract_json('{"verdict": "YES", "score": 0.9}') == {"verdict": "YES", "score": 0.9}


def test_top_level_array_parses() -> None:
    assert extract_json('[{"a": 1}, {"a": 2}]') == [{"a": 1}, {"a": 2}]


def test_json_fence_inside_prose_is_found() -> None:
    reply = 'Sure! Here is my answer:\n```json\n{"verdict": "NO", "score": 0.1}\n```\nHope it helps.'
    assert extract_json(reply) == {"verdict": "NO", "score": 0.1}


def test_untagged_fence_is_found() -> None:
    assert extract_json("```\n{\"score\": 2}\n```") == {"score": 2}


def test_json_fence_preferred_over_other_language_fence() -> None:
    reply = "```python\nx = {'not': 'this'}\n```\n```json\n{\"yes\": true}\n```"
    assert extract_json(reply) == {"yes": True}


def test_object_embedded_in_prose_without_fence() -> None:
    reply = 'I think the answer is {"verdict": "YES", "score": 1} because it is polite.'
    assert extract_json(reply) == {"verdict": "YES", "score": 1}


def test_braces_in_prose_before_the_json_are_skipped() -> None:
    reply = 'Use {curly braces} for sets. Answer: {"score": 3}'
    assert extract_json(reply) == {"score": 3}


def test_braces_inside_strings_do_not_end_the_object() -> None:
    assert extract_json('note: {"text": "a } and a { inside", "n": 1} end') == {
        "text": "a } and a { inside", "n": 1}


def test_trailing_commas_are_tolerated() -> None:
    assert extract_json('{"a": [1, 2, 3,], "b": {"c": 1,},}') == {"a": [1, 2, 3], "b": {"c": 1}}


def test_single_quotes_and_python_literals_are_tolerated() -> None:
    reply = "{'verdict': 'YES', 'ok': True, 'missing': None, 'quote': 'say \"hi\"'}"
    assert extract_json(reply) == {"verdict": "YES", "ok": True, "missing": None,
                                   "quote": 'say "hi"'}


def test_apostrophes_in_prose_around_json_do_not_confuse_the_scanner() -> None:
    reply = "Here's what I found, it's simple: {\"score\": 5} — that's all."
    assert extract_json(reply) == {"score": 5}


def test_truncated_object_reports_truncation() -> None:
    with pytest.raises(StructuredOutputError, match="never closed.*truncated") as info:
        extract_json('Here you go: {"verdict": "YES", "score": 0.')
    assert info.value.raw == 'Here you go: {"verdict": "YES", "score": 0.'


def test_reply_without_json_says_so() -> None:
    with pytest.raises(StructuredOutputError, match="contains no JSON object or array"):
        extract_json("I am sorry, I cannot help with that.")


def test_bare_json_scalar_is_not_an_object() -> None:
    with pytest.raises(StructuredOutputError, match="no JSON object"):
        extract_json('"just a string"')


def test_empty_reply_says_empty() -> None:
    with pytest.raises(StructuredOutputError, match="empty"):
        extract_json("   \n")


def test_unrepairable_json_reports_decoder_error_and_position() -> None:
    with pytest.raises(StructuredOutputError, match="starting at character 8 is invalid"):
        extract_json('answer: {"a": 1 "b": 2}')


def test_parse_structured_returns_validated_model() -> None:
    value = parse_structured('```json\n{"verdict": "NA", "score": "0.5"}\n```', Verdict)
    assert isinstance(value, Verdict)
    assert value.verdict == "NA" and value.score == 0.5


def test_wrong_typed_field_names_the_field_and_keeps_raw() -> None:
    raw = '{"verdict": "MAYBE", "score": "high"}'
    with pytest.raises(StructuredOutputError) as info:
        parse_structured(raw, Verdict)
    err = info.value
    assert "does not match Verdict" in err.reason
    assert "field 'verdict'" in err.reason and "field 'score'" in err.reason
    assert "'high'" in err.reason or '"high"' in err.reason
    assert err.raw == raw
    assert {tuple(e["loc"]) for e in err.errors} == {("verdict",), ("score",)}


def test_missing_field_is_reported() -> None:
    with pytest.raises(StructuredOutputError, match="field 'score': Field required"):
        parse_structured('{"verdict": "YES"}', Verdict)


def test_array_where_object_expected_fails_validation() -> None:
    with pytest.raises(StructuredOutputError, match="does not match Verdict"):
        parse_structured('[{"verdict": "YES", "score": 1}]', Verdict)
