"""Export formats (OpenAI chat, ShareGPT/chat_template, Alpaca), snapshot hashing and the
atomic, never-overwriting snapshot writer."""

from __future__ import annotations

import hashlib
import json

import pytest

from tasks.datasets.export import (
    ExportRow,
    SnapshotWriter,
    chat_messages,
    snapshot_hash,
    to_alpaca,
    to_openai,
    to_sharegpt,
    write_formats,
)

CHAT = chat_messages("Be kind.", [
    {"role": "user", "content": "Hi", "name": "ignored-extra-key"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Plan my week?"},
    {"role": "assistant", "content": "Start with Monday."},
])


def test_openai_chat_is_messages_with_role_and_content_only():
    assert to_openai(CHAT) == {"messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Plan my week?"},
        {"role": "assistant", "content": "Start with Monday."}]}


def test_sharegpt_uses_the_roles_axolotl_chat_template_maps():
    assert to_sharegpt(CHAT) == {"conversations": [
        {"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Plan my week?"},
        {"from": "gpt", "value": "Start with Monday."}]}


def test_alpaca_puts_history_in_input_and_the_last_exchange_in_instruction_output():
    assert to_alpaca(CHAT) == {
        "instruction": "Plan my week?",
        "input": "system: Be kind.\n\nuser: Hi\n\nassistant: Hello!",
        "output": "Start with Monday."}
    single = chat_messages("", [{"role": "user", "content": "Q"},
                                {"role": "assistant", "content": "A"}])
    assert to_alpaca(single) == {"instruction": "Q", "input": "", "output": "A"}


def _rows() -> list[ExportRow]:
    return [ExportRow(item_id=f"i{i}", split="validation" if i == 0 else "train", messages=CHAT,
                      metadata={"conversation_id": f"i{i}", "tags": {"emotion": "calm"}})
            for i in range(3)]


def test_training_files_carry_only_training_fields_provenance_adds_metadata(tmp_path):
    files = write_formats(tmp_path, _rows(), ["openai", "alpaca"])
    assert sorted(files) == [
        "alpaca/train.jsonl", "alpaca/train.provenance.jsonl", "alpaca/validation.jsonl",
        "alpaca/validation.provenance.jsonl", "openai/train.jsonl",
        "openai/train.provenance.jsonl", "openai/validation.jsonl",
        "openai/validation.provenance.jsonl"]
    train = [json.loads(x) for x in (tmp_path / "openai/train.jsonl").read_text().splitlines()]
    prov = [json.loads(x) for x in
            (tmp_path / "openai/train.provenance.jsonl").read_text().splitlines()]
    assert len(train) == 2 and set(train[0]) == {"messages"}
    assert prov[0] == {**train[0], "metadata": {"conversation_id": "i1",
                                                "tags": {"emotion": "calm"}}}
    assert all(h == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() for rel, h in files.items())


def test_snapshot_hash_depends_on_rows_splits_and_filters_not_order():
    rows = _rows()
    h = snapshot_hash("curated", rows, {"max_hallucination": 0.1})
    assert h == snapshot_hash("curated", list(reversed(rows)), {"max_hallucination": 0.1})
    assert h != snapshot_hash("curated", rows, {"max_hallucination": 0.2})
    assert h != snapshot_hash("curated", rows[:2], {"max_hallucination": 0.1})
    moved = _rows()
    moved[1].split = "validation"
    assert h != snapshot_hash("curated", moved, {"max_hallucination": 0.1})


def test_snapshot_appears_whole_and_is_never_overwritten(tmp_path):
    with SnapshotWriter("abc", root=tmp_path) as writer:
        (writer.tmp / "data.jsonl").write_text("first\n")
        assert not (tmp_path / "abc").exists()  # nothing visible before commit
        assert writer.commit() is True
    with SnapshotWriter("abc", root=tmp_path) as writer:
        (writer.tmp / "data.jsonl").write_text("second\n")
        assert writer.commit() is False
    assert (tmp_path / "abc" / "data.jsonl").read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]  # temporaries cleaned up


def test_a_crash_while_writing_leaves_no_snapshot_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError), SnapshotWriter("crashy", root=tmp_path) as writer:
        (writer.tmp / "part.jsonl").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
