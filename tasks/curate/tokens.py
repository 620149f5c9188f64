"""Length measurement: turns, words and chat-template token counts of candidate rows.

`measure_rows` fills the length fields the filters and the gate check. Tokens are counted as the
trainer sees the row (system prompt + messages through the tokenizer's chat template) by
`TokenCounter`, which measures the template overhead once per role signature and tokenizes the
contents in one batch; rows provably under `sequence_len` by the byte bound skip the tokenizer.
Loaded counters are cached per tokenizer name (`token_counter`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.curate.config import CurationConfig
from tasks.curate.rows import CandidateRow
from tasks.datasets.export import chat_messages


class TokenCounter:
    """Exact chat-template token counts, computed fast.

    The template's own tokens depend only on the sequence of roles, so they are measured once
    per role signature on a probe conversation; message contents are tokenized in one batch.
    With ChatML-style templates (special tokens around every message) this equals
    `len(apply_chat_template(messages, tokenize=True))`; conversations with whitespace at a
    content edge (where BPE may merge across the template boundary) are templated directly.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            from tasks.core.chat_template import CHATML_TEMPLATE

            tokenizer.chat_template = CHATML_TEMPLATE
        self._overhead: dict[tuple[str, ...], int] = {}
        self._probe_len = len(self._encode(["x"])[0])

    @classmethod
    def load(cls, name: str) -> TokenCounter:

        from transformers import AutoTokenizer

        from tasks.core.weights import resolve_base_model

        return cls(AutoTokenizer.from_pretrained(str(resolve_base_model(name))))

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False,
                              return_attention_mask=False)["input_ids"]

    def exact(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    def overhead(self, roles: tuple[str, ...]) -> int:
        if roles not in self._overhead:
            probe = [{"role": role, "content": "x"} for role in roles]
            self._overhead[roles] = self.exact(probe) - self._probe_len * len(roles)
        return self._overhead[roles]

    @staticmethod
    def _clean_edges(conversation: list[dict[str, str]]) -> bool:
        # Whitespace at a content edge can merge with the template's own newline into one
        # token, so such conversations (rare) go through the template itself.
        return all(c and not c[0].isspace() and not c[-1].isspace()
                   for c in (m["content"] for m in conversation))

    def count(self, conversations: Sequence[list[dict[str, str]]]) -> list[int]:
        fast = [i for i, conv in enumerate(conversations) if self._clean_edges(conv)]
        flat = [m["content"] for i in fast for m in conversations[i]]
        lengths = [len(ids) for ids in self._encode(flat)] if flat else []
        out = [0] * len(conversations)
        cursor = 0
        for i in fast:
            conv = conversations[i]
            out[i] = (self.overhead(tuple(m["role"] for m in conv))
                      + sum(lengths[cursor:cursor + len(conv)]))
            cursor += len(conv)
        for i in set(range(len(conversations))) - set(fast):
            out[i] = self.exact(conversations[i])
        return out


_TOKEN_COUNTERS: dict[str, TokenCounter] = {}


def token_counter(name: str) -> TokenCounter:
    if name not in _TOKEN_COUNTERS:
        _TOKEN_COUNTERS[name] = TokenCounter.load(name)
    return _TOKEN_COUNTERS[name]


def measure_rows(rows: Sequence[CandidateRow], cfg: CurationConfig,
                 counter: TokenCounter | None = None) -> None:
    """Fill turns, words and tokens (as training sees the row: system prompt + messages).

    A byte-level BPE token covers at least one byte, so template overhead + UTF-8 bytes is a
    proven upper bound; rows under `sequence_len` by that bound skip the tokenizer (unless
    exact_token_counts) and carry the bound, which is all the length check needs.
    """
    chats = [chat_messages(r.system_prompt, r.messages) for r in rows]
    for row in rows:
        row.turns = sum(1 for m in row.messages if m.get("role") == "assistant")
        row.words = sum(len(str(m.get("content", "")).split()) for m in row.messages
                        if m.get("role") != "system")
    if cfg.sequence_len is None:
        return
    if cfg.tokenizer is None:
        # No tokenizer: the byte bound itself (conservative: never admits an over-long row).
        for row, chat in zip(rows, chats, strict=True):
            row.tokens = 16 * len(chat) + sum(len(m["content"].encode()) for m in chat)
        return
    counter = counter or token_counter(cfg.tokenizer)
    todo: list[int] = []
    for index, (row, chat) in enumerate(zip(rows, chats, strict=True)):
        bound = (counter.overhead(tuple(m["role"] for m in chat))
                 + sum(len(m["content"].encode()) for m in chat))
        row.tokens = bound
        if cfg.exact_token_counts or bound > cfg.sequence_len:
            todo.append(index)
    for start in range(0, len(todo), 4096):
        chunk = todo[start:start + 4096]
        for index, tokens in zip(chunk, counter.count([chats[i] for i in chunk]), strict=True):
            rows[index].tokens = tokens

