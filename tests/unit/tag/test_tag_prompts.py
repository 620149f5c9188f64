"""Tagger prompts: exact rendering for a fixed conversation, versions, the combined prompt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.core.paths import PROMPTS_DIR
from tasks.tag import taggers as taggers_module
from tasks.tag.backends import get_tagger
from tasks.tag.taggers import (
    MAX_MESSAGE_CHARS,
    TAGGER_NAMES,
    ConversationInput,
    Tagger,
    TaggerOutputInvalid,
    UnknownTagger,
    combined_messages,
    split_combined_output,
)

CONVERSATION = ConversationInput(
    id="conv-1",
    messages=[
        {"role": "user", "content": "I am nervous about my exam tomorrow."},
        {"role": "assistant",
         "content": "That sounds stressful. Studies show 90% of students feel the same."},
    ],
    system_prompt="You are a kind study coach.",
)
TRANSCRIPT = (
    "Conversation:\n"
    "user: I am nervous about my exam tomorrow.\n"
    "assistant: That sounds stressful. Studies show 90% of students feel the same."
)


def test_emotion_prompt_renders_exactly():
    assert get_tagger("emotion", "llm", "m").format_input(CONVERSATION) == [
        {"role": "system", "content": (
            "You are the emotion tagger. You read a conversation between a user and an assistant "
            "and name the emotional tones it carries, on both sides.\n"
            "Emotion: pick 1 to 3 tones from this list, most prominent first: supportive, "
            "playful, anxious, frustrated, sad, joyful, curious, grateful, confused, neutral.\n"
            '"confidence" is a number from 0 to 1: how sure you are that the first tone is '
            "right.\n"
            "Reply with only a JSON object, no prose, like:\n"
            '{"tones": ["anxious", "supportive"], "confidence": 0.8}')},
        {"role": "user", "content": TRANSCRIPT},
    ]


def test_topic_prompt_renders_exactly():
    system, user = get_tagger("topic", "llm", "m").format_input(CONVERSATION)
    assert system["content"] == (
        "You are the topic tagger. You read a conversation between a user and an assistant and "
        "say what it is about.\n"
        "Topic: give 1 to 3 high-level topics, main topic first. Use these topic ids when one "
        "fits: work_career, study_learning, relationships, health_wellbeing, money_planning, "
        "stress_emotions, productivity_habits, off_topic; otherwise a short lowercase phrase.\n"
        "Give 0 to 5 subtopics: short lowercase phrases for the specific issues discussed.\n"
        '"confidence" is a number from 0 to 1: how sure you are that the main topic is right.\n'
        "Reply with only a JSON object, no prose, like:\n"
        '{"topics": ["work_career"], "subtopics": ["asking for a raise"], "confidence": 0.8}')
    assert user == {"role": "user", "content": TRANSCRIPT}


def test_temporal_prompt_renders_exactly():
    system, user = get_tagger("temporal", "llm", "m").format_input(CONVERSATION)
    assert system["content"] == (
        "You are the temporal tagger. You read a conversation between a user and an assistant "
        "and decide which time it is mostly about.\n"
        "Temporal focus: exactly one of past (events that already happened), present (what is "
        "going on now), future (plans, decisions and worries ahead), timeless (general "
        "questions or facts not tied to a time).\n"
        '"confidence" is a number from 0 to 1: how sure you are.\n'
        "Reply with only a JSON object, no prose, like:\n"
        '{"focus": "future", "confidence": 0.7}')
    assert user["content"] == TRANSCRIPT


def test_belief_prompt_renders_exactly():
    system, user = get_tagger("belief", "llm", "m").format_input(CONVERSATION)
    assert system["content"] == (
        "You are the belief tagger. You read a conversation between a user and an assistant and "
        "list the beliefs, values and stances it expresses, stated outright or implied.\n"
        'Beliefs: list up to 5 beliefs. Each has "statement" (a short sentence), "holder" (user '
        'or assistant) and "kind" (explicit if said outright, implied if only suggested).\n'
        '"values": up to 5 single words or short phrases for what the speakers care about (for '
        "example honesty, family, security).\n"
        '"stances": up to 5 short phrases for positions taken (for example "against working '
        'overtime").\n'
        '"confidence" is a number from 0 to 1, or null if nothing was found.\n'
        "Reply with only a JSON object, no prose, like:\n"
        '{"beliefs": [{"statement": "Hard work is always rewarded", "holder": "user", "kind": '
        '"explicit"}], "values": ["fairness"], "stances": ["for asking for a raise"], '
        '"confidence": 0.7}')
    assert user["content"] == TRANSCRIPT


def test_hallucination_prompt_shows_the_assistants_instructions():
    system, user = get_tagger("hallucination", "llm", "m").format_input(CONVERSATION)
    assert system["content"] == (
        "You are the hallucination tagger. You read a conversation between a user and an "
        "assistant and check the assistant's turns for claims that nothing in the conversation "
        "or common knowledge supports: invented statistics, studies, quotes, names, dates, "
        "prices or facts about the user.\n"
        "Hallucination: list each unsupported claim made by the assistant with a short reason. "
        '"hallucination_score" is a number from 0 to 1: 0 when every claim is supported or '
        "general knowledge, 1 when the replies rest on invented facts.\n"
        "Reply with only a JSON object, no prose, like:\n"
        '{"hallucination_score": 0.6, "claims": [{"claim": "A 2019 study of 48,000 people '
        'proved it", "reason": "no such study is given and the numbers are very specific"}]}')
    assert user["content"] == (
        "Instructions the assistant was given:\nYou are a kind study coach.\n\n" + TRANSCRIPT)


def test_long_messages_are_clipped_in_prompts():
    long = ConversationInput("c", [{"role": "user", "content": "word " * 2000}])
    user = get_tagger("emotion", "llm", "m").format_input(long)[1]["content"]
    assert user.endswith(" [...]")
    assert len(user) == len("Conversation:\nuser: ") + MAX_MESSAGE_CHARS


def test_every_tagger_satisfies_the_contract():
    for name in TAGGER_NAMES:
        tagger = get_tagger(name, "llm", "m")
        assert isinstance(tagger, Tagger)
        assert tagger.template_path == PROMPTS_DIR / "taggers" / f"{name}.jinja2"
        assert tagger.template_path.exists()


def test_version_depends_on_model_and_backend_but_definition_does_not_depend_on_model():
    a, b = get_tagger("emotion", "llm", "model-a"), get_tagger("emotion", "llm", "model-b")
    assert a.version != b.version
    assert a.definition_hash == b.definition_hash
    assert get_tagger("emotion", "embedding").version != a.version
    assert a.version == get_tagger("emotion", "llm", "model-a").version


def test_version_changes_when_the_template_changes(tmp_path: Path, monkeypatch):
    before = get_tagger("topic", "llm", "m")
    before_version, before_definition = before.version, before.definition_hash
    shutil.copytree(PROMPTS_DIR, tmp_path / "prompts")
    path = tmp_path / "prompts" / "taggers" / "topic.jinja2"
    path.write_text(path.read_text().replace("high-level topics", "broad topics"))
    monkeypatch.setattr(taggers_module, "PROMPTS_ROOT", tmp_path / "prompts")
    after = get_tagger("topic", "llm", "m")
    assert after.version != before_version
    assert after.definition_hash != before_definition
    assert "broad topics" in after.format_input(CONVERSATION)[0]["content"]
    assert get_tagger("emotion", "llm", "m").version == get_tagger("emotion", "llm", "m").version


def test_unknown_tagger_and_backend_say_what_exists():
    with pytest.raises(UnknownTagger, match="use some of emotion, topic, temporal"):
        get_tagger("sentiment")
    with pytest.raises(UnknownTagger, match="has no 'embedding' backend; use one of llm, "
                                            "heuristic"):
        get_tagger("belief", "embedding")


def test_combined_prompt_sends_the_conversation_once():
    all_taggers = [get_tagger(n, "llm", "m") for n in TAGGER_NAMES]
    system, user = combined_messages(all_taggers, CONVERSATION)
    for name in TAGGER_NAMES:
        assert f"## {name}\n" in system["content"]
    assert user["content"].count("I am nervous about my exam tomorrow.") == 1
    assert user["content"].startswith("Instructions the assistant was given:")


def test_combined_reply_is_split_and_validated_per_tagger():
    pair = [get_tagger("temporal", "llm", "m"), get_tagger("emotion", "llm", "m")]
    out = split_combined_output(pair, '{"temporal": {"focus": "Future", "confidence": 0.6}, '
                                      '"emotion": {"tones": "anxious", "confidence": 0.7}}')
    assert out["temporal"]["focus"] == "future"
    assert out["emotion"]["tones"] == ["anxious"]
    with pytest.raises(TaggerOutputInvalid, match="no 'emotion' key"):
        split_combined_output(pair, '{"temporal": {"focus": "past", "confidence": 0.6}}')
