"""Curation: row filters, near-duplicate pruning, the gate and the snapshot of a curated dataset.

`curate(cfg)` is the stage entry point (DAG `curate_dataset`). It loads candidate conversations
with their latest tags (`tasks.tag.stage.latest_tags`) and rubric outcomes (`tasks.judge.stage.rubric_outcomes`),
then:

1. **Row filters** (seed 000 §6) — pure functions of (row, config), each returning an `Exclusion`
   (reason + detail with the observed value and the threshold) or None: generation status,
   malformed messages, incomplete provenance, required taggers present, hallucination score
   <= max_hallucination, emotion confidence >= min_emotion_confidence, no rubric safety-gate
   failure, rubric pass, and length bounds (turns, words, tokens vs `sequence_len`). Every
   failing filter is recorded, not just the first, so `explain_exclusion` gives the whole story.
2. **Set filters**: exact content duplicates, then cosine pruning of near duplicates (greedy, the
   best-scored row of a group survives) — exact blocked matrix products up to `exact_limit` rows,
   random-hyperplane LSH (verified with exact cosine) beyond.
3. **Split** (seeded by conversation id, so a row keeps its split when others are added), PII
   scrubbing of every exported text (`tasks.datasets.deid`), the **GE gate** on the kept rows
   (`tasks.datasets.gate`), and the immutable **snapshot** (`tasks.datasets.export`) with stats and Data Docs.

A failed gate raises nothing: the snapshot records gate_passed=False and the DAG short-circuits.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks.core.configs import at_least, field_default, split_fraction
from tasks.core.db.engine import session_scope
from tasks.core.db.models import Conversation, Dataset, DatasetExclusion, GenerationBatch, Persona
from tasks.core.ids import content_hash, stable_id
from tasks.datasets import deid
from tasks.datasets.export import (
    EXPORT_FORMATS,
    MANIFEST,
    ExportRow,
    SnapshotWriter,
    chat_messages,
    existing_dataset,
    format_path,
    histogram,
    manifest,
    record_snapshot,
    snapshot_complete,
    snapshot_dir,
    snapshot_hash,
    write_formats,
    write_json,
    write_jsonl,
    write_stat_plots,
)

log = logging.getLogger(__name__)

KNOWN_TAGGERS = ("emotion", "topic", "temporal", "belief", "hallucination")
DEFAULT_REQUIRED_TAGGERS = ("emotion", "topic", "temporal", "hallucination")
DEFAULT_TOKENIZER = "smollm2-135m-instruct"
DEFAULT_EDGE_CASE_SHARE = 0.15  # seed 001: ~15% edge cases, when no taxonomy is readable
DATASET_KIND = "curated"

# Exclusion reasons (what dataset_exclusions.reason holds) and how to explain each.
REASONS: dict[str, str] = {
    "generation_not_ok": "generation marked it {status}: {failure_reason}",
    "malformed_messages": "messages are not a user/assistant exchange ending in a reply: {problem}",
    "incomplete_fields": "missing {missing}",
    "missing_required_tags": "no result yet from required tagger(s) {missing}",
    "hallucination_above_max": "hallucination_score {value} > max_hallucination {threshold}",
    "emotion_confidence_below_min": (
        "emotion confidence {value} < min_emotion_confidence {threshold}"),
    "safety_gate_failed": "failed rubric safety gate(s) {failed_criteria}",
    "rubric_not_judged": "not judged with rubric {rubric_version} yet (require_rubric_pass)",
    "rubric_failed": "rubric score {value} below pass threshold; failed {failed_criteria}",
    "too_many_turns": "{value} turns > max_turns {threshold}",
    "words_out_of_bounds": "{value} words outside [{min_words}, {max_words}]",
    "tokens_exceed_sequence_len": "{value} tokens > sequence_len {threshold}",
    "duplicate_content": "same content hash as {duplicate_of}",
    "near_duplicate": "cosine {similarity} >= {threshold} with kept {duplicate_of}",
}


class CurationError(ValueError):
    """Curation cannot run as configured; the message says what to change."""


# ---- configuration -----------------------------------------------------------------------------
class CurationConfig(BaseModel):
    """What a curated dataset keeps, how it is gated and how it is exported."""

    model_config = ConfigDict(extra="forbid")

    name: str = "curated"
    batch_id: str | None = None
    # row filters (seed 000 §6)
    max_hallucination: float | None = 0.1
    min_emotion_confidence: float | None = None
    required_taggers: list[str] = Field(default_factory=lambda: list(DEFAULT_REQUIRED_TAGGERS))
    require_rubric_pass: bool = True
    rubric_policy: Literal["both", "either"] = "both"
    rubric_version: str | None = None
    dedup_threshold: float | None = 0.95
    dedup_method: Literal["auto", "exact", "lsh"] = "auto"
    exact_limit: int = 20000
    # length bounds (filter and gate)
    max_turns: int = 20
    min_words: int = 5
    max_words: int = 4000
    sequence_len: int | None = 2048
    tokenizer: str | None = DEFAULT_TOKENIZER
    exact_token_counts: bool = False
    # gate-only checks
    edge_case_target: float | None = None
    edge_case_tolerance: float | None = 0.05
    min_rows: int = 10
    min_topic_diversity: int = 3
    min_persona_diversity: int = 3
    # export
    val_fraction: float = 0.1
    seed: int = 13
    formats: list[Literal["openai", "sharegpt", "alpaca"]] = Field(
        default_factory=lambda: list(EXPORT_FORMATS))
    scrub_persona_names: bool = True

    @field_validator("batch_id", "rubric_version", "tokenizer", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("max_hallucination")
    @classmethod
    def _max_hallucination(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"max_hallucination must be within [0, 1] (got {value}); "
                             "set max_hallucination: 0.1, or null to disable the filter")
        return value

    @field_validator("min_emotion_confidence")
    @classmethod
    def _min_confidence(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"min_emotion_confidence must be within [0, 1] (got {value}); "
                             "it is the emotion tagger's confidence, e.g. "
                             "min_emotion_confidence: 0.5")
        return value

    @field_validator("required_taggers")
    @classmethod
    def _taggers(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in KNOWN_TAGGERS]
        if unknown:
            raise ValueError(f"unknown tagger(s) {unknown} in required_taggers; use any of "
                             f"{list(KNOWN_TAGGERS)}, e.g. required_taggers: "
                             f"{list(DEFAULT_REQUIRED_TAGGERS)}")
        return list(dict.fromkeys(value))

    @field_validator("dedup_threshold")
    @classmethod
    def _dedup(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"dedup_threshold is a cosine similarity in (0, 1] (got {value}); "
                             "set dedup_threshold: 0.95, or null to keep near duplicates")
        return value

    @field_validator("edge_case_target")
    @classmethod
    def _edge_target(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"edge_case_target is a share in [0, 1] (got {value}); set "
                             "edge_case_target: 0.15, or null to read it from the taxonomy")
        return value

    @field_validator("edge_case_tolerance")
    @classmethod
    def _edge_tolerance(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"edge_case_tolerance must be within [0, 1) (got {value}); set "
                             "edge_case_tolerance: 0.05, or null to skip the edge-case check")
        return value

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, value: float) -> float:
        return split_fraction(value)

    @field_validator("min_rows", "min_topic_diversity", "min_persona_diversity", "max_turns",
                     "exact_limit")
    @classmethod
    def _at_least_one(cls, value: int, info: Any) -> int:
        return at_least(value, 1, info.field_name, field_default(cls, info.field_name))

    @field_validator("min_words")
    @classmethod
    def _min_words(cls, value: int) -> int:
        return at_least(value, 0, "min_words", 5)

    @field_validator("sequence_len")
    @classmethod
    def _sequence_len(cls, value: int | None) -> int | None:
        if value is not None and value < 16:
            raise ValueError(f"sequence_len must be >= 16 tokens (got {value}); use the trainer's "
                             "sequence_len, e.g. sequence_len: 2048")
        return value

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("formats must name at least one export format; set formats: "
                             "[openai, sharegpt, alpaca] (the trainer reads openai)")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> CurationConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words}); "
                             "set e.g. min_words: 5 and max_words: 4000")
        return self

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> CurationConfig:
        """Build from Airflow Params (or any dict); blank strings mean unset, unknown keys fail."""
        from tasks.core.configs import config_from_params

        return config_from_params(cls, params, CurationError, "curation")

    def fingerprint(self, edge_case_target: float | None) -> dict[str, Any]:
        """The filters and thresholds recorded on the dataset (and hashed into its id)."""
        data = self.model_dump(mode="json", exclude={"name"})
        data["edge_case_target"] = edge_case_target
        return data


# ---- candidate rows ----------------------------------------------------------------------------
@dataclass
class CandidateRow:
    """A conversation with everything the filters, the gate and the export need."""

    conversation_id: str
    messages: list[dict[str, Any]]
    system_prompt: str = ""
    batch_id: str = ""
    status: str = "ok"
    failure_reason: str | None = None
    duplicate_of: str | None = None
    persona_id: str | None = None
    persona: dict[str, Any] = field(default_factory=dict)  # {"name", "attributes"}
    taxonomy_cell: dict[str, Any] = field(default_factory=dict)
    is_edge_case: bool = False
    content_hash: str | None = None
    embedding: Any = None  # 384 floats (whole-conversation MiniLM) or None
    template_hashes: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)  # tagger -> output
    rubric: dict[str, Any] | None = None  # RubricOutcome.to_dict()
    # measured by `measure_rows`
    turns: int = 0
    words: int = 0
    tokens: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = content_hash(
                {"system": self.system_prompt, "messages": self.messages})

    @property
    def hallucination_score(self) -> float | None:
        return _number(self.tags.get("hallucination", {}).get("hallucination_score"))

    @property
    def emotion_confidence(self) -> float | None:
        return _number(self.tags.get("emotion", {}).get("confidence"))

    @property
    def topic(self) -> str | None:
        topic = self.taxonomy_cell.get("topic")
        if topic:
            return str(topic)
        topics = self.tags.get("topic", {}).get("topics") or []
        return str(topics[0]) if topics else None

    @property
    def rubric_score(self) -> float | None:
        return _number(self.rubric.get("score")) if self.rubric else None


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Exclusion:
    """Why a row is not in the dataset: a reason from REASONS and the data behind it."""

    reason: str
    detail: dict[str, Any]


def explain(reason: str, detail: dict[str, Any]) -> str:
    """A one-line human explanation of an exclusion."""
    template = REASONS.get(reason)
    if template is None:
        return f"{reason}: {detail}"
    try:
        return template.format(**detail)
    except (KeyError, IndexError):
        return f"{reason}: {detail}"


# ---- row filters (pure) ------------------------------------------------------------------------
def filter_generation_status(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    if row.status != "ok":
        return Exclusion("generation_not_ok", {
            "status": row.status, "duplicate_of": row.duplicate_of,
            "failure_reason": row.failure_reason or (
                f"duplicate of {row.duplicate_of}" if row.duplicate_of else "")})
    return None


def filter_malformed(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    roles = [m.get("role") for m in row.messages]
    problem = None
    if not roles:
        problem = "no messages"
    elif "user" not in roles:
        problem = "no user message"
    elif roles[-1] != "assistant":
        problem = f"last message is from {roles[-1]!r}"
    elif any(not str(m.get("content", "")).strip() for m in row.messages):
        problem = "an empty message"
    elif any(r not in ("user", "assistant", "system") for r in roles):
        problem = f"unknown role(s) {sorted({str(r) for r in roles} - {'user', 'assistant', 'system'})}"
    return Exclusion("malformed_messages", {"problem": problem}) if problem else None


def filter_incomplete(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    missing = [name for name, value in (("persona_id", row.persona_id), ("topic", row.topic))
               if not value]
    return Exclusion("incomplete_fields", {"missing": missing}) if missing else None


def filter_required_taggers(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    missing = [t for t in cfg.required_taggers if t not in row.tags]
    if missing:
        return Exclusion("missing_required_tags", {"missing": missing,
                                                   "present": sorted(row.tags)})
    return None


def filter_hallucination(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    score = row.hallucination_score
    if cfg.max_hallucination is not None and score is not None and score > cfg.max_hallucination:
        return Exclusion("hallucination_above_max",
                         {"value": score, "threshold": cfg.max_hallucination})
    return None


def filter_emotion_confidence(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    confidence = row.emotion_confidence
    if (cfg.min_emotion_confidence is not None and confidence is not None
            and confidence < cfg.min_emotion_confidence):
        return Exclusion("emotion_confidence_below_min",
                         {"value": confidence, "threshold": cfg.min_emotion_confidence})
    return None


def filter_safety_gates(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    # A judged safety-gate failure always excludes, whatever require_rubric_pass says.
    if row.rubric and row.rubric.get("safety_failed"):
        return Exclusion("safety_gate_failed", {
            "failed_criteria": row.rubric.get("failed_criteria", []),
            "rubric_version": row.rubric.get("rubric_version", "")})
    return None


def filter_rubric_pass(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    if not cfg.require_rubric_pass:
        return None
    if row.rubric is None:
        return Exclusion("rubric_not_judged", {"rubric_version": cfg.rubric_version or "current"})
    if not row.rubric.get("passed") and not row.rubric.get("safety_failed"):
        return Exclusion("rubric_failed", {
            "value": row.rubric.get("score"),
            "failed_criteria": row.rubric.get("failed_criteria", []),
            "rubric_version": row.rubric.get("rubric_version", "")})
    return None


def filter_turns(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    if row.turns > cfg.max_turns:
        return Exclusion("too_many_turns", {"value": row.turns, "threshold": cfg.max_turns})
    return None


def filter_words(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    if not cfg.min_words <= row.words <= cfg.max_words:
        return Exclusion("words_out_of_bounds", {"value": row.words, "min_words": cfg.min_words,
                                                 "max_words": cfg.max_words})
    return None


def filter_tokens(row: CandidateRow, cfg: CurationConfig) -> Exclusion | None:
    if cfg.sequence_len is not None and row.tokens > cfg.sequence_len:
        return Exclusion("tokens_exceed_sequence_len",
                         {"value": row.tokens, "threshold": cfg.sequence_len})
    return None


RowFilter = Callable[[CandidateRow, CurationConfig], Exclusion | None]
ROW_FILTERS: tuple[RowFilter, ...] = (
    filter_malformed, filter_incomplete, filter_required_taggers,
    filter_hallucination, filter_emotion_confidence, filter_safety_gates, filter_rubric_pass,
    filter_turns, filter_words, filter_tokens,
)


# ---- measuring ---------------------------------------------------------------------------------
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


# ---- near duplicates ---------------------------------------------------------------------------
def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def lsh_pairs(vectors: np.ndarray, threshold: float, *, tables: int = 20, bits: int | None = None,
              seed: int = 0) -> dict[tuple[int, int], float]:
    """Candidate near-duplicate pairs by random-hyperplane LSH, verified with exact cosine.

    Rows sharing a `bits`-bit sign code in any of `tables` tables are compared exactly. For
    cosine c the chance a true pair is missed is (1 - (1 - acos(c)/pi)^bits)^tables: with the
    defaults at 100k rows (15 bits, 20 tables) ~1% at c = 0.95 and ~0.01% at c = 0.98.
    """
    n, dim = vectors.shape
    if n < 2:
        return {}
    bits = bits or int(min(24, max(8, math.ceil(math.log2(max(n, 2) / 4)))))
    rng = np.random.default_rng(seed)
    weights = (1 << np.arange(bits, dtype=np.int64))
    pairs: dict[tuple[int, int], float] = {}
    for _ in range(tables):
        planes = rng.standard_normal((dim, bits)).astype(np.float32)
        codes = ((vectors @ planes) > 0).astype(np.int64) @ weights
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        offset = 1
        while offset < n:
            same = sorted_codes[offset:] == sorted_codes[:-offset]
            if not same.any():
                break
            left = order[:-offset][same]
            right = order[offset:][same]
            sims = np.einsum("ij,ij->i", vectors[left], vectors[right])
            for a, b, s in zip(left[sims >= threshold], right[sims >= threshold],
                               sims[sims >= threshold], strict=True):
                key = (int(a), int(b)) if a < b else (int(b), int(a))
                pairs[key] = float(s)
            offset += 1
    return pairs


def exact_pairs(vectors: np.ndarray, threshold: float, block: int = 2048
                ) -> dict[tuple[int, int], float]:
    """All pairs with cosine >= threshold, by blocked matrix products (O(n^2) work, O(block^2)
    memory)."""
    n = len(vectors)
    pairs: dict[tuple[int, int], float] = {}
    for i0 in range(0, n, block):
        a = vectors[i0:i0 + block]
        for j0 in range(i0, n, block):
            sims = a @ vectors[j0:j0 + block].T
            rows, cols = np.nonzero(sims >= threshold)
            for r, c in zip(rows, cols, strict=True):
                i, j = i0 + int(r), j0 + int(c)
                if i < j:
                    pairs[(i, j)] = float(sims[r, c])
    return pairs


def near_duplicates(ids: Sequence[str], vectors: np.ndarray, threshold: float, *,
                    method: str = "auto", exact_limit: int = 20000, seed: int = 0
                    ) -> tuple[dict[int, tuple[int, float]], str]:
    """Greedy pruning in the given (priority) order: index -> (kept index it duplicates, cosine).

    A row is dropped when it is at least `threshold` similar to an earlier row that was kept.
    Returns the drops and the method used ("exact" or "lsh").
    """
    if method == "auto":
        method = "exact" if len(ids) <= exact_limit else "lsh"
    vectors = _unit(np.asarray(vectors, dtype=np.float32))
    pairs = (exact_pairs(vectors, threshold) if method == "exact"
             else lsh_pairs(vectors, threshold, seed=seed))
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for (i, j), sim in pairs.items():
        neighbours.setdefault(j, []).append((i, sim))  # i < j: i comes first in priority order
    dropped: dict[int, tuple[int, float]] = {}
    for j in sorted(neighbours):
        kept = [(i, s) for i, s in neighbours[j] if i not in dropped]
        if kept:
            dropped[j] = max(kept, key=lambda x: (x[1], -x[0]))
    return dropped, method


def _priority(row: CandidateRow) -> tuple:
    """Which row of a duplicate group survives: best rubric, least hallucination, then id."""
    rubric = row.rubric_score if row.rubric_score is not None else -1.0
    halluc = row.hallucination_score if row.hallucination_score is not None else 1.0
    return (-rubric, halluc, row.conversation_id)


def _embeddings_for(rows: Sequence[CandidateRow]) -> np.ndarray:
    missing = [i for i, r in enumerate(rows) if r.embedding is None or len(r.embedding) == 0]
    if missing:
        from tasks.core.embeddings import embed
        from tasks.generate.dedup import conversation_text

        log.info("embedding %d conversations without a stored embedding", len(missing))
        vectors = embed([conversation_text(rows[i].messages) for i in missing])
        for i, vector in zip(missing, vectors, strict=True):
            rows[i].embedding = vector
    return np.asarray([np.asarray(r.embedding, dtype=np.float32) for r in rows])


def apply_filters(rows: Sequence[CandidateRow], cfg: CurationConfig
                  ) -> tuple[list[CandidateRow], list[dict[str, Any]], dict[str, Any]]:
    """(kept rows sorted by id, exclusion records, dedup info). Rows must be measured first."""
    exclusions: list[dict[str, Any]] = []
    survivors: list[CandidateRow] = []
    for row in rows:
        # A conversation generation gave up on has nothing else worth checking.
        status = filter_generation_status(row, cfg)
        found = [status] if status else [e for f in ROW_FILTERS if (e := f(row, cfg)) is not None]
        for e in found:
            exclusions.append({"conversation_id": row.conversation_id, "reason": e.reason,
                               "detail": e.detail})
        if not found:
            survivors.append(row)

    survivors.sort(key=_priority)
    unique: list[CandidateRow] = []
    first_with_hash: dict[str, str] = {}
    for row in survivors:
        other = first_with_hash.get(row.content_hash or "")
        if other is not None:
            exclusions.append({"conversation_id": row.conversation_id,
                               "reason": "duplicate_content", "detail": {"duplicate_of": other}})
            continue
        first_with_hash[row.content_hash or ""] = row.conversation_id
        unique.append(row)

    dedup: dict[str, Any] = {"threshold": cfg.dedup_threshold, "method": None, "pruned": 0}
    kept = unique
    if cfg.dedup_threshold is not None and len(unique) > 1:
        vectors = _embeddings_for(unique)
        dropped, method = near_duplicates([r.conversation_id for r in unique], vectors,
                                          cfg.dedup_threshold, method=cfg.dedup_method,
                                          exact_limit=cfg.exact_limit, seed=cfg.seed)
        for index, (kept_index, similarity) in sorted(dropped.items()):
            exclusions.append({
                "conversation_id": unique[index].conversation_id, "reason": "near_duplicate",
                "detail": {"duplicate_of": unique[kept_index].conversation_id,
                           "similarity": round(similarity, 4),
                           "threshold": cfg.dedup_threshold, "method": method}})
        kept = [r for i, r in enumerate(unique) if i not in dropped]
        dedup.update(method=method, pruned=len(dropped))
    kept.sort(key=lambda r: r.conversation_id)
    return kept, exclusions, dedup


def assign_splits(rows: Sequence[CandidateRow], val_fraction: float, seed: int) -> None:
    """Seeded split by a hash of (seed, id): a row keeps its split when other rows come or go
    (up to the validation count), and the validation set has exactly round(n * val_fraction)
    rows (at least one when val_fraction > 0 and n >= 2)."""
    n = len(rows)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    ranked = sorted(rows, key=lambda r: stable_id(seed, r.conversation_id))
    val_ids = {r.conversation_id for r in ranked[:n_val]}
    for row in rows:
        row.split = "validation" if row.conversation_id in val_ids else "train"


# ---- loading -----------------------------------------------------------------------------------
def load_candidates(session: Session, cfg: CurationConfig) -> list[CandidateRow]:
    """Conversations (one batch, or all) with persona, latest tags and rubric outcome."""
    from tasks.judge.stage import rubric_outcomes
    from tasks.tag.stage import latest_tags

    stmt = (select(Conversation, Persona.name, Persona.attributes)
            .outerjoin(Persona, Persona.id == Conversation.persona_id)
            .order_by(Conversation.id))
    if cfg.batch_id:
        stmt = stmt.where(Conversation.batch_id == cfg.batch_id)
    rows: list[CandidateRow] = []
    for conv, persona_name, persona_attributes in session.execute(stmt):
        rows.append(CandidateRow(
            conversation_id=conv.id, messages=list(conv.messages or []),
            system_prompt=conv.system_prompt or "", batch_id=conv.batch_id, status=conv.status,
            failure_reason=conv.failure_reason, duplicate_of=conv.duplicate_of,
            persona_id=conv.persona_id,
            persona={"name": persona_name, "attributes": persona_attributes or {}},
            taxonomy_cell=dict(conv.taxonomy_cell or {}), is_edge_case=bool(conv.is_edge_case),
            content_hash=conv.content_hash, embedding=conv.embedding,
            template_hashes=dict(conv.template_hashes or {}), model=conv.model or ""))
    ok_ids = [r.conversation_id for r in rows if r.status == "ok"]
    tags = latest_tags(session, ok_ids) if ok_ids else {}
    outcomes = (rubric_outcomes(session, ok_ids, rubric_version=cfg.rubric_version,
                                policy=cfg.rubric_policy) if ok_ids else {})
    for row in rows:
        row.tags = dict(tags.get(row.conversation_id, {}))
        outcome = outcomes.get(row.conversation_id)
        row.rubric = outcome.to_dict() if outcome is not None else None
    return rows


def resolve_edge_case_target(session: Session | None, cfg: CurationConfig) -> float | None:
    """The edge-case share the gate expects: config, else the batch's generation setting, else
    the taxonomy file (include/rubrics/taxonomy.yaml), else seed 001's 15%."""
    if cfg.edge_case_tolerance is None:
        return None
    if cfg.edge_case_target is not None:
        return cfg.edge_case_target
    if session is not None and cfg.batch_id:
        batch = session.get(GenerationBatch, cfg.batch_id)
        share = (batch.params or {}).get("edge_case_share") if batch else None
        if share is not None:
            return float(share)
    try:
        from tasks.generate.taxonomy import load_taxonomy

        return float(load_taxonomy().edge_cases.share)
    except Exception:  # no readable taxonomy: fall back to the seed's default
        log.warning("taxonomy not readable; edge-case target falls back to %.2f",
                    DEFAULT_EDGE_CASE_SHARE, exc_info=True)
        return DEFAULT_EDGE_CASE_SHARE


