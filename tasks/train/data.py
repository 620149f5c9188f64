"""Training data: chat rows → token ids with assistant-only labels → packed or padded batches.

Rows are the exported snapshot's JSONL lines, `{"messages": [{"role", "content"}, ...]}`.
`encode_conversation` renders a row with the chat template once and tokenises the whole text
with offsets, so the ids are exactly what the model sees at inference; labels are -100 everywhere
except the characters of trained turns (the assistant contents and the end-of-turn marker that
follows them). Role headers such as `<|im_start|>assistant\\n` and every system/user token stay
masked.

`pack_rows` bins rows into `sequence_len` slots with first-fit-decreasing. `collate_packed` builds
per-row position ids (restarting at 0) and a block-diagonal causal 4-D mask so a packed row sees
only itself; targets are shifted inside each row, so no row predicts its neighbour's first token.
`collate_padded` is the plain padded-batch baseline. Only the collators import torch.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.chat_template import CHATML_TEMPLATE
from tasks.train.config import (
    MESSAGE_ROLES,
    AxolotlConfig,
    TrainingConfigError,
    suggest_sequence_len,
)

IGNORE_INDEX = -100
_SENTINEL = "\u2063tuneloop-sentinel\u2063"



@dataclass
class EncodedRow:
    """One conversation as token ids; labels are the ids to learn (IGNORE_INDEX elsewhere)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def targets(self) -> list[int]:
        """Next-token targets shifted within this row: position t predicts labels[t + 1]."""
        return self.labels[1:] + [IGNORE_INDEX]


@dataclass
class Batch:
    """Plain-Python batch; `to_tensors()` makes the torch inputs."""

    input_ids: list[list[int]]
    targets: list[list[int]]
    position_ids: list[list[int]]
    # Per batch item: the row lengths packed into it, in order (a padded batch has one each).
    segments: list[list[int]]
    width: int
    pad_token_id: int
    real_tokens: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.real_tokens = sum(sum(seg) for seg in self.segments)
        self.slots = self.width * len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for row in self.targets for t in row if t != IGNORE_INDEX)

    def to_tensors(self, device: Any = "cpu", mask_dtype: Any = None) -> dict[str, Any]:
        """input_ids, targets, position_ids and a 4-D block-diagonal causal attention mask.

        The mask is boolean (True = may attend), which SDPA takes in any compute dtype; pass a
        float `mask_dtype` for an additive mask (0 / dtype min) for eager attention.
        """
        import torch

        input_ids = torch.tensor(self.input_ids, dtype=torch.long, device=device)
        targets = torch.tensor(self.targets, dtype=torch.long, device=device)
        position_ids = torch.tensor(self.position_ids, dtype=torch.long, device=device)
        allowed = torch.zeros(len(self.input_ids), self.width, self.width, dtype=torch.bool,
                              device=device)
        causal = torch.ones(self.width, self.width, dtype=torch.bool, device=device).tril()
        for item, lengths in enumerate(self.segments):
            start = 0
            for length in lengths:
                end = start + length
                allowed[item, start:end, start:end] = causal[:length, :length]
                start = end
            # Padding slots attend to themselves only: no NaN rows, no effect on real tokens.
            pad = torch.arange(start, self.width, device=device)
            allowed[item, pad, pad] = True
        mask = allowed.unsqueeze(1)
        if mask_dtype is not None and mask_dtype != torch.bool:
            additive = torch.zeros(mask.shape, dtype=mask_dtype, device=device)
            mask = additive.masked_fill_(~mask, torch.finfo(mask_dtype).min)
        return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids,
                "attention_mask": mask}


# ---- loading ----------------------------------------------------------------------------------
def load_conversations(path: Path | str, *, field_messages: str = "messages") -> list[list[dict]]:
    """Read a chat JSONL; raise TrainingConfigError naming the first malformed line."""
    path = Path(path)
    if not path.exists():
        raise TrainingConfigError(f"dataset {path} does not exist",
                                  fix="point datasets[].path at the exported snapshot JSONL")
    conversations: list[list[dict]] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingConfigError(
                    f"{path}:{line_no} is not JSON ({exc.msg})",
                    fix="export one JSON object per line", line=line_no) from None
            messages = record.get(field_messages) if isinstance(record, dict) else None
            _check_messages(messages, path, line_no, field_messages)
            conversations.append(
                [{"role": m["role"], "content": m["content"]} for m in messages]  # type: ignore[union-attr]
            )
    if not conversations:
        raise TrainingConfigError(f"dataset {path} has no rows",
                                  fix="export a non-empty dataset (check the gate's counts)")
    return conversations


