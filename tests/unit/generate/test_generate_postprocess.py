"""Post-processing: role leaks and template tokens stripped; empty/truncated/looping turns caught."""

from __future__ import annotations

import pytest

from tasks.generate.postprocess import (
    clean_turn,
    looping_reason,
    normalise_whitespace,
    turn_problem,
)


@pytest.mark.parametrize(
    ("raw", "role", "expected"),
    [
        ("<|im_start|>assistant\nIt sounds hard.<|im_end|>", "assistant", "It sounds hard."),
        ("<|start_header_id|>assistant<|end_header_id|>\n\nOkay.<|eot_id|>", "assistant", "Okay."),
        ("[INST] [/INST] Sure thing.</s>", "assistant", "Sure thing."),
        ("Assistant: I wonder if it's the deadline.", "assistant", "I wonder if it's the deadline."),
        ("**Coach:** Let's slow down.", "assistant", "Let's slow down."),
        ("User: How do I start?", "user", "How do I start?"),
        ('Priya: "How do I ask for a raise?"', "user", "How do I ask for a raise?"),
        ("Sure! Here is the message:\n\"I can't sleep. Help?\"", "user", "I can't sleep. Help?"),
    ],
)
def test_clean_turn_strips_template_tokens_labels_and_quotes(raw, role, expected):
    assert clean_turn(raw, role, persona_name="Priya") == expected


def test_clean_turn_cuts_off_the_other_side_of_the_dialogue():
    raw = "Assistant: One small step could help.\nUser: ok thanks\nAssistant: You're welcome!"
    assert clean_turn(raw, "assistant") == "One small step could help."


def test_clean_turn_cuts_a_user_message_where_the_coach_starts_talking():
    assert clean_turn("I feel stuck.\nCoach: That makes sense.", "user") == "I feel stuck."


def test_clean_turn_keeps_colons_that_are_not_role_labels():
    text = "Plan A: ask on Monday.\nPlan B: wait for the review."
    assert clean_turn(text, "user") == text


def test_whitespace_is_normalised():
    assert normalise_whitespace("  a   b\t c \r\n\n\n\nnext  \n") == "a b c\n\nnext"


def test_empty_turn_is_a_failure():
    assert turn_problem(clean_turn("<|im_end|>  ", "assistant"), finish_reason="stop") == (
        "empty after post-processing")


def test_truncated_turn_is_a_failure_even_with_text():
    reason = turn_problem("A reply that was cut", finish_reason="length")
    assert reason is not None and reason.startswith("truncated")


@pytest.mark.parametrize(
    "text",
    [
        " ".join(["I hear you and that is valid."] * 6),
        "the cat sat on the mat " * 6,
        "hahahahahahahahahahahahahahahahahahahahaha",
        "Okay. I am fine. I am fine. I am fine. Thanks.",
    ],
)
def test_looping_text_is_detected(text):
    assert looping_reason(text) is not None
    assert turn_problem(text, finish_reason="stop").startswith("looping")


def test_ordinary_text_is_not_looping():
    text = ("It sounds like the deadline and the move landed in the same week. I wonder if "
            "picking one thing to protect, maybe sleep, would make the rest feel lighter. "
            "What would a manageable Tuesday look like for you?")
    assert looping_reason(text) is None
    assert turn_problem(text, finish_reason="stop") is None


def test_repeating_an_earlier_turn_verbatim_is_looping():
    earlier = [{"role": "user", "content": "How do I start?"},
               {"role": "assistant", "content": "Maybe with one small step."}]
    assert "repeats its own message 2" in turn_problem(
        "Maybe with one small step!", finish_reason="stop", earlier=earlier, role="assistant")
    assert "parrots the message 1" in turn_problem(
        "how do I start", finish_reason="stop", earlier=earlier, role="assistant")
