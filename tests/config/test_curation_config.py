"""CurationConfig and SignalConfig: defaults from the seeds, and errors that say the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.curate.config import CurationConfig, CurationError
from tasks.signals.stage import SignalConfig, SignalConfigError


def test_defaults_follow_the_seeds():
    cfg = CurationConfig()
    assert cfg.max_hallucination == 0.1  # seed 000: --max-hallucination 0.1
    assert cfg.required_taggers == ["emotion", "topic", "temporal", "hallucination"]
    assert cfg.formats == ["openai", "sharegpt", "alpaca"]
    signals = SignalConfig()
    assert (signals.done_min_ms, signals.done_max_ms, signals.dismiss_max_ms) == (
        15000, 120000, 5000)  # seed 004: done 15 s–2 min, dismiss < 5 s
    assert (signals.min_positive, signals.min_negative) == (500, 500)


@pytest.mark.parametrize(("field", "value", "fix"), [
    ("max_hallucination", 1.5, "set max_hallucination: 0.1"),
    ("min_emotion_confidence", -0.1, "min_emotion_confidence: 0.5"),
    ("required_taggers", ["emotion", "sentiment"], "required_taggers: ['emotion'"),
    ("dedup_threshold", 0.0, "set dedup_threshold: 0.95"),
    ("edge_case_target", 2.0, "edge_case_target: 0.15"),
    ("edge_case_tolerance", 1.0, "edge_case_tolerance: 0.05"),
    ("val_fraction", 0.5, "set val_fraction: 0.1"),
    ("min_rows", 0, "min_rows: 10"),
    ("sequence_len", 8, "sequence_len: 2048"),
    ("formats", [], "formats: [openai, sharegpt, alpaca]"),
])
def test_each_bad_value_names_the_fix(field, value, fix):
    with pytest.raises(ValidationError) as info:
        CurationConfig(**{field: value})
    assert fix in str(info.value)


def test_inconsistent_word_bounds_say_how_to_fix():
    with pytest.raises(ValidationError, match="min_words .* > max_words .*; set e.g. min_words: 5"):
        CurationConfig(min_words=100, max_words=10)


def test_from_params_maps_blank_strings_to_unset_and_reports_all_errors():
    cfg = CurationConfig.from_params({"batch_id": "", "max_hallucination": 0.2, "seed": 3,
                                      "min_rows": 10, "require_rubric_pass": False,
                                      "min_emotion_confidence": 0.0})
    assert cfg.batch_id is None and cfg.max_hallucination == 0.2 and not cfg.require_rubric_pass
    with pytest.raises(CurationError) as info:
        CurationConfig.from_params({"max_hallucination": 3, "colour": "blue"})
    message = str(info.value)
    assert "max_hallucination" in message and "set max_hallucination: 0.1" in message
    assert "colour" in message


@pytest.mark.parametrize(("values", "fix"), [
    ({"done_min_ms": 130000}, "done_min_ms: 15000, done_max_ms: 120000"),
    ({"dismiss_max_ms": -1}, "dismiss_max_ms: 5000"),
    ({"pair_similarity": 1.5}, "set pair_similarity: 0.95"),
    ({"positive_reaction": "dismiss"}, "positive_reaction: done, negative_reaction: dismiss"),
])
def test_signal_config_errors_say_the_fix(values, fix):
    with pytest.raises(ValidationError) as info:
        SignalConfig(**values)
    assert fix in str(info.value)


def test_signal_config_from_dag_params():
    cfg = SignalConfig.from_params({"min_positive": 100, "min_negative": 50,
                                    "done_min_ms": 10000, "done_max_ms": 60000,
                                    "dismiss_max_ms": 3000})
    assert (cfg.min_positive, cfg.done_max_ms, cfg.dismiss_max_ms) == (100, 60000, 3000)
    with pytest.raises(SignalConfigError, match="min_positive"):
        SignalConfig.from_params({"min_positive": -5})