def _check_messages(messages: Any, path: Path, line_no: int, field_messages: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TrainingConfigError(
            f"{path}:{line_no} has no {field_messages!r} list",
            fix=f'write rows as {{"{field_messages}": [{{"role": "user", "content": ...}}]}} '
                "or set datasets[].field_messages", line=line_no)
    for turn in messages:
        if (not isinstance(turn, dict) or turn.get("role") not in MESSAGE_ROLES
                or not isinstance(turn.get("content"), str)):
            raise TrainingConfigError(
                f"{path}:{line_no} has a malformed turn {str(turn)[:120]!r}",
                fix=f"each turn needs role in {list(MESSAGE_ROLES)} and string content",
                line=line_no)
    if not any(turn["role"] == "assistant" for turn in messages):
        raise TrainingConfigError(f"{path}:{line_no} has no assistant turn to learn from",
                                  fix="drop rows without an assistant reply in curation",
                                  line=line_no)


# ---- chat template + encoding -----------------------------------------------------------------
def resolve_chat_template(cfg: AxolotlConfig, tokenizer: Any) -> str:
    """The Jinja template the config asks for, as Axolotl resolves `chat_template`."""
    name = cfg.chat_template
    own = getattr(tokenizer, "chat_template", None)
    if name == "jinja":
        return str(cfg.chat_template_jinja)
    if name == "chatml":
        return CHATML_TEMPLATE
    if name == "tokenizer_default":
        if not own:
            raise TrainingConfigError(
                "chat_template: tokenizer_default but the tokenizer has no chat template",
                fix="set chat_template: tokenizer_default_fallback_chatml")
        return str(own)
    if name.startswith("tokenizer_default_fallback_"):
        if own:
            return str(own)
        fallback = name.removeprefix("tokenizer_default_fallback_")
        if fallback == "chatml":
            return CHATML_TEMPLATE
        name = fallback
    raise TrainingConfigError(
        f"chat_template {name!r} is rendered by Axolotl's template library, which the local "
        "trainer does not ship",
        fix="set chat_template: tokenizer_default_fallback_chatml, chatml, or jinja with "
            "chat_template_jinja")


def _render(tokenizer: Any, messages: Sequence[dict], template: str) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False)


def end_of_turn_marker(tokenizer: Any, template: str) -> str:
    """The text a template writes right after an assistant turn's content (e.g. `<|im_end|>`)."""
    text = _render(tokenizer, [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": _SENTINEL}], template)
    return text.split(_SENTINEL, 1)[1].rstrip() if _SENTINEL in text else ""


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    chat_template: str,
    roles_to_train: Iterable[str] = ("assistant",),
    train_on_inputs: bool = False,
    train_on_eos: str = "turn",
    eot_marker: str | None = None,
) -> EncodedRow:
    """Token ids of the rendered conversation; labels only on the trained turns' characters.

    Each turn's content is located in the rendered text in order, then every token whose first
    character falls inside a trained span (content + end-of-turn marker) keeps its id as label.
    """
    text = _render(tokenizer, messages, chat_template)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    offsets = encoded.get("offset_mapping")
    if offsets is None:
        raise TrainingConfigError(
            f"tokenizer {type(tokenizer).__name__} gives no offset mapping",
            fix="use a fast tokenizer (a model folder with tokenizer.json)")
    if train_on_inputs:
        return EncodedRow(input_ids=input_ids, labels=list(input_ids))

    marker = end_of_turn_marker(tokenizer, chat_template) if eot_marker is None else eot_marker
    trained_roles = set(roles_to_train)
    spans: list[tuple[int, int]] = []
    cursor = 0
    last_turn = len(messages) - 1
    for index, turn in enumerate(messages):
        content = turn["content"]
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0 and content.strip():
            content = content.strip()  # templates that trim whitespace
            start = text.find(content, cursor)
        if start < 0:
            raise TrainingConfigError(
                f"the chat template rewrites turn {index} ({turn['role']}), so its tokens cannot "
                "be located for loss masking",
                fix="use a template that writes message content verbatim (e.g. chatml)")
        end = start + len(content)
        cursor = end
        with_marker = bool(marker) and text.startswith(marker, end)
        if turn["role"] in trained_roles:
            eos = with_marker and (train_on_eos in ("turn", "all")
                                   or (train_on_eos == "last" and index == last_turn))
            spans.append((start, end + len(marker) if eos else end))
        elif with_marker and train_on_eos == "all":
            spans.append((end, end + len(marker)))
        if with_marker:
            cursor = end + len(marker)

    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (char_start, char_end) in enumerate(offsets):
        if char_end <= char_start:  # special tokens without characters
            continue
        while span_index < len(spans) and spans[span_index][1] <= char_start:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= char_start < spans[span_index][1]:
            labels[position] = input_ids[position]
    return EncodedRow(input_ids=input_ids, labels=labels)


# ---- split, pack, batch -----------------------------------------------------------------------
def split_rows(rows: Sequence[Any], val_set_size: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then hold out round(n * val_set_size) rows (at least one when asked)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_set_size > 0 and len(rows) > 1:
        n_val = min(len(rows) - 1, max(1, round(len(rows) * val_set_size)))
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in order[n_val:]]
    return train, val


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: lists of row indices whose lengths sum to <= capacity."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise TrainingConfigError(
            f"a row of {max(too_long)} tokens does not fit sequence_len {capacity}",
            fix=f"set sequence_len: {max(too_long)} or more", longest_tokens=max(too_long))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        size = lengths[index]
        for b, space in enumerate(free):
            if size <= space:
                bins[b].append(index)
                free[b] -= size
                break
        else:
            bins.append([index])
            free.append(capacity - size)
    return bins


