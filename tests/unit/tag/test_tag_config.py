"""TaggingConfig: defaults that work offline, backend resolution, errors that say the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.core.settings import get_settings
from tasks.tag.config import TaggingConfig
from tasks.tag.stage import current_tagger_versions


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    for var in ("TUNELOOP_TAGGER_MODEL", "TUNELOOP_LLM_MODEL", "TUNELOOP_TAGGER_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_tag_with_all_five_taggers_and_both_judges():
    cfg = TaggingConfig()
    assert cfg.taggers == ["emotion", "topic", "temporal", "belief", "hallucination"]
    assert cfg.judges == ["judge", "judge2"] and cfg.policy == "both"
    assert cfg.retries == 3 and cfg.shard_size == 100 and cfg.max_in_flight == 64


def test_auto_backend_uses_embeddings_for_classification_with_the_bundled_small_model():
    cfg = TaggingConfig()
    assert {t.name: t.backend for t in cfg.build_taggers()} == {
        "emotion": "embedding", "topic": "embedding", "temporal": "embedding",
        "belief": "llm", "hallucination": "llm"}


def test_auto_backend_uses_the_llm_when_a_real_model_is_configured(monkeypatch):
    monkeypatch.setenv("TUNELOOP_TAGGER_MODEL", "gpt-4o-mini")
    get_settings.cache_clear()
    cfg = TaggingConfig()
    assert {t.backend for t in cfg.build_taggers()} == {"llm"}
    assert {t.model for t in cfg.build_taggers()} == {"gpt-4o-mini"}
    assert TaggingConfig(tagger_model="other").build_taggers()[3].model == "other"


def test_current_versions_follow_the_model():
    assert current_tagger_versions(TaggingConfig(tagger_model="a"))["belief"] != \
        current_tagger_versions(TaggingConfig(tagger_model="b"))["belief"]


def test_judge_endpoint_overrides_apply_per_slot():
    cfg = TaggingConfig(judge_base_urls={"judge2": "http://127.0.0.1:9/v1"},
                        judge_models={"judge2": "big-judge"})
    assert cfg.endpoint("judge2").label() == "http://127.0.0.1:9/v1#big-judge"
    assert cfg.endpoint("judge").base_url == get_settings().endpoint("judge").base_url
    # No per-endpoint limit is set, so max_in_flight alone bounds concurrency.
    assert "max_concurrency" not in cfg.endpoint("tagger").model_fields_set


@pytest.mark.parametrize(("values", "message"), [
    ({"taggers": ["sentiment"]}, r"unknown taggers \['sentiment'\]; use some of emotion"),
    ({"backends": {"belief": "embedding"}}, "set backends.belief to one of auto, llm, heuristic"),
    ({"backends": {"mood": "llm"}}, "backends names unknown tagger 'mood'"),
    ({"retries": 0}, "retries must be >= 1"),
    ({"shard_size": 0}, "shard_size: 100"),
    ({"tagger_base_url": "localhost:8300"}, r"not an http\(s\) URL; e.g. http://"),
    ({"judge_base_urls": {"judge": "ftp://x"}}, r"judge_base_urls\[judge\]"),
    ({"policy": "majority"}, "'both' or 'either'"),
    ({"judges": ["judge3"]}, "'judge' or 'judge2'"),
    ({"retires": 3}, "Extra inputs are not permitted"),
])
def test_invalid_values_fail_with_a_message_that_says_the_fix(values, message):
    with pytest.raises(ValidationError, match=message):
        TaggingConfig(**values)


def test_a_single_batch_id_string_is_accepted():
    assert TaggingConfig(batch_ids="b1").batch_ids == ["b1"]


def test_dag_params_map_onto_the_config():
    cfg = TaggingConfig.from_params({
        "taggers": ["emotion", "belief"], "classifier_backend": "llm", "retries": 20,
        "judges": ["judge"], "judge_policy": "either", "batch_id": "b7", "shard_size": 50,
        "judge_endpoints": {"judge": "http://127.0.0.1:9/v1#big-judge"}})
    assert cfg.backends == {"emotion": "llm", "topic": "llm", "temporal": "llm"}
    assert (cfg.retries, cfg.policy, cfg.batch_ids, cfg.shard_size) == (20, "either", ["b7"], 50)
    assert cfg.endpoint("judge").label() == "http://127.0.0.1:9/v1#big-judge"
    assert TaggingConfig.from_params({"batch_id": ""}).batch_ids is None
    assert TaggingConfig.from_params(None) == TaggingConfig()
    with pytest.raises(ValueError, match=r"unknown tagging params \['retry'\]"):
        TaggingConfig.from_params({"retry": 3})
