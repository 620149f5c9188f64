"""Near-duplicate detection with MiniLM embeddings and blocked matrix products.

Two embeddings per conversation (all-MiniLM-L6-v2, L2-normalised, cosine = dot product): one of
the opening user message and one of the whole conversation. A conversation is a near-duplicate
when either cosine similarity reaches its threshold against

1. the *stored set* (ok conversations of other batches, loaded once per pass), or
2. an earlier *kept* conversation of the same set (greedy in item order, so the result is
   deterministic and the first of a group survives).

The search is `tasks.core.similarity.two_view_duplicates` (blocked matrix products, memory
O(block × n), so 20k conversations take seconds); so are the embedding texts (`opening_text`,
`conversation_text`, re-exported here). This module embeds conversations and names the matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasks.core.embeddings import EMBEDDING_DIM
from tasks.core.similarity import as_matrix, conversation_text, opening_text, two_view_duplicates

__all__ = [
    "DEFAULT_BLOCK_SIZE", "DEFAULT_CONVERSATION_THRESHOLD", "DEFAULT_OPENING_THRESHOLD",
    "Duplicate", "conversation_text", "embed_conversations", "find_duplicates", "opening_text",
]

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
    q_open, q_conv = as_matrix(opening), as_matrix(conversation)
    if q_open.shape[0] != n or q_conv.shape[0] != n:
        raise ValueError(
            f"got {n} ids but {q_open.shape[0]} opening and {q_conv.shape[0]} conversation "
            "embeddings; pass one row of each per id"
        )
    s_open, s_conv = as_matrix(stored_opening), as_matrix(stored_conversation)
    if s_open.shape[0] != len(stored_ids) or s_conv.shape[0] != len(stored_ids):
        raise ValueError("stored_ids, stored_opening and stored_conversation must have equal rows")

    kinds = ("opening", "conversation")
    matches = two_view_duplicates(q_open, q_conv, s_open, s_conv, opening_threshold,
                                  conversation_threshold, block_size)
    return [Duplicate(m.index, stored_ids[m.other] if m.against == "stored" else ids[m.other],
                      kinds[m.kind], round(m.similarity, 4), m.against) for m in matches]
