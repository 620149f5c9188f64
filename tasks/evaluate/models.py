"""The model side of evaluation: loading base+adapter, assistant-only perplexity, greedy replies.

`load_model` loads the base model (serving dtype) with the PEFT adapter on top, so the caller
measures the base through `disable_adapter()` on the same load. `read_conversations` reads the
validation JSONL (messages or ShareGPT keys); `assistant_labels` masks every token except the
assistant turns (the tokens the trainer learns), and `perplexity` is exp(mean NLL) over exactly
those tokens. `generate_replies` answers the scenario chats greedily in left-padded batches, cut
at the first ChatML stop string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.evaluate.config import EvaluationError

# ---- validation data and assistant-token masks -------------------------------------------------

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _normalise_messages(raw: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out = []
    for message in raw:
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            continue
        out.append({"role": _ROLE_ALIASES.get(str(role), str(role)), "content": str(content)})
    return out


def read_conversations(path: Path | str, *, limit: int | None = None) -> list[list[dict]]:
    """Conversations from a JSONL of {"messages": [...]} (or "conversations", ShareGPT keys)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"validation file {path} does not exist; pass the val split the "
                              "export wrote (e.g. <snapshot>/val.jsonl)", path=str(path))
    conversations: list[list[dict]] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            messages = _normalise_messages(row.get("messages") or row.get("conversations") or [])
            if any(m["role"] == "assistant" for m in messages):
                conversations.append(messages)
            if limit is not None and len(conversations) >= limit:
                break
    if not conversations:
        raise EvaluationError(f"{path} holds no conversation with an assistant turn; "
                              "perplexity needs assistant tokens", path=str(path))
    return conversations


def assistant_spans(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int,
                                                                                       int]]]:
    """The rendered chat text and the character spans of each assistant turn (incl. its end tag).

    A span is the difference between the text through the turn and the text up to its generation
    prompt — exactly what the model is asked to produce.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(list(messages[:index]), tokenize=False,
                                               add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(messages[:index + 1]), tokenize=False)
        if text.startswith(through) and through.startswith(prompt):
            spans.append((len(prompt), len(through)))
            cursor = len(through)
            continue
        start = text.find(message["content"], cursor)  # templates that are not prefix-stable
        if start >= 0:
            spans.append((start, start + len(message["content"])))
            cursor = start + len(message["content"])
    return text, spans


def assistant_labels(tokenizer, messages: Sequence[Mapping[str, str]], *, max_length: int = 2048
                     ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 everywhere except on assistant tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                        truncation=True, max_length=max_length)
    ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=True):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(token_id if inside else -100)
    return ids, labels


def sequence_nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count."""
    import torch

    ids = torch.tensor([input_ids])
    target = torch.tensor([labels])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1, :].float()
    shifted = target[:, 1:]
    mask = shifted != -100
    if not bool(mask.any()):
        return 0.0, 0
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.clamp(min=0).reshape(-1), reduction="none"
    ).reshape(shifted.shape)
    return float(losses[mask].sum()), int(mask.sum())


def perplexity(model, tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]], *,
               max_length: int = 2048) -> dict[str, float]:
    """exp(mean NLL) over all assistant tokens of all conversations."""
    total_nll = 0.0
    total_tokens = 0
    for messages in conversations:
        ids, labels = assistant_labels(tokenizer, messages, max_length=max_length)
        nll, count = sequence_nll(model, ids, labels)
        total_nll += nll
        total_tokens += count
    if total_tokens == 0:
        raise EvaluationError("no assistant tokens survived truncation; raise max_length")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(min(mean, 50.0)), "mean_nll": mean, "tokens": total_tokens,
            "rows": len(conversations)}


# ---- generation --------------------------------------------------------------------------------

def generate_replies(model, tokenizer, chats: Sequence[Sequence[Mapping[str, str]]], *,
                     max_new_tokens: int = 128, batch_size: int = 8,
                     stop_strings: Sequence[str] = ("<|im_end|>", "<|im_start|>")) -> list[str]:
    """Greedy replies for each chat (left-padded batches), cut at the first stop string."""
    import torch

    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for stop in stop_strings:
        stop_ids = tokenizer.encode(stop, add_special_tokens=False)
        if len(stop_ids) == 1:
            eos_ids.add(stop_ids[0])
    replies: list[str] = []
    try:
        for start in range(0, len(chats), batch_size):
            prompts = [tokenizer.apply_chat_template(list(chat), tokenize=False,
                                                     add_generation_prompt=True)
                       for chat in chats[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True,
                              add_special_tokens=False)
            with torch.no_grad():
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids) or None,
                )
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            for row in new_tokens:
                text = tokenizer.decode(row, skip_special_tokens=False)
                for stop in (*stop_strings, tokenizer.eos_token or ""):
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                if tokenizer.pad_token:
                    text = text.replace(tokenizer.pad_token, "")
                replies.append(text.strip())
    finally:
        tokenizer.padding_side = previous_side
    return replies


# ---- model loading -----------------------------------------------------------------------------

def load_model(adapter_dir: Path, base_model: str):
    """(PEFT model, tokenizer): the base in its serving dtype with the adapter on top, in eval mode.

    The tokenizer comes from the adapter folder when it has one (else the base); a tokenizer
    without a chat template gets the adapter's chat_template.jinja, else ChatML.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.chat_template import CHATML_TEMPLATE
    from tasks.core.weights import resolve_base_model, resolve_dtype

    base_path = resolve_base_model(base_model)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tokenizer.chat_template:
        template_file = adapter_dir / "chat_template.jinja"
        tokenizer.chat_template = (template_file.read_text() if template_file.is_file()
                                   else CHATML_TEMPLATE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The serving dtype (bf16 where the CPU has it): the model card describes what is served.
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=resolve_dtype())
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer
