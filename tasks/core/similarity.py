"""The near-duplicate search engine: cosine similarity over unit vectors, by blocked matrix products.

Two searches share it:

- *pairs within one set* (`similar_pairs`, `greedy_prune`): every pair with cosine >= threshold,
  exactly by blocked matrix products (`exact_pairs`) or, for large sets, random-hyperplane LSH
  candidates verified with exact cosine (`lsh_pairs`); `resolve_method` is the `auto` rule. Curation
  prunes a dataset with it, greedily in priority order.
- *queries against references, two views* (`two_view_duplicates`): each conversation has an opening
  and a whole-conversation vector, each with its own threshold; a query is a duplicate when either
  view reaches its threshold against a reference row or an earlier kept query (greedy in query
  order). Generation drops new conversations with it.

The text forms the vectors embed (`opening_text`, `conversation_text`) live here too. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.core.embeddings import EMBEDDING_DIM

Pairs = dict[tuple[int, int], float]
BestMatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---- text forms ---------------------------------------------------------------------------------
def opening_text(messages: Sequence[dict[str, str]]) -> str:
    """The first user message's content ("" when there is none)."""
    for message in messages:
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """The whole conversation as "role: content" lines."""
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


# ---- vectors ------------------------------------------------------------------------------------
def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def as_matrix(vectors: np.ndarray | Sequence[Sequence[float]] | None,
              dim: int = EMBEDDING_DIM) -> np.ndarray:
    """A contiguous float32 (rows × dim) matrix; None is an empty (0 × dim) one."""
    if vectors is None:
        return np.zeros((0, dim), dtype=np.float32)
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        matrix = matrix.reshape(len(matrix), -1)
    return np.ascontiguousarray(matrix)


# ---- pairs within one set -----------------------------------------------------------------------
def lsh_pairs(vectors: np.ndarray, threshold: float, *, tables: int = 20, bits: int | None = None,
              seed: int = 0) -> Pairs:
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
    pairs: Pairs = {}
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


def exact_pairs(vectors: np.ndarray, threshold: float, block: int = 2048) -> Pairs:
    """All pairs (i < j) with cosine >= threshold, by blocked matrix products (O(n^2) work,
    O(block^2) memory)."""
    n = len(vectors)
    pairs: Pairs = {}
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


def resolve_method(method: str, n: int, exact_limit: int) -> str:
    """The `auto` rule: "exact" up to `exact_limit` rows, "lsh" beyond; other methods as given."""
    if method == "auto":
        return "exact" if n <= exact_limit else "lsh"
    return method


def similar_pairs(vectors: np.ndarray, threshold: float, *, method: str = "auto",
                  exact_limit: int = 20000, seed: int = 0) -> tuple[Pairs, str]:
    """Pairs of unit vectors with cosine >= threshold and the method used ("exact" or "lsh")."""
    method = resolve_method(method, len(vectors), exact_limit)
    pairs = (exact_pairs(vectors, threshold) if method == "exact"
             else lsh_pairs(vectors, threshold, seed=seed))
    return pairs, method


def greedy_prune(pairs: Pairs) -> dict[int, tuple[int, float]]:
    """Greedy pruning in index (priority) order: index -> (kept index it duplicates, cosine).

    A row is dropped when it pairs with an earlier row that was kept; it points to the most
    similar such row (the earliest on a tie).
    """
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for (i, j), sim in pairs.items():
        neighbours.setdefault(j, []).append((i, sim))  # i < j: i comes first in priority order
    dropped: dict[int, tuple[int, float]] = {}
    for j in sorted(neighbours):
        kept = [(i, s) for i, s in neighbours[j] if i not in dropped]
        if kept:
            dropped[j] = max(kept, key=lambda x: (x[1], -x[0]))
    return dropped


# ---- queries against references, two views -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class ViewMatch:
    """Query `index` duplicates row `other` of the reference set ("stored") or of the queries
    ("batch"), by view `kind` (0 opening, 1 conversation) with cosine `similarity`."""

    index: int
    other: int
    kind: int
    similarity: float
    against: str  # "stored" | "batch"


def best_over_threshold(sim_o: np.ndarray, sim_c: np.ndarray, t_o: float,
                        t_c: float) -> BestMatch:
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


