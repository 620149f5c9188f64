"""Tagger output parsing: clean, noisy (prose, fences), truncated and wrong-typed replies."""

from __future__ import annotations

import pytest

from tasks.tag.backends import get_tagger
from tasks.tag.taggers import TaggerOutputInvalid

EMOTION = get_tagger("emotion", "llm", "m")
HALLUCINATION = get_tagger("hallucination", "llm", "m")
BELIEF = get_tagger("belief", "llm", "m")
TEMPORAL = get_tagger("temporal", "llm", "m")
TOPIC = get_tagger("topic", "llm", "m")


def test_clean_json_is_validated_and_stamped_with_its_method():
    out = EMOTION.format_output('{"tones": ["anxious", "supportive"], "confidence": 0.8}')
    assert out == {"tones": ["anxious", "supportive"], "confidence": 0.8, "method": "llm:m"}
    assert EMOTION.score(out) == 0.8


@pytest.mark.parametrize("raw", [
    'Sure! Here you go: {"focus": "past", "confidence": 0.9} Hope that helps.',
    '```json\n{"focus": "past", "confidence": 0.9}\n```',
    'Result:\n```\n{"focus": "past", "confidence": 0.9,}\n```',
    "{'focus': 'past', 'confidence': 0.9}",
])
def test_noisy_replies_with_json_in_prose_or_fences_are_accepted(raw):
    assert TEMPORAL.format_output(raw)["focus"] == "past"


def test_truncated_reply_is_a_recorded_error_that_says_truncated():
    raw = '{"hallucination_score": 0.4, "claims": [{"claim": "A study of 4,000 peo'
    with pytest.raises(TaggerOutputInvalid, match="truncated") as info:
        HALLUCINATION.format_output(raw)
    assert info.value.raw == raw and info.value.tagger == "hallucination"


def test_reply_without_json_is_rejected():
    with pytest.raises(TaggerOutputInvalid, match="no JSON"):
        EMOTION.format_output("The user seems anxious.")


@pytest.mark.parametrize(("tagger", "raw", "message"), [
    (EMOTION, '{"tones": ["anxious"], "confidence": "high"}', "confidence"),
    (EMOTION, '{"tones": 42, "confidence": 0.5}', "tones"),
    (EMOTION, '{"tones": ["anxious"], "confidence": true}', "not a boolean"),
    (EMOTION, '{"tones": ["anxious"], "confidence": 1.5}', "less than or equal to 1"),
    (EMOTION, '{"tones": [], "confidence": 0.5}', "at least 1"),
    (TEMPORAL, '{"focus": "someday", "confidence": 0.5}', "focus"),
    (HALLUCINATION, '{"claims": []}', "hallucination_score"),
    (BELIEF, '{"beliefs": [{"statement": "x", "holder": "narrator", "kind": "explicit"}]}',
     "holder"),
    (TOPIC, '["work_career"]', "TopicTags"),
])
def test_wrong_typed_or_out_of_range_fields_are_rejected_with_the_field_named(tagger, raw,
                                                                             message):
    with pytest.raises(TaggerOutputInvalid, match=message) as info:
        tagger.format_output(raw)
    assert info.value.raw == raw


def test_emotion_tones_outside_the_vocabulary_are_rejected():
    with pytest.raises(TaggerOutputInvalid, match=r"\['melancholic'\] are not in the vocabulary"):
        EMOTION.format_output('{"tones": ["anxious", "melancholic"], "confidence": 0.6}')


def test_common_small_model_slips_are_normalised():
    out = EMOTION.format_output('{"tones": "Anxious", "confidence": "0.7", "extra": 1}')
    assert out["tones"] == ["anxious"] and out["confidence"] == 0.7 and "extra" not in out
    out = HALLUCINATION.format_output('{"hallucination_score": 0.2, "claims": ["Invented stat"]}')
    assert out["claims"] == [{"claim": "Invented stat", "reason": ""}]
    out = TEMPORAL.format_output('{"focus": " FUTURE ", "confidence": 1}')
    assert out["focus"] == "future"


def test_score_column_convention():
    assert HALLUCINATION.score(HALLUCINATION.format_output(
        '{"hallucination_score": 0.25, "claims": []}')) == 0.25
    assert BELIEF.score(BELIEF.format_output('{"beliefs": [], "confidence": null}')) is None
    assert TOPIC.score(TOPIC.format_output('{"topics": ["x"], "confidence": 0.4}')) == 0.4


def test_a_reply_parroting_the_prompts_instructions_and_example_is_rejected():
    # What SmolLM2-135M actually answered to the temporal prompt.
    raw = ('"confidence" is a number from 0 to 1: how sure you are.\nReply with only a JSON '
           'object, no prose:\n{"focus": "future", "confidence": 0.7}')
    with pytest.raises(TaggerOutputInvalid, match="repeats the prompt's instructions"):
        TEMPORAL.format_output(raw)
    # The same values without the echoed instructions are a legitimate answer.
    assert TEMPORAL.format_output('{"focus": "future", "confidence": 0.7}')["focus"] == "future"
    # Echoed instructions around a different answer are just noise.
    assert TEMPORAL.format_output(raw.replace("0.7", "0.9"))["confidence"] == 0.9
