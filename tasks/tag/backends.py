"""`get_tagger`: a tagger class from the registry (`tasks.tag.taggers.TAGGERS`) bound to a backend.

`llm` taggers are the classes themselves; the `embedding` (`tasks.tag.embedding`) and `heuristic`
(`tasks.tag.heuristic`) backends wrap a class with their own scoring. Living here, not in
`taggers`, keeps the dependency one way: the backends import the tagger contract, never back.
"""

from __future__ import annotations

from tasks.tag.embedding import EmbeddingTagger
from tasks.tag.heuristic import HeuristicTagger
from tasks.tag.taggers import TAGGER_NAMES, TAGGERS, BaseTagger, UnknownTagger


def get_tagger(name: str, backend: str = "llm", model: str = "") -> BaseTagger:
    """A tagger bound to a backend and model (the embedding/heuristic backends pick their own)."""
    if name not in TAGGERS:
        raise UnknownTagger(f"unknown tagger {name!r}; use some of {', '.join(TAGGER_NAMES)}")
    cls = TAGGERS[name]
    if backend not in cls.backends:
        raise UnknownTagger(f"tagger {name!r} has no {backend!r} backend; use one of "
                            f"{', '.join(cls.backends)}")
    if backend == "embedding":
        return EmbeddingTagger.wrap(cls)
    if backend == "heuristic":
        return HeuristicTagger.wrap(cls)
    return cls(backend=backend, model=model)