def best_match(q_open: np.ndarray, q_conv: np.ndarray, ref_open: np.ndarray,
               ref_conv: np.ndarray, t_o: float, t_c: float, chunk: int) -> BestMatch:
    """Best hit of each query row over a reference set scanned in column chunks (bounded memory):
    (hit, reference row, kind, similarity)."""
    size = q_open.shape[0]
    best_margin = np.full(size, -np.inf, dtype=np.float32)
    best_sim = np.zeros(size, dtype=np.float32)
    best_col = np.zeros(size, dtype=np.int64)
    best_kind = np.zeros(size, dtype=np.int8)
    for r_start in range(0, ref_open.shape[0], chunk):
        r_stop = min(r_start + chunk, ref_open.shape[0])
        hit, column, kind, similarity = best_over_threshold(
            q_open @ ref_open[r_start:r_stop].T, q_conv @ ref_conv[r_start:r_stop].T, t_o, t_c)
        if not hit.any():
            continue
        margin = np.where(hit, similarity - np.where(kind == 1, t_c, t_o), -np.inf)
        better = margin > best_margin
        best_margin[better] = margin[better]
        best_sim[better] = similarity[better]
        best_col[better] = column[better] + r_start
        best_kind[better] = kind[better]
    return np.isfinite(best_margin), best_col, best_kind, best_sim


def _within_block(b_open: np.ndarray, b_conv: np.ndarray, kept_mask: np.ndarray, start: int,
                  t_o: float, t_c: float) -> list[ViewMatch]:
    """Greedy in order within one block: rows matching an earlier kept row of the block (clears
    their `kept_mask` entry in place). Only rows with an earlier match need a look."""
    within_o = b_open @ b_open.T
    within_c = b_conv @ b_conv.T
    over = np.tril((within_o >= t_o) | (within_c >= t_c), -1)
    found: list[ViewMatch] = []
    for row in np.flatnonzero(over.any(axis=1)):
        if not kept_mask[row]:
            continue
        matches = np.flatnonzero(over[row, :row] & kept_mask[:row])
        if not matches.size:
            continue
        margins = np.maximum(within_o[row, matches] - t_o, within_c[row, matches] - t_c)
        best = int(matches[int(margins.argmax())])
        use_c = within_c[row, best] - t_c > within_o[row, best] - t_o
        kept_mask[row] = False
        found.append(ViewMatch(start + int(row), start + best, int(use_c),
                               float(within_c[row, best] if use_c else within_o[row, best]),
                               "batch"))
    return found


def two_view_duplicates(q_open: np.ndarray, q_conv: np.ndarray, ref_open: np.ndarray,
                        ref_conv: np.ndarray, t_o: float, t_c: float, block_size: int
                        ) -> list[ViewMatch]:
    """Queries (in order) that duplicate a reference row or an earlier kept query, by index.

    A query is a duplicate when its opening cosine reaches `t_o` or its conversation cosine
    reaches `t_c` (>=) against (1) the reference set or (2) a query kept before it. Blocked:
    each block of `block_size` queries meets the references and the kept queries with one
    (block × n) product per view, in column chunks, and itself with a (block × block) one.
    """
    n = q_open.shape[0]
    found: list[ViewMatch] = []
    # The kept set grows in preallocated arrays: kept rows are compared to every later block.
    kept_open = np.empty((n, q_open.shape[1]), dtype=np.float32)
    kept_conv = np.empty((n, q_conv.shape[1]), dtype=np.float32)
    kept_index = np.empty(n, dtype=np.int64)
    kept = 0
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        b_open, b_conv = q_open[start:stop], q_conv[start:stop]
        is_dup = np.zeros(stop - start, dtype=bool)
        hit, column, kind, similarity = best_match(b_open, b_conv, ref_open, ref_conv, t_o, t_c,
                                                   block_size * 4)
        for row in np.flatnonzero(hit):
            is_dup[row] = True
            found.append(ViewMatch(start + int(row), int(column[row]), int(kind[row]),
                                   float(similarity[row]), "stored"))
        if kept:
            hit, column, kind, similarity = best_match(
                b_open, b_conv, kept_open[:kept], kept_conv[:kept], t_o, t_c, block_size * 4)
            for row in np.flatnonzero(hit & ~is_dup):
                is_dup[row] = True
                found.append(ViewMatch(start + int(row), int(kept_index[column[row]]),
                                       int(kind[row]), float(similarity[row]), "batch"))
        kept_mask = ~is_dup
        found.extend(_within_block(b_open, b_conv, kept_mask, start, t_o, t_c))
        block_kept = np.flatnonzero(kept_mask)
        kept_open[kept: kept + block_kept.size] = b_open[block_kept]
        kept_conv[kept: kept + block_kept.size] = b_conv[block_kept]
        kept_index[kept: kept + block_kept.size] = start + block_kept
        kept += block_kept.size
    found.sort(key=lambda m: m.index)
    return found
