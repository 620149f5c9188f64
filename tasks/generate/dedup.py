"""Near-duplicate detection with MiniLM embeddings and blocked matrix products.

Two embeddings per conversation (all-MiniLM-L6-v2, L2-normalised, cosine = dot product): one of
the opening user message and one of the whole conversation. A conversation is a near-duplicate
when either cosine similarity reaches its threshold against

1. the *stored set* (ok conversations of other batches, loaded once per pass), or
2. an earlier *kept* conversation of the same set (greedy in item order, so the result is
   deterministic and the first of a group survives).

The search is blocked: candidates are processed in blocks of `block_size` rows; each block is
compared to the stored set and to the kept set with one (block × n) matrix product per
embedding kind, and within itself with a (block × block) product. Memory stays O(block × n) and
the work is BLAS matrix products instead of Python loops over pairs, so 20k conversations take
seconds. Embedding text: the opening user message; the whole conversation as "role: content"
lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.core.embeddings import EMBEDDING_DIM

DEFAULT_OPENING_THRESHOLD = 0.75
DEFAULT_CONVERSATION_THRESHOLD = 0.90
DEFAULT_BLOCK_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Why item `index` is a duplicate: the id it duplicates, which embedding, how similar."""

    index: int
    duplicate_of: str
    kind: str  # "opening" | "conversation"
    similarity: float
    against: str  # "stored" | "batch"