# ---- export rows, gate frame, stats ------------------------------------------------------------
def _persona_names(row: CandidateRow) -> set[str]:
    names = set()
    if row.persona.get("name"):
        names.add(str(row.persona["name"]))
        names.update(p for p in str(row.persona["name"]).split() if len(p) >= 3)
    return names | deid.names_in(row.persona.get("attributes") or {})


@dataclass
class Exported:
    """Export rows plus what the gate checks about them."""

    rows: list[ExportRow]
    texts: list[str]  # joined message texts, what the PII expectation scans
    name_hits: list[int]  # known persona names still present per row (must be 0)
    scrubbed_rows: int  # rows whose text changed by scrubbing


def export_rows(rows: Sequence[CandidateRow], cfg: CurationConfig) -> Exported:
    """De-identified export rows with their provenance metadata."""
    out: list[ExportRow] = []
    texts: list[str] = []
    name_hits: list[int] = []
    scrubbed = 0
    for row in rows:
        names = _persona_names(row) if cfg.scrub_persona_names else set()
        chat = chat_messages(row.system_prompt, row.messages)
        clean = deid.scrub_messages(chat, names)
        if clean != chat:
            scrubbed += 1
        metadata = {
            "conversation_id": row.conversation_id,
            "batch_id": row.batch_id,
            "split": row.split,
            "persona": {"id": row.persona_id,
                        "attributes": deid.scrub_value(row.persona.get("attributes") or {},
                                                       names)},
            "taxonomy_cell": row.taxonomy_cell,
            "is_edge_case": row.is_edge_case,
            "tags": deid.scrub_value(row.tags, names),
            "scores": {"hallucination_score": row.hallucination_score,
                       "emotion_confidence": row.emotion_confidence,
                       "rubric_score": row.rubric_score,
                       "rubric_passed": (row.rubric or {}).get("passed"),
                       "turns": row.turns, "words": row.words, "tokens": row.tokens},
            "rubric": ({k: row.rubric.get(k) for k in ("rubric_version", "failed_criteria",
                                                       "judges")} if row.rubric else None),
            "template_hashes": row.template_hashes,
            "model": row.model,
            "content_hash": row.content_hash,
        }
        out.append(ExportRow(item_id=row.conversation_id, split=row.split, messages=clean,
                             metadata=metadata, conversation_id=row.conversation_id))
        text = "\n".join(m["content"] for m in clean)
        texts.append(text)
        name_hits.append(len(deid.find_names(text, names)) if names else 0)
    return Exported(out, texts, name_hits, scrubbed)


