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

from tasks.embeddings import EMBEDDING_DIM

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
    from tasks.embeddings import embed

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

    The best hit is ranked by margin over its threshold, so the two kinds compare fairly.
    """
    margin_o = np.where(sim_o >= t_o, sim_o - t_o, -np.inf)
    margin_c = np.where(sim_c >= t_c, sim_c - t_c, -np.inf)
    best_o = margin_o.argmax(axis=1)
    best_c = margin_c.argmax(axis=1)
    rows = np.arange(sim_o.shape[0])
    top_o = margin_o[rows, best_o]
    top_c = margin_c[rows, best_c]
    use_c = top_c > top_o
    column = np.where(use_c, best_c, best_o)
    similarity = np.where(use_c, sim_c[rows, best_c], sim_o[rows, best_o])
    hit = np.isfinite(np.maximum(top_o, top_c))
    return hit, column, use_c.astype(np.int8), similarity


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

        # 1. against the stored set, in column blocks to bound memory
        best_sim = np.full(size, -np.inf)
        best_margin = np.full(size, -np.inf)
        best_col = np.zeros(size, dtype=np.int64)
        best_kind = np.zeros(size, dtype=np.int8)
        for s_start in range(0, len(stored_ids), block_size * 4):
            s_stop = min(s_start + block_size * 4, len(stored_ids))
            hit, column, kind, similarity = _best_over_threshold(
                b_open @ s_open[s_start:s_stop].T, b_conv @ s_conv[s_start:s_stop].T,
                opening_threshold, conversation_threshold)
            thresholds = np.where(kind == 1, conversation_threshold, opening_threshold)
            margin = np.where(hit, similarity - thresholds, -np.inf)
            better = margin > best_margin
            best_margin = np.where(better, margin, best_margin)
            best_sim = np.where(better, similarity, best_sim)
            best_col = np.where(better, column + s_start, best_col)
            best_kind = np.where(better, kind, best_kind)
        for row in np.flatnonzero(np.isfinite(best_margin)):
            is_dup[row] = True
            duplicates.append(Duplicate(start + int(row), stored_ids[int(best_col[row])],
                                        kinds[int(best_kind[row])], round(float(best_sim[row]), 4),
                                        "stored"))

        # 2. against conversations kept from earlier blocks
        if kept:
            hit, column, kind, similarity = _best_over_threshold(
                b_open @ kept_open[:kept].T, b_conv @ kept_conv[:kept].T,
                opening_threshold, conversation_threshold)
            for row in np.flatnonzero(hit & ~is_dup):
                is_dup[row] = True
                duplicates.append(Duplicate(
                    start + int(row), ids[int(kept_index[column[row]])], kinds[int(kind[row])],
                    round(float(similarity[row]), 4), "batch"))

        # 3. within the block, greedily in order
        within_o = b_open @ b_open.T
        within_c = b_conv @ b_conv.T
        over = (within_o >= opening_threshold) | (within_c >= conversation_threshold)
        block_kept: list[int] = []
        for row in range(size):
            if is_dup[row]:
                continue
            if block_kept:
                earlier = np.asarray(block_kept)
                matches = earlier[over[row, earlier]]
                if matches.size:
                    margins = np.maximum(within_o[row, matches] - opening_threshold,
                                         within_c[row, matches] - conversation_threshold)
                    best = int(matches[int(margins.argmax())])
                    use_c = (within_c[row, best] - conversation_threshold
                             > within_o[row, best] - opening_threshold)
                    is_dup[row] = True
                    duplicates.append(Duplicate(
                        start + row, ids[start + best], kinds[int(use_c)],
                        round(float(within_c[row, best] if use_c else within_o[row, best]), 4),
                        "batch"))
                    continue
            block_kept.append(row)
        for row in block_kept:
            kept_open[kept] = b_open[row]
            kept_conv[kept] = b_conv[row]
            kept_index[kept] = start + row
            kept += 1

    duplicates.sort(key=lambda d: d.index)
    return duplicates