def opening_text(messages: Sequence[dict[str, str]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def embed_conversations(messages_list: Sequence[Sequence[dict[str, str]]],
                        *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(opening embeddings, whole-conversation embeddings), one row per conversation.

    Both text kinds go through the encoder in one call so it batches them together.
    """
    from tasks.core.embeddings import embed

    n = len(messages_list)
    if n == 0:
        empty = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return empty, empty.copy()
    texts = [opening_text(m) for m in messages_list] + [conversation_text(m) for m in messages_list]
    vectors = embed(texts, batch_size=batch_size)
    return vectors[:n], vectors[n:]


def _as_matrix(vectors: np.ndarray | Sequence[Sequence[float]] | None) -> np.ndarray:
    if vectors is None:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        matrix = matrix.reshape(len(matrix), -1)
    return np.ascontiguousarray(matrix)


def _best_over_threshold(sim_o: np.ndarray, sim_c: np.ndarray, t_o: float,
                         t_c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: any hit, the column of the best hit, its kind (0 opening, 1 conv), similarity.

    The best hit is ranked by margin over its threshold, so the two kinds compare fairly. A row
    maximum first finds the (usually few) rows with any hit; only those are examined further.
    """
    n = sim_o.shape[0]
    hit = (sim_o.max(axis=1, initial=-np.inf) >= t_o) | (sim_c.max(axis=1, initial=-np.inf) >= t_c)
    column = np.zeros(n, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    similarity = np.zeros(n, dtype=np.float32)
    rows = np.flatnonzero(hit)
    if rows.size:
        sub_o, sub_c = sim_o[rows], sim_c[rows]
        margin_o = np.where(sub_o >= t_o, sub_o - t_o, -np.inf)
        margin_c = np.where(sub_c >= t_c, sub_c - t_c, -np.inf)
        best_o = margin_o.argmax(axis=1)
        best_c = margin_c.argmax(axis=1)
        local = np.arange(rows.size)
        use_c = margin_c[local, best_c] > margin_o[local, best_o]
        column[rows] = np.where(use_c, best_c, best_o)
        kind[rows] = use_c.astype(np.int8)
        similarity[rows] = np.where(use_c, sub_c[local, best_c], sub_o[local, best_o])
    return hit, column, kind, similarity


def _best_match(b_open: np.ndarray, b_conv: np.ndarray, ref_open: np.ndarray,
                ref_conv: np.ndarray, t_o: float, t_c: float, chunk: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best hit of each block row over a reference set scanned in column chunks (bounded memory):
    (hit, reference row, kind, similarity)."""
    size = b_open.shape[0]
    best_margin = np.full(size, -np.inf, dtype=np.float32)
    best_sim = np.zeros(size, dtype=np.float32)
    best_col = np.zeros(size, dtype=np.int64)
    best_kind = np.zeros(size, dtype=np.int8)
    for r_start in range(0, ref_open.shape[0], chunk):
        r_stop = min(r_start + chunk, ref_open.shape[0])
        hit, column, kind, similarity = _best_over_threshold(
            b_open @ ref_open[r_start:r_stop].T, b_conv @ ref_conv[r_start:r_stop].T, t_o, t_c)
        if not hit.any():
            continue
        margin = np.where(hit, similarity - np.where(kind == 1, t_c, t_o), -np.inf)
        better = margin > best_margin
        best_margin[better] = margin[better]
        best_sim[better] = similarity[better]
        best_col[better] = column[better] + r_start
        best_kind[better] = kind[better]
    return np.isfinite(best_margin), best_col, best_kind, best_sim


def find_duplicates(
    ids: Sequence[str],
    opening: np.ndarray,
    conversation: np.ndarray,
    *,
    stored_ids: Sequence[str] = (),
    stored_opening: np.ndarray | None = None,
    stored_conversation: np.ndarray | None = None,
    opening_threshold: float = DEFAULT_OPENING_THRESHOLD,
    conversation_threshold: float = DEFAULT_CONVERSATION_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[Duplicate]:
    """Near-duplicates among `ids` (in the given order) vs the stored set and each other."""
    n = len(ids)
    q_open, q_conv = _as_matrix(opening), _as_matrix(conversation)
    if q_open.shape[0] != n or q_conv.shape[0] != n:
        raise ValueError(
            f"got {n} ids but {q_open.shape[0]} opening and {q_conv.shape[0]} conversation "
            "embeddings; pass one row of each per id"
        )
    s_open, s_conv = _as_matrix(stored_opening), _as_matrix(stored_conversation)
    if s_open.shape[0] != len(stored_ids) or s_conv.shape[0] != len(stored_ids):
        raise ValueError("stored_ids, stored_opening and stored_conversation must have equal rows")

    kinds = ("opening", "conversation")
    duplicates: list[Duplicate] = []
    # The kept set grows in preallocated arrays: kept rows are compared to every later block.
    kept_open = np.empty((n, q_open.shape[1]), dtype=np.float32)
    kept_conv = np.empty((n, q_conv.shape[1]), dtype=np.float32)
    kept_index = np.empty(n, dtype=np.int64)
    kept = 0

    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        b_open, b_conv = q_open[start:stop], q_conv[start:stop]
        size = stop - start
        is_dup = np.zeros(size, dtype=bool)

        # 1. against the stored set, in column chunks to bound memory
        hit, column, kind, similarity = _best_match(
            b_open, b_conv, s_open, s_conv, opening_threshold, conversation_threshold,
            block_size * 4)
        for row in np.flatnonzero(hit):
            is_dup[row] = True
            duplicates.append(Duplicate(start + int(row), stored_ids[int(column[row])],
                                        kinds[int(kind[row])], round(float(similarity[row]), 4),
                                        "stored"))

        # 2. against conversations kept from earlier blocks
        if kept:
            hit, column, kind, similarity = _best_match(
                b_open, b_conv, kept_open[:kept], kept_conv[:kept], opening_threshold,
                conversation_threshold, block_size * 4)
            for row in np.flatnonzero(hit & ~is_dup):
                is_dup[row] = True
                duplicates.append(Duplicate(
                    start + int(row), ids[int(kept_index[column[row]])], kinds[int(kind[row])],
                    round(float(similarity[row]), 4), "batch"))

        # 3. within the block, greedily in order (only rows with an earlier match need a look)
        within_o = b_open @ b_open.T
        within_c = b_conv @ b_conv.T
        over = np.tril((within_o >= opening_threshold) | (within_c >= conversation_threshold), -1)
        kept_mask = ~is_dup
        for row in np.flatnonzero(over.any(axis=1)):
            if not kept_mask[row]:
                continue
            matches = np.flatnonzero(over[row, :row] & kept_mask[:row])
            if not matches.size:
                continue
            margins = np.maximum(within_o[row, matches] - opening_threshold,
                                 within_c[row, matches] - conversation_threshold)
            best = int(matches[int(margins.argmax())])
            use_c = (within_c[row, best] - conversation_threshold
                     > within_o[row, best] - opening_threshold)
            kept_mask[row] = False
            duplicates.append(Duplicate(
                start + int(row), ids[start + best], kinds[int(use_c)],
                round(float(within_c[row, best] if use_c else within_o[row, best]), 4), "batch"))
        block_kept = np.flatnonzero(kept_mask)
        kept_open[kept: kept + block_kept.size] = b_open[block_kept]
        kept_conv[kept: kept + block_kept.size] = b_conv[block_kept]
        kept_index[kept: kept + block_kept.size] = start + block_kept
        kept += block_kept.size

    duplicates.sort(key=lambda d: d.index)
    return duplicates
