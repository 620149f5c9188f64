"""The one base-model resolver (tasks.core.weights): short names, hub ids, folders, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core import weights


def test_a_hub_id_with_a_shipped_copy_resolves_to_the_short_name(monkeypatch, tmp_path):
    calls: list[str] = []
    monkeypatch.setitem(weights.BASE_MODELS, weights.SMOLLM2_NAME,
                        lambda: calls.append("smollm2") or tmp_path)
    assert weights.local_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == weights.SMOLLM2_NAME
    assert weights.resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == tmp_path
    assert weights.resolve_base_model(weights.SMOLLM2_NAME) == tmp_path
    assert calls == ["smollm2", "smollm2"]
    assert weights.LOCAL_TO_HUB_MODEL[weights.SMOLLM2_NAME] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_local_folder_with_config_json_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert weights.resolve_base_model(str(tmp_path)) == tmp_path


def test_an_unknown_name_says_what_is_accepted(tmp_path):
    with pytest.raises(ValueError) as err:
        weights.resolve_base_model("acme/unknown-7b")
    message = str(err.value)
    assert "acme/unknown-7b" in message and weights.SMOLLM2_NAME in message
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "config.json" in message
    with pytest.raises(ValueError, match="config.json"):
        weights.resolve_base_model(str(tmp_path))  # a folder without config.json


def test_shipped_gguf_for_known_names_hub_ids_and_plain_files(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(weights.SHIPPED_GGUFS, weights.SMOLLM2_NAME, lambda: gguf)
    assert weights.shipped_base_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") == gguf
    assert weights.shipped_base_gguf(str(gguf)) == gguf
    assert weights.shipped_base_gguf(str(tmp_path / "missing.gguf")) is None
    assert weights.shipped_base_gguf("acme/unknown-7b") is None
    monkeypatch.setitem(weights.SHIPPED_GGUFS, weights.SMOLLM2_NAME, lambda: Path("/nope.gguf"))
    assert weights.shipped_base_gguf(weights.SMOLLM2_NAME) is None