def gate_frame(rows: Sequence[CandidateRow], texts: Sequence[str], cfg: CurationConfig,
               name_hits: Sequence[int] | None = None):
    """The pandas frame the gate validates (columns: tasks.datasets.gate.CURATED_COLUMNS)."""
    import pandas as pd

    if name_hits is None:
        name_hits = [0] * len(rows)
    return pd.DataFrame({
        "conversation_id": [r.conversation_id for r in rows],
        "content_hash": [r.content_hash for r in rows],
        "persona_id": [r.persona_id for r in rows],
        "topic": [r.topic for r in rows],
        "is_edge_case": np.asarray([float(r.is_edge_case) for r in rows], dtype=float),
        "hallucination_score": np.asarray(
            [np.nan if r.hallucination_score is None else r.hallucination_score for r in rows],
            dtype=float),
        "emotion_confidence": np.asarray(
            [np.nan if r.emotion_confidence is None else r.emotion_confidence for r in rows],
            dtype=float),
        "missing_taggers": np.asarray(
            [sum(1 for t in cfg.required_taggers if t not in r.tags) for r in rows], dtype=int),
        "rubric_passed": [bool((r.rubric or {}).get("passed")) for r in rows],
        "safety_failed": [bool((r.rubric or {}).get("safety_failed")) for r in rows],
        "turns": np.asarray([r.turns for r in rows], dtype=int),
        "words": np.asarray([r.words for r in rows], dtype=int),
        "tokens": np.asarray([r.tokens for r in rows], dtype=int),
        "text": list(texts),
        "pii_name_hits": np.asarray(name_hits, dtype=int),
    })


