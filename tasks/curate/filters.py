"""The curation filters: pure row filters, exact and near-duplicate pruning, and the seeded split.

Each row filter (seed 000 §6) is a pure function of (row, config) returning an `Exclusion` (a
reason from `REASONS` plus the observed value and threshold) or None; `apply_filters` records every
failing filter of a row, then drops exact content duplicates and prunes near duplicates by cosine
(greedy in priority order, so the best-scored row of a group survives: exact blocked matrix
products up to `exact_limit` rows, random-hyperplane LSH verified with exact cosine beyond, both
from `tasks.core.similarity`), and `assign_splits` splits the kept rows seeded by conversation id.
`explain` turns an exclusion into one readable line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.core.ids import stable_id
from tasks.core.similarity import (
    conversation_text,
    greedy_prune,
    resolve_method,
    similar_pairs,
    unit,
)
from tasks.curate.config import CurationConfig
from tasks.curate.rows import CandidateRow

log = logging.getLogger(__name__)

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


# ---- near duplicates (the search is tasks.core.similarity's) -----------------------------------
def near_duplicates(ids: Sequence[str], vectors: np.ndarray, threshold: float, *,
                    method: str = "auto", exact_limit: int = 20000, seed: int = 0
                    ) -> tuple[dict[int, tuple[int, float]], str]:
    """Greedy pruning in the given (priority) order: index -> (kept index it duplicates, cosine).

    A row is dropped when it is at least `threshold` similar to an earlier row that was kept.
    Returns the drops and the method used ("exact" or "lsh").
    """
    method = resolve_method(method, len(ids), exact_limit)
    pairs, method = similar_pairs(unit(np.asarray(vectors, dtype=np.float32)), threshold,
                                  method=method, seed=seed)
    return greedy_prune(pairs), method


def _priority(row: CandidateRow) -> tuple:
    """Which row of a duplicate group survives: best rubric, least hallucination, then id."""
    rubric = row.rubric_score if row.rubric_score is not None else -1.0
    halluc = row.hallucination_score if row.hallucination_score is not None else 1.0
    return (-rubric, halluc, row.conversation_id)


def _embeddings_for(rows: Sequence[CandidateRow]) -> np.ndarray:
    missing = [i for i, r in enumerate(rows) if r.embedding is None or len(r.embedding) == 0]
    if missing:
        from tasks.core.embeddings import embed

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

