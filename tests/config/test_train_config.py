"""Training config: defaults from include/training/lora.yaml, each bad combination raises with its
fix, the Axolotl YAML round-trips, and sequence_len is checked against the longest real row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.train.config import (
    DEFAULT_CONFIG_PATH,
    AxolotlConfig,
    TrainingConfigError,
    load_training_config,
    suggest_sequence_len,
)
from tasks.train.data import check_sequence_len

DATASET = {"path": "/data/exports/ds1.jsonl"}


def _load(**overrides):
    return load_training_config({"datasets": [DATASET], **overrides})


def test_defaults_come_from_lora_yaml():
    cfg = _load()
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert cfg.lora_r == raw["lora_r"] == 16
    assert cfg.sample_packing is True and cfg.flash_attention is True
    assert cfg.lr_scheduler == raw["lr_scheduler"]
    assert cfg.datasets[0].type == "chat_template"
    assert cfg.datasets[0].roles_to_train == ["assistant"]
    assert cfg.train_on_inputs is False


def test_overrides_replace_lists_and_keep_other_defaults():
    cfg = _load(lora_target_modules=["q_proj"], learning_rate=1e-3)
    assert cfg.lora_target_modules == ["q_proj"]
    assert cfg.learning_rate == 1e-3
    assert cfg.lora_alpha == 32


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ({"adapter": "qlora", "load_in_4bit": False}, "adapter: qlora requires load_in_4bit: true"),
        ({"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": True}, "set load_in_8bit: false"),
        ({"adapter": "lora", "load_in_4bit": True}, "set adapter: qlora"),
        ({"lora_r": 0}, "set lora_r: 16"),
        ({"lora_r": -4}, "lora_r must be > 0"),
        ({"lora_alpha": 0}, "set lora_alpha: 32"),
        ({"lora_dropout": 1.0}, "set lora_dropout: 0.05"),
        ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1)"),
        ({"bf16": True, "fp16": True}, "set fp16: false"),
        ({"sample_packing": True, "flash_attention": False, "sdp_attention": False},
         "set flash_attention: true"),
        ({"flash_attention": True, "sdp_attention": True}, "set sdp_attention: false"),
        ({"lr_scheduler": "cosin"}, "set lr_scheduler: cosine"),
        ({"optimizer": "adamw_torch_fuse"}, "set optimizer: adamw_torch_fused"),
        ({"datasets": []}, "datasets is empty"),
        ({"datasets": [{"path": "x.jsonl", "type": "alpaca"}]}, "set type: chat_template"),
        ({"datasets": [{"path": "x.jsonl", "roles_to_train": ["robot"]}]},
         "set roles_to_train: [assistant]"),
        ({"val_set_size": 0, "eval_steps": 10}, "set val_set_size: 0.05"),
        ({"val_set_size": 1.5}, "set val_set_size: 0.05"),
        ({"micro_batch_size": 0}, "set micro_batch_size: 1"),
        ({"gradient_accumulation_steps": 0}, "set gradient_accumulation_steps: 1"),
        ({"max_steps": 0}, "set max_steps: 100"),
        ({"learning_rate": 0}, "set learning_rate: 2e-4"),
        ({"sequence_len": 8}, "set sequence_len: 1024"),
        ({"lora_target_modules": []}, "lora_target_linear: true"),
        ({"chat_template": "jinja"}, "requires chat_template_jinja"),
        ({"chat_template": "chatmlx"}, "tokenizer_default_fallback_chatml"),
        ({"hf_mlflow_log_artifacts": True}, "mlflow_tracking_uri: http://mlflow:5000"),
    ],
)
def test_bad_combination_raises_with_its_fix(overrides, fix):
    with pytest.raises(TrainingConfigError) as excinfo:
        _load(**overrides)
    assert fix in str(excinfo.value)


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(TrainingConfigError, match=r"unknown key 'lora_rank'.*did you mean lora_r"):
        _load(lora_rank=8)


def test_qlora_with_4bit_is_accepted():
    cfg = _load(adapter="qlora", load_in_4bit=True)
    assert cfg.adapter == "qlora" and cfg.load_in_4bit


def test_every_error_is_listed_at_once():
    with pytest.raises(TrainingConfigError) as excinfo:
        _load(lora_r=0, lora_alpha=0)
    message = str(excinfo.value)
    assert "lora_r:" in message and "lora_alpha:" in message


def test_axolotl_yaml_round_trips():
    cfg = _load(mlflow_tracking_uri="http://mlflow:5000", max_steps=30, lora_dropout=0.1)
    text = cfg.to_axolotl_yaml()
    again = AxolotlConfig.from_yaml(text)
    assert again == cfg
    assert again.to_axolotl_yaml() == text


def test_axolotl_yaml_uses_axolotl_keys_and_omits_unset():
    cfg = _load(mlflow_tracking_uri="http://mlflow:5000")
    data = yaml.safe_load(cfg.to_axolotl_yaml())
    assert data["adapter"] == "lora"
    assert data["datasets"] == [{
        "path": "/data/exports/ds1.jsonl", "type": "chat_template", "ds_type": "json",
        "field_messages": "messages",
        "message_property_mappings": {"role": "role", "content": "content"},
        "roles_to_train": ["assistant"], "train_on_eos": "turn",
    }]
    assert data["use_mlflow"] is True
    assert data["mlflow_experiment_name"] == "tuneloop-training"
    assert data["bf16"] == "auto" and data["train_on_inputs"] is False
    assert "max_steps" not in data and "chat_template_jinja" not in data
    assert all(value is not None for value in data.values())


def test_config_hash_is_stable_and_changes_with_content():
    assert _load().config_hash() == _load().config_hash()
    assert _load().config_hash() != _load(lora_r=8).config_hash()


def test_with_overrides_validates():
    cfg = _load()
    with pytest.raises(TrainingConfigError, match="set lora_r: 16"):
        cfg.with_overrides(lora_r=0)
    assert cfg.with_overrides(lora_r=4).lora_r == 4


def test_suggested_sequence_len_is_next_multiple_of_64():
    assert suggest_sequence_len(1) == 64
    assert suggest_sequence_len(64) == 64
    assert suggest_sequence_len(65) == 128


@pytest.fixture(scope="module")
def tinycoder_tokenizer():
    from transformers import AutoTokenizer

    from tasks.core.weights import tinycoder_path

    return AutoTokenizer.from_pretrained(str(tinycoder_path()))


def _write_rows(path: Path, contents: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": "question"},
                          {"role": "assistant", "content": text}]} for text in contents]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sequence_len_below_longest_row_raises_with_token_count(tmp_path, tinycoder_tokenizer):
    dataset = _write_rows(tmp_path / "snap.jsonl", ["short", "word " * 60, "tiny"])
    cfg = _load(datasets=[{"path": str(dataset)}], sequence_len=32)
    expected = len(tinycoder_tokenizer(
        tinycoder_tokenizer.apply_chat_template(
            [{"role": "user", "content": "question"},
             {"role": "assistant", "content": "word " * 60}], tokenize=False),
        add_special_tokens=False)["input_ids"])
    with pytest.raises(TrainingConfigError) as excinfo:
        check_sequence_len(cfg, dataset, tinycoder_tokenizer)
    err = excinfo.value
    assert err.details["longest_tokens"] == expected
    assert err.details["row_index"] == 1
    assert f"({expected} tokens, row 1" in str(err)
    assert f"set sequence_len: {suggest_sequence_len(expected)}" in str(err)


def test_sequence_len_check_passes_and_reports_longest(tmp_path, tinycoder_tokenizer):
    dataset = _write_rows(tmp_path / "snap.jsonl", ["short", "a bit longer reply"])
    cfg = _load(datasets=[{"path": str(dataset)}], sequence_len=256)
    report = check_sequence_len(cfg, dataset, tinycoder_tokenizer)
    assert report["rows"] == 2
    assert 10 < report["longest_tokens"] <= 256