def _labels(output: dict[str, Any]) -> list[str]:
    """Short categorical labels in a tagger output (lists of strings, short strings)."""
    labels: list[str] = []
    for key, value in output.items():
        if key in ("confidence", "hallucination_score", "reasoning", "claims", "beliefs",
                   "stances", "raw", "backend", "method"):
            continue
        if isinstance(value, str) and 0 < len(value) <= 40:
            labels.append(value)
        elif isinstance(value, list):
            labels.extend(v for v in value if isinstance(v, str) and 0 < len(v) <= 40)
    return labels


def build_stats(rows: Sequence[CandidateRow], kept: Sequence[CandidateRow],
                exclusions: Sequence[dict[str, Any]], cfg: CurationConfig,
                dedup: dict[str, Any], exported: Exported) -> dict[str, Any]:
    """kept/dropped per reason, score histograms (kept vs dropped), tag frequencies (from the
    de-identified tags: labels are free text a tagger wrote), topics, lengths."""
    kept_ids = {r.conversation_id for r in kept}
    dropped_rows = [r for r in rows if r.conversation_id not in kept_ids]
    by_reason = Counter(e["reason"] for e in exclusions)
    frequencies: dict[str, Counter] = {}
    for export_row in exported.rows:
        for tagger, output in export_row.metadata.get("tags", {}).items():
            if isinstance(output, dict):
                frequencies.setdefault(tagger, Counter()).update(_labels(output))

    def hist(values_kept: list, values_dropped: list, threshold: float | None) -> dict:
        k = histogram(values_kept)
        d = histogram(values_dropped)
        return {"edges": k["edges"], "kept": {"counts": k["counts"]},
                "dropped": {"counts": d["counts"]}, "threshold": threshold}

    tokens = [r.tokens for r in kept]
    return {
        "candidates": len(rows),
        "kept": len(kept),
        "excluded": len(dropped_rows),
        "train": sum(1 for r in kept if r.split == "train"),
        "validation": sum(1 for r in kept if r.split == "validation"),
        "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda x: (-x[1], x[0]))),
        "histograms": {
            "hallucination_score": hist(
                [r.hallucination_score for r in kept], [r.hallucination_score for r in dropped_rows],
                cfg.max_hallucination),
            "emotion_confidence": hist(
                [r.emotion_confidence for r in kept], [r.emotion_confidence for r in dropped_rows],
                cfg.min_emotion_confidence),
        },
        "tag_frequencies": {t: dict(c.most_common(50)) for t, c in sorted(frequencies.items())},
        "topics": dict(Counter(r.topic for r in kept).most_common()),
        "personas": len({r.persona_id for r in kept}),
        "edge_case_share": (sum(r.is_edge_case for r in kept) / len(kept)) if kept else None,
        "max_tokens": max(tokens) if tokens else 0,
        "mean_tokens": (sum(tokens) / len(tokens)) if tokens else 0,
        "pii_scrubbed_rows": exported.scrubbed_rows,
        "dedup": dedup,
    }


