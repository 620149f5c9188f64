"""Sentence embeddings (all-MiniLM-L6-v2, shipped by pip) for dedup and zero-shot tagging."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

EMBEDDING_DIM = 384


@functools.lru_cache(maxsize=1)
def get_embedder():  # -> sentence_transformers.SentenceTransformer
    from sentence_transformers import SentenceTransformer

    from tasks.core.weights import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu")


def embed(texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings, shape (len(texts), 384); cosine = dot product."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    vectors = get_embedder().encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True,
        convert_to_numpy=True, show_progress_bar=False,
    )
    return vectors.astype(np.float32, copy=False)
