"""GenerationConfig: wrong values fail with a message that says the fix; batch ids are stable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.core.settings import load_settings
from tasks.generate import GenerationConfig, coerce_config

SETTINGS = load_settings(llm_base_url="http://127.0.0.1:9/v1", llm_model="fake-model")


def _error(**kwargs) -> str:
    with pytest.raises(ValidationError) as info:
        GenerationConfig(**kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"count": 0}, "count: 100"),
        ({"turns": 0}, "turns: 1 for a single question/answer pair"),
        ({"turns": 21}, "turns must be within [1, 20]"),
        ({"shard_size": 0}, "shard_size: 100"),
        ({"concurrency": 0}, "concurrency: 16"),
        ({"temperature": 3.0}, "temperature: 0.8"),
        ({"top_p": 0.0}, "top_p: 0.95"),
        ({"max_tokens": 4}, "max_tokens: 384"),
        ({"edge_case_share": 1.5}, "edge_case_share: 0.15"),
        ({"document_share": -0.1}, "document_share: 0.1"),
        ({"opening_threshold": 1.2}, "set dedup: false to turn dedup off"),
        ({"conversation_threshold": 0}, "conversation_threshold: 0.9"),
        ({"generator_base_url": "localhost:8300"}, "http://127.0.0.1:8300/v1"),
        ({"timeout_s": -1}, "timeout_s: 120"),
        ({"persona_set": "nurses"}, "use one of default, students, workplace"),
        ({"taxonomy_path": "/nonexistent/taxonomy.yaml"}, "point taxonomy_path at a YAML file"),
    ],
)
def test_invalid_values_say_the_fix(kwargs, fix):
    assert fix in _error(**kwargs)


def test_unknown_options_are_rejected_with_the_valid_ones_listed():
    message = _error(turn=3)
    assert "unknown generation option(s) ['turn']" in message
    assert "turns" in message and "persona_set" in message


def test_defaults_are_valid_and_roundtrip_through_a_dict():
    cfg = GenerationConfig()
    assert coerce_config(cfg.model_dump(mode="json")) == cfg
    assert cfg.turns == 2 and cfg.dedup is True


def test_empty_strings_from_dag_params_mean_unset():
    cfg = GenerationConfig(generator_base_url="", generator_model="")
    assert cfg.generator_base_url is None and cfg.generator_model is None


def test_batch_id_is_deterministic_and_depends_on_content_defining_fields():
    base = GenerationConfig(count=10, seed=1)
    assert base.batch_id(SETTINGS) == GenerationConfig(count=10, seed=1).batch_id(SETTINGS)
    for change in ({"seed": 2}, {"count": 11}, {"turns": 3}, {"persona_set": "students"},
                   {"temperature": 0.5}, {"generator_model": "other-model"}):
        changed = GenerationConfig(**{"count": 10, "seed": 1, **change})
        assert changed.batch_id(SETTINGS) != base.batch_id(SETTINGS), change


def test_batch_id_ignores_how_the_work_is_run():
    base = GenerationConfig(count=10, seed=1)
    for change in ({"shard_size": 3}, {"concurrency": 64}, {"preview": 2}, {"dedup": False},
                   {"opening_threshold": 0.8}, {"generator_base_url": "http://10.0.0.1:8000/v1"}):
        assert GenerationConfig(count=10, seed=1, **change).batch_id(SETTINGS) == base.batch_id(
            SETTINGS), change


def test_endpoint_overrides_apply_per_role_on_top_of_settings():
    cfg = GenerationConfig(user_sim_base_url="http://10.0.0.2:1/v1", user_sim_model="sim",
                           concurrency=64, timeout_s=5)
    user, generator = cfg.endpoint("user_sim", SETTINGS), cfg.endpoint("generator", SETTINGS)
    assert (user.base_url, user.model) == ("http://10.0.0.2:1/v1", "sim")
    assert (generator.base_url, generator.model) == ("http://127.0.0.1:9/v1", "fake-model")
    assert user.max_concurrency == 64 and user.timeout_s == 5