# ---- the stage ---------------------------------------------------------------------------------
def curate(cfg: CurationConfig | None = None, *, engine: Engine | None = None) -> dict[str, Any]:
    """Filter, gate and snapshot the candidate conversations. Returns the XCom-sized result:
    {"dataset_id", "gate_passed", "failed_expectations", "counts", "artifact_uri", "train_path",
    "val_path", "data_docs", "content_hash", "created", "timings"}."""
    cfg = cfg or CurationConfig()
    with session_scope(engine) as session:
        rows = load_candidates(session, cfg)
        target = resolve_edge_case_target(session, cfg)
    if not rows:
        where = f"batch {cfg.batch_id!r}" if cfg.batch_id else "the database"
        raise CurationError(f"no conversations in {where}; generate (and tag) a batch first, "
                            "or set batch_id to an existing generation batch")
    return curate_rows(rows, cfg, engine=engine, edge_case_target=target)


def curate_rows(rows: Sequence[CandidateRow], cfg: CurationConfig, *,
                engine: Engine | None = None, edge_case_target: float | None = None,
                counter: TokenCounter | None = None, record: bool = True) -> dict[str, Any]:
    """The curation pipeline on in-memory candidate rows (what `curate` runs after loading)."""
    from tasks.datasets.gate import run_curated_gate

    clock = _Stopwatch()
    with clock("measure"):
        measure_rows(rows, cfg, counter)
    with clock("filter"):
        kept, exclusions, dedup = apply_filters(rows, cfg)
        assign_splits(kept, cfg.val_fraction, cfg.seed)
    with clock("deidentify"):
        exported = export_rows(kept, cfg)
    if edge_case_target is None and cfg.edge_case_tolerance is not None:
        edge_case_target = (cfg.edge_case_target if cfg.edge_case_target is not None
                            else resolve_edge_case_target(None, cfg))
    filters = cfg.fingerprint(edge_case_target)
    snapshot_content_hash = snapshot_hash(DATASET_KIND, exported.rows, filters)
    dataset_id = snapshot_content_hash[:16]
    final = snapshot_dir(dataset_id)
    existing = existing_dataset(engine, snapshot_content_hash) if record else None
    stats = build_stats(rows, kept, exclusions, cfg, dedup, exported)
    counts = {k: stats[k] for k in ("candidates", "kept", "excluded", "train", "validation",
                                    "dropped_by_reason", "max_tokens")}

    created = False
    if existing is not None and snapshot_complete(final):
        gate_result = dict(existing.gate_result)
        log.info("dataset %s already exists with the same content; nothing to do", dataset_id)
    elif snapshot_complete(final):
        gate_result = _read_gate_result(final)
    else:
        with SnapshotWriter(dataset_id) as writer:
            with clock("gate"):
                frame = gate_frame(kept, exported.texts, cfg, exported.name_hits)
                gate_result = run_curated_gate(frame, _gate_spec(cfg, edge_case_target),
                                               docs_dir=writer.tmp / "gate" / "data_docs")
            with clock("write"):
                files = write_formats(writer.tmp, exported.rows, cfg.formats)
                write_json(writer.tmp / "stats" / "stats.json", stats)
                write_stat_plots(writer.tmp / "stats", stats)
                write_jsonl(writer.tmp / "exclusions.jsonl", (deid.scrub_value(
                    {**e, "explanation": explain(e["reason"], e["detail"])})
                    for e in exclusions))
            gate_result = _relative_docs(gate_result, writer.tmp)
            write_json(writer.tmp / "gate" / "result.json", gate_result)
            write_json(writer.tmp / MANIFEST, manifest(
                dataset_id, DATASET_KIND, snapshot_content_hash, filters, counts, files,
                gate_result))
            created = writer.commit()
        if not created:
            gate_result = _read_gate_result(final)
    gate_result = _absolute_docs(gate_result, final)
    if existing is None and record:
        with clock("record"):
            record_snapshot(engine, dataset={
                "id": dataset_id, "name": cfg.name, "kind": DATASET_KIND,
                "content_hash": snapshot_content_hash, "filters": filters, "counts": counts,
                "gate_passed": bool(gate_result["success"]), "gate_result": gate_result,
                "artifact_uri": final.as_uri(),
            }, rows=exported.rows, exclusions=exclusions)
    passed = bool(gate_result["success"])
    log_fn = log.info if passed else log.warning
    log_fn("dataset %s: %d kept of %d, gate %s%s", dataset_id, len(kept), len(rows),
           "passed" if passed else "FAILED",
           "" if passed else f" ({', '.join(gate_result['failed_expectations'])})")
    primary = "openai" if "openai" in cfg.formats else cfg.formats[0]
    return {
        "dataset_id": dataset_id,
        "gate_passed": passed,
        "failed_expectations": list(gate_result["failed_expectations"]),
        "counts": counts,
        "artifact_uri": final.as_uri(),
        "train_path": str(format_path(final, primary, "train")),
        "val_path": str(format_path(final, primary, "validation")),
        "data_docs": gate_result.get("data_docs"),
        "content_hash": snapshot_content_hash,
        "created": created,
        "timings": clock.seconds(),
    }


