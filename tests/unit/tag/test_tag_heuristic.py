"""LLM-free heuristics: named as heuristics, grounded in the user's turns, schema-valid."""

from __future__ import annotations

from tasks.tag.backends import get_tagger
from tasks.tag.taggers import ConversationInput

HALLUCINATION = get_tagger("hallucination", "heuristic")
BELIEF = get_tagger("belief", "heuristic")


def _conv(user: str, assistant: str, system_prompt: str = "") -> ConversationInput:
    return ConversationInput("c", [{"role": "user", "content": user},
                                   {"role": "assistant", "content": assistant}], system_prompt)


def test_specifics_the_user_never_gave_are_listed_as_unsupported_claims():
    out = HALLUCINATION.tag(_conv(
        "I earn 3,000 a month. How much should I save?",
        "With 3,000 a month, saving 10% is a good start. A study shows most people save less."))
    assert out["method"] == "heuristic:unsupported-specifics"
    claims = [c["claim"] for c in out["claims"]]
    assert claims == ["With 3,000 a month, saving 10% is a good start.",
                      "A study shows most people save less."]
    assert "'10%'" in out["claims"][0]["reason"] and "3,000" not in out["claims"][0]["reason"]
    assert out["hallucination_score"] == round(1 - 0.75 ** 2, 4)
    assert HALLUCINATION.score(out) == out["hallucination_score"]


def test_a_grounded_reply_scores_zero():
    out = HALLUCINATION.tag(_conv("My rent is 900 and I want to pay it on the 1st.",
                                  "Setting a reminder a few days before the 1st helps with 900 "
                                  "in rent."))
    assert out == {"hallucination_score": 0.0, "claims": [],
                   "method": "heuristic:unsupported-specifics"}


def test_instructions_given_to_the_assistant_count_as_grounding():
    conversation = _conv("When is the workshop?", "The workshop is on March 3 in Room Alpha.",
                         system_prompt="Facts: the workshop is on March 3 in Room Alpha.")
    assert HALLUCINATION.tag(conversation)["claims"] == []


def test_belief_markers_give_explicit_and_implied_beliefs_values_and_stances():
    out = BELIEF.tag(_conv(
        "I believe family comes first. People should always keep their promises. "
        "I'm against working weekends.",
        "You should talk to your manager about it."))
    assert out["method"] == "heuristic:stance-markers"
    assert out["beliefs"] == [
        {"statement": "I believe family comes first.", "holder": "user", "kind": "explicit"},
        {"statement": "People should always keep their promises.", "holder": "user",
         "kind": "implied"},
    ]  # the assistant's "you should" is advice, not a belief
    assert out["values"] == ["family"]
    assert out["stances"] == ["against working weekends"]
    assert out["confidence"] is None and BELIEF.score(out) is None
