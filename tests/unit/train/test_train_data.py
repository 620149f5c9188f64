"""Training data: assistant-only labels, first-fit-decreasing packing, packed batch layout."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from tasks.train.config import TrainingConfigError
from tasks.train.data import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    EncodedRow,
    collate_packed,
    collate_padded,
    encode_conversation,
    end_of_turn_marker,
    load_conversations,
    pack_rows,
    packing_efficiency,
    split_rows,
)

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy? Answer briefly, please."},
    {"role": "assistant", "content": "Rome — and it's été-proof."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tasks.core.weights import tinycoder_path

    return AutoTokenizer.from_pretrained(str(tinycoder_path()))


def _trained_spans(tokenizer, row: EncodedRow) -> list[str]:
    groups = itertools.groupby(row.labels, key=lambda label: label != IGNORE_INDEX)
    return [tokenizer.decode(list(g)) for trained, g in groups if trained]


def test_labels_cover_exactly_the_assistant_contents_and_end_tokens(tokenizer):
    row = encode_conversation(tokenizer, CONVERSATION, chat_template=CHATML_TEMPLATE)
    assert _trained_spans(tokenizer, row) == [
        "Paris is the capital of France.<|im_end|>",
        "Rome — and it's été-proof.<|im_end|>",
    ]


def test_masked_positions_hold_system_user_and_role_headers(tokenizer):
    row = encode_conversation(tokenizer, CONVERSATION, chat_template=CHATML_TEMPLATE)
    masked = tokenizer.decode([t for t, label in zip(row.input_ids, row.labels, strict=True)
                               if label == IGNORE_INDEX])
    assert "You are a careful assistant." in masked
    assert "What is the capital of France?" in masked
    assert masked.count("<|im_start|>assistant") == 2
    assert "Paris" not in masked and "Rome" not in masked


def test_input_ids_are_the_tokenised_rendered_conversation(tokenizer):
    row = encode_conversation(tokenizer, CONVERSATION, chat_template=CHATML_TEMPLATE)
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHATML_TEMPLATE,
                                         tokenize=False)
    assert row.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [label for label in row.labels if label != IGNORE_INDEX] == [
        t for t, label in zip(row.input_ids, row.labels, strict=True) if label != IGNORE_INDEX]


def test_train_on_eos_last_trains_only_the_final_end_token(tokenizer):
    row = encode_conversation(tokenizer, CONVERSATION, chat_template=CHATML_TEMPLATE,
                              train_on_eos="last")
    first, last = _trained_spans(tokenizer, row)
    # A token straddling the content/marker boundary (".<" is one Llama token) stays trained.
    assert first.startswith("Paris is the capital of France.") and "im_end" not in first
    assert last == "Rome — and it's été-proof.<|im_end|>"


def test_roles_to_train_user_trains_user_turns(tokenizer):
    row = encode_conversation(tokenizer, CONVERSATION, chat_template=CHATML_TEMPLATE,
                              roles_to_train=("user",))
    assert _trained_spans(tokenizer, row) == [
        "What is the capital of France?<|im_end|>",
        "And of Italy? Answer briefly, please.<|im_end|>",
    ]


def test_train_on_inputs_trains_every_token(tokenizer):
    row = encode_conversation(tokenizer, CONVERSATION, chat_template=CHATML_TEMPLATE,
                              train_on_inputs=True)
    assert row.labels == row.input_ids


def test_end_of_turn_marker_is_read_from_the_template(tokenizer):
    assert end_of_turn_marker(tokenizer, CHATML_TEMPLATE) == "<|im_end|>"
    llama_like = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>\n"
                  "{% endfor %}")
    assert end_of_turn_marker(tokenizer, llama_like) == "</s>"


def test_targets_are_shifted_within_the_row():
    row = EncodedRow(input_ids=[5, 6, 7, 8], labels=[IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    assert row.targets() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX]


def test_first_fit_decreasing_places_every_row_once_within_capacity():
    rng = random.Random(3)
    lengths = [int(rng.lognormvariate(4.0, 0.7)) % 500 + 5 for _ in range(300)]
    bins = pack_rows(lengths, 512)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 512) + 2  # FFD is near the lower bound here
    assert packing_efficiency(lengths, bins, 512) > 0.95


def test_pack_rows_rejects_a_row_longer_than_capacity():
    with pytest.raises(TrainingConfigError, match="set sequence_len: 600"):
        pack_rows([100, 600], 512)


def test_collate_packed_restarts_positions_and_builds_block_diagonal_mask():
    rows = [EncodedRow([1, 2, 3], [IGNORE_INDEX, 2, 3]), EncodedRow([4, 5], [IGNORE_INDEX, 5])]
    batch = collate_packed(rows, [[0, 1]], pad_token_id=0, width=7)
    assert batch.input_ids == [[1, 2, 3, 4, 5, 0, 0]]
    assert batch.position_ids == [[0, 1, 2, 0, 1, 0, 1]]
    # Row 0's last position must not learn to predict row 1's first token.
    assert batch.targets == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert (batch.real_tokens, batch.slots) == (5, 7)
    mask = batch.to_tensors()["attention_mask"][0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]


def test_additive_mask_for_eager_attention():
    import torch

    batch = collate_packed([EncodedRow([1, 2], [1, 2])], [[0]], pad_token_id=0, width=2)
    mask = batch.to_tensors(mask_dtype=torch.float32)["attention_mask"][0, 0]
    assert mask[1, 0] == 0 and mask[0, 1] == torch.finfo(torch.float32).min


def test_collate_padded_pads_each_row_to_the_longest():
    rows = [EncodedRow([1, 2, 3], [1, 2, 3]), EncodedRow([4], [4])]
    batch = collate_padded(rows, pad_token_id=9)
    assert batch.input_ids == [[1, 2, 3], [4, 9, 9]]
    assert batch.real_tokens == 4 and batch.slots == 6


def test_split_is_seeded_and_holds_out_the_fraction():
    rows = list(range(40))
    train, val = split_rows(rows, 0.1, seed=7)
    assert len(val) == 4 and sorted(train + val) == rows
    assert split_rows(rows, 0.1, seed=7) == (train, val)
    assert split_rows(rows, 0.1, seed=8)[1] != val
    assert split_rows(rows, 0.0, seed=7)[1] == []


def test_load_conversations_names_the_bad_line(tmp_path):
    path = tmp_path / "snap.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(TrainingConfigError, match=r"snap.jsonl:3 has no assistant turn"):
        load_conversations(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_conversations(path) == [good["messages"]]
