"""Judge prompts render exactly, carry every calibration example, and replies parse strictly."""

from __future__ import annotations

import json

import pytest

from tasks.judge.rubric import load_rubric, rubric_from_dict
from tasks.judge.stage import (
    JudgeOutputInvalid,
    combined_messages,
    criterion_messages,
    parse_combined_verdicts,
    parse_criterion_verdict,
)

MESSAGES = [{"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi! How can I help?"}]


@pytest.fixture(scope="module")
def tiny():
    examples = [
        {"type": "PASS", "context": "User: hi", "response": "Hello!", "reasoning": "Greets back."},
        {"type": "FAIL", "context": "User: hi", "response": "Go away.", "reasoning": "Hostile."},
        {"type": "NA", "context": "No greeting.", "response": "Sure.",
         "reasoning": "Nothing to greet."},
    ]
    return rubric_from_dict({
        "name": "tiny", "categories": {"tone": {"weight": 1.0, "criteria": ["T1"]}},
        "criteria": {"T1": {"name": "Friendly", "question": "Is the assistant friendly?",
                            "na_valid": True, "calibration_examples": examples}}})


def test_criterion_prompt_renders_exactly(tiny):
    assert criterion_messages(tiny, "T1", MESSAGES) == [
        {"role": "system", "content": (
            "You are a strict, fair quality judge for conversations between a user and an AI "
            "assistant (tiny). You answer one yes/no question about the ASSISTANT's turns only.\n"
            "Answer YES if the criterion is met and NO if it is not. Answer NA only if the "
            "situation the question is about never comes up in the conversation.\n\n"
            "The calibration examples show how this criterion is applied; judge the conversation "
            "the same way.\n"
            'Reply with only a JSON object, no prose: {"reasoning": "one or two sentences", '
            '"verdict": "YES"} where verdict is "YES", "NO" or "NA".')},
        {"role": "user", "content": (
            "Criterion T1: Friendly\nQuestion: Is the assistant friendly?\n\n"
            "Calibration examples:\n"
            "Example 1 (YES)\nContext: User: hi\nResponse: Hello!\nWhy YES: Greets back.\n\n"
            "Example 2 (NO)\nContext: User: hi\nResponse: Go away.\nWhy NO: Hostile.\n\n"
            "Example 3 (NA)\nContext: No greeting.\nResponse: Sure.\nWhy NA: Nothing to greet.\n\n"
            "Conversation to judge:\nuser: Hello there\nassistant: Hi! How can I help?\n\n"
            "Answer the question for criterion T1 about the assistant's turns above.")},
    ]


def test_combined_prompt_renders_exactly(tiny):
    system, user = combined_messages(tiny, MESSAGES)
    assert system["content"].endswith(
        'with one key per criterion id, like: {"T1": {"reasoning": "one or two sentences", '
        '"verdict": "YES"}, ...}')
    assert user["content"] == (
        "Criteria:\n\nCriterion T1: Friendly (NA allowed)\nQuestion: Is the assistant friendly?\n"
        "- Example (YES): Context: User: hi Response: Hello! Why: Greets back.\n"
        "- Example (NO): Context: User: hi Response: Go away. Why: Hostile.\n"
        "- Example (NA): Context: No greeting. Response: Sure. Why: Nothing to greet.\n\n"
        "Conversation to judge:\nuser: Hello there\nassistant: Hi! How can I help?\n\n"
        "Answer every criterion (T1) about the assistant's turns above.")


def test_shipped_rubric_prompts_carry_every_calibration_example():
    rubric = load_rubric()
    for cid, criterion in rubric.criteria.items():
        user = criterion_messages(rubric, cid, MESSAGES)[1]["content"]
        for example in criterion.calibration_examples:
            assert f"Response: {example.response}\nWhy {example.verdict}: {example.reasoning}" in user
        system = criterion_messages(rubric, cid, MESSAGES)[0]["content"]
        assert ("NA is not allowed" in system) is (not criterion.na_valid)
    combined = combined_messages(rubric, MESSAGES)[1]["content"]
    assert all(f"Criterion {cid}: " in combined for cid in rubric.criterion_ids())


@pytest.mark.parametrize(("raw", "verdict"), [
    ('{"reasoning": "Warm reply.", "verdict": "YES"}', "YES"),
    ('Verdict below.\n```json\n{"reasoning": "Cold.", "verdict": "no"}\n```', "NO"),
    ('{"verdict": "PASS"}', "YES"),
    ('{"verdict": "n/a", "reasoning": null}', "NA"),
])
def test_criterion_verdicts_parse_from_clean_and_noisy_replies(raw, verdict):
    assert parse_criterion_verdict(raw).verdict == verdict


@pytest.mark.parametrize("raw", [
    '{"reasoning": "unsure", "verdict": "MAYBE"}',
    '{"reasoning": "cut off", "verd',
    "It is friendly.",
])
def test_unusable_verdicts_raise_with_the_raw_reply(raw):
    with pytest.raises(JudgeOutputInvalid) as info:
        parse_criterion_verdict(raw)
    assert info.value.raw == raw


def test_combined_reply_must_cover_every_criterion():
    rubric = load_rubric()
    partial = {cid: {"verdict": "YES"} for cid in rubric.criterion_ids()[:-1]}
    with pytest.raises(JudgeOutputInvalid, match=f"{rubric.criterion_ids()[-1]} missing"):
        parse_combined_verdicts(rubric, json.dumps(partial))
    partial[rubric.criterion_ids()[-1]] = {"verdict": "NO", "reasoning": "x"}
    assert parse_combined_verdicts(rubric, json.dumps(partial))["SF3"].verdict == "NO"
