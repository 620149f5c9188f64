"""Embedding backend (real MiniLM): right labels on clear examples, calibrated confidence, and
an LLM-free tagging run (embedding + heuristic backends) through Postgres."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch
from tasks.tag.backends import get_tagger
from tasks.tag.config import TaggingConfig
from tasks.tag.embedding import fit_temperature, label_space
from tasks.tag.stage import latest_tags, run_tagging
from tasks.tag.taggers import ConversationInput, load_labels

pytestmark = pytest.mark.slow


def _conv(text: str) -> ConversationInput:
    return ConversationInput(id=text[:20], messages=[{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def taggers():
    return {name: get_tagger(name, "embedding") for name in ("emotion", "topic", "temporal")}


CLEAR = {
    "emotion": [
        ("I'm absolutely thrilled, we just got engaged and I can't stop smiling!", "joyful"),
        ("Thank you so much for your patience, this helped enormously.", "grateful"),
        ("I'm so scared about the surgery next week, I keep panicking.", "anxious"),
        ("My grandfather passed away last month and I feel so empty and alone.", "sad"),
    ],
    "topic": [
        ("How do I stop overspending and pay off my credit card debt?", "money_planning"),
        ("My boss refused my request for a raise again even though I took on extra projects.",
         "work_career"),
        ("I can't fall asleep before 2am and I feel exhausted all day.", "health_wellbeing"),
        ("My partner and I keep arguing about whose parents we visit for the holidays.",
         "relationships"),
    ],
    "temporal": [
        ("Next year I plan to move abroad and start a new job.", "future"),
        ("When I was a kid my grandmother used to bake bread every Sunday.", "past"),
        ("Right now I'm sitting at my desk and I can't concentrate at all today.", "present"),
    ],
}
FIELD = {"emotion": "tones", "topic": "topics", "temporal": "focus"}


@pytest.mark.parametrize("name", list(CLEAR))
def test_embedding_backend_picks_the_right_label_on_clear_examples(taggers, name):
    outputs = taggers[name].tag_many([_conv(text) for text, _ in CLEAR[name]])
    for (text, expected), output in zip(CLEAR[name], outputs, strict=True):
        value = output[FIELD[name]]
        top = value[0] if isinstance(value, list) else value
        assert top == expected, f"{text!r} → {output['scores']}"
        assert output["confidence"] == max(output["scores"].values())
        assert output["method"] == "embedding:all-MiniLM-L6-v2"


def test_confidence_is_temperature_calibrated_on_the_shipped_calibration_set(taggers):
    space = label_space("emotion")
    report = space.calibration
    assert report["examples"] == len(load_labels()["emotion"]["calibration"])
    assert 0 < space.temperature < 1
    assert report["nll"] < report["nll_at_t1"]  # the fit beats the uncalibrated softmax
    assert report["ece"] < report["ece_at_t1"]
    out = taggers["emotion"].tag_many([_conv("I'm terrified I'll fail tomorrow.")])[0]
    assert out["calibration"]["temperature"] == report["temperature"]
    assert sum(out["scores"].values()) == pytest.approx(1.0, abs=1e-3)


def test_a_worried_user_and_a_reassuring_assistant_give_two_tones(taggers):
    conversation = ConversationInput("c", [
        {"role": "user", "content": "I'm so nervous and scared about the results, I can't "
                                    "stop worrying that something bad will happen."},
        {"role": "assistant", "content": "That sounds really hard, and it makes complete sense "
                                         "to feel this way. I'm here for you."},
    ])
    out = taggers["emotion"].tag_many([conversation])[0]
    assert set(out["tones"][:2]) == {"anxious", "supportive"}
    assert out["confidence"] < 0.9  # a mixture of two messages is not certain of either


def test_topic_backend_adds_a_subtopic_of_the_chosen_topic(taggers):
    out = taggers["topic"].tag_many([_conv("I want to save money for a holiday in Spain next "
                                           "summer but I always spend it.")])[0]
    assert out["topics"][0] == "money_planning"
    assert out["subtopics"][0] in load_labels()["topic"]["subtopics"]["money_planning"]


def test_fit_temperature_recovers_a_sharper_softmax_for_separable_data():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=60)
    similarities = rng.normal(0.2, 0.01, size=(60, 3))
    similarities[np.arange(60), targets] += 0.05
    temperature, report = fit_temperature(similarities, targets)
    assert temperature < 0.1 and report["accuracy"] == 1.0
    assert report["nll"] < report["nll_at_t1"]


def test_offline_run_with_embedding_and_heuristic_backends_needs_no_llm(engine, tmp_path):
    batch = f"embtest-{uuid.uuid4().hex[:10]}"
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch, "seed": 0, "requested": 1}])
        upsert(s, Conversation, [{"id": f"{batch}-c0", "batch_id": batch, "item_index": 0,
                                  "messages": [
            {"role": "user", "content": "I think honesty matters most. I'm worried my "
                                        "manager will say no when I ask for a raise next week."},
            {"role": "assistant", "content": "A 2021 survey found 70% of raise requests "
                                             "succeed, so go for it."}]}])
    cfg = TaggingConfig(batch_ids=[batch], judges=[], tagger_base_url="http://127.0.0.1:9/v1",
                        backends={"emotion": "embedding", "topic": "embedding",
                                  "temporal": "embedding", "belief": "heuristic",
                                  "hallucination": "heuristic"})
    report = run_tagging(cfg, out_dir=tmp_path)
    assert report["run"]["tagged"] == dict.fromkeys(cfg.taggers, 1)
    with session_scope(engine) as s:
        tags = latest_tags(s, [f"{batch}-c0"])[f"{batch}-c0"]
    assert tags["topic"]["topics"][0] == "work_career"
    assert tags["temporal"]["focus"] == "future"
    assert tags["hallucination"]["method"] == "heuristic:unsupported-specifics"
    assert "70%" in tags["hallucination"]["claims"][0]["reason"]
    assert tags["belief"]["method"] == "heuristic:stance-markers"
    assert tags["belief"]["values"][0] == "honesty"
    assert report["stats"]["taggers"]["emotion"]["backend"] == "embedding"