def collate_packed(rows: Sequence[EncodedRow], bins: Sequence[Sequence[int]], *,
                   pad_token_id: int, width: int) -> Batch:
    """Concatenate each bin's rows into one slot row of `width` tokens (padding at the end)."""
    input_ids, targets, positions, segments = [], [], [], []
    for members in bins:
        ids: list[int] = []
        tgt: list[int] = []
        pos: list[int] = []
        lengths = []
        for index in members:
            row = rows[index]
            ids.extend(row.input_ids)
            tgt.extend(row.targets())
            pos.extend(range(len(row)))
            lengths.append(len(row))
        pad = width - len(ids)
        if pad < 0:
            raise TrainingConfigError(f"packed bin of {len(ids)} tokens exceeds width {width}",
                                      fix="raise sequence_len")
        input_ids.append(ids + [pad_token_id] * pad)
        targets.append(tgt + [IGNORE_INDEX] * pad)
        positions.append(pos + list(range(pad)))
        segments.append(lengths)
    return Batch(input_ids=input_ids, targets=targets, position_ids=positions,
                 segments=segments, width=width, pad_token_id=pad_token_id)


def collate_padded(rows: Sequence[EncodedRow], *, pad_token_id: int,
                   width: int | None = None) -> Batch:
    """One row per batch item, right-padded to `width` (default: the longest row)."""
    width = width or max(len(r) for r in rows)
    return collate_packed(rows, [[i] for i in range(len(rows))], pad_token_id=pad_token_id,
                          width=width)


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]],
                       capacity: int) -> float:
    """Real tokens / slots when every bin is a `capacity`-token row."""
    return sum(lengths) / (len(bins) * capacity) if bins else 0.0


# ---- the sequence-length check (the trainer's `check` command, before any GPU time) ----------
def check_sequence_len(cfg: AxolotlConfig, dataset_path: Path | str, tokenizer: Any) -> dict:
    """Raise TrainingConfigError when a row of `dataset_path` is longer than cfg.sequence_len.

    Rows are tokenised exactly as training sees them (the resolved chat template), so the number
    in the message is the one to compare. Returns {"rows", "longest_tokens", "sequence_len"}.
    """
    dataset_path = Path(dataset_path)
    spec = next((d for d in cfg.datasets if Path(d.path) == dataset_path), None)
    field = spec.field_messages if spec else "messages"
    roles = tuple(spec.roles_to_train) if spec else ("assistant",)
    template = resolve_chat_template(cfg, tokenizer)
    longest, longest_row = 0, -1
    conversations = load_conversations(dataset_path, field_messages=field)
    for index, messages in enumerate(conversations):
        row = encode_conversation(tokenizer, messages, chat_template=template,
                                  roles_to_train=roles, train_on_inputs=cfg.train_on_inputs)
        if len(row.input_ids) > longest:
            longest, longest_row = len(row.input_ids), index
    if longest > cfg.sequence_len:
        suggested = suggest_sequence_len(longest)
        raise TrainingConfigError(
            f"sequence_len {cfg.sequence_len} is below the longest kept row "
            f"({longest} tokens, row {longest_row} of {dataset_path})",
            fix=f"set sequence_len: {suggested} (or drop rows longer than {cfg.sequence_len} "
                "tokens in curation)",
            longest_tokens=longest, row_index=longest_row, suggested_sequence_len=suggested,
            sequence_len=cfg.sequence_len, dataset_path=str(dataset_path),
        )
    return {"rows": len(conversations), "longest_tokens": longest,
            "sequence_len": cfg.sequence_len}