class _Stopwatch:
    """Wall time per named stage (logged and returned, so slow stages are visible in XCom)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._seconds.items()}


def _gate_spec(cfg: CurationConfig, edge_case_target: float | None):
    from tasks.datasets.gate import GateSpec

    return GateSpec(
        max_hallucination=cfg.max_hallucination,
        min_emotion_confidence=cfg.min_emotion_confidence,
        required_taggers=cfg.required_taggers, require_rubric_pass=cfg.require_rubric_pass,
        max_turns=cfg.max_turns, min_words=cfg.min_words, max_words=cfg.max_words,
        sequence_len=cfg.sequence_len, edge_case_target=edge_case_target,
        edge_case_tolerance=cfg.edge_case_tolerance or 0.0, min_rows=cfg.min_rows,
        min_topic_diversity=cfg.min_topic_diversity,
        min_persona_diversity=cfg.min_persona_diversity)


def _relative_docs(gate_result: dict[str, Any], root: Path) -> dict[str, Any]:
    docs = gate_result.get("data_docs")
    if docs:
        gate_result = {**gate_result, "data_docs": str(Path(docs).relative_to(root))}
    return gate_result


def _absolute_docs(gate_result: dict[str, Any], root: Path) -> dict[str, Any]:
    docs = gate_result.get("data_docs")
    if docs and not Path(docs).is_absolute():
        gate_result = {**gate_result, "data_docs": str(root / docs)}
    return gate_result


def _read_gate_result(root: Path) -> dict[str, Any]:
    import json

    return json.loads((root / "gate" / "result.json").read_text(encoding="utf-8"))


# ---- explainability ----------------------------------------------------------------------------
def explain_exclusion(session: Session, conversation_id: str) -> list[dict[str, Any]]:
    """Why a conversation is not in each dataset that considered it, newest dataset first:
    [{"dataset_id", "dataset_name", "dataset_kind", "reason", "detail", "explanation",
    "created_at"}]. Empty when it was never excluded."""
    stmt = (select(DatasetExclusion, Dataset.name, Dataset.kind, Dataset.created_at)
            .join(Dataset, Dataset.id == DatasetExclusion.dataset_id)
            .where(DatasetExclusion.conversation_id == conversation_id)
            .order_by(Dataset.created_at.desc(), Dataset.id, DatasetExclusion.reason))
    return [{
        "dataset_id": exclusion.dataset_id,
        "dataset_name": name,
        "dataset_kind": kind,
        "reason": exclusion.reason,
        "detail": exclusion.detail,
        "explanation": explain(exclusion.reason, exclusion.detail),
        "created_at": created_at.isoformat() if created_at else None,
    } for exclusion, name, kind, created_at in session.execute(stmt)]
