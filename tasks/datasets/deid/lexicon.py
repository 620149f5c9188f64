"""The offline name lexicon (`data/*.txt`) and known-name matching, without Presidio.

Importing this module is cheap: `tasks.datasets.deid` imports it at package import, while the
recognizers (and Presidio with them) load on the first detection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache, lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
ENTITY = "PERSON"


def _read_lexicon(name: str) -> frozenset[str]:
    path = DATA / name
    lines = path.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


@cache
def lexicon() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(given names, surnames, ambiguous names), read once."""
    return (_read_lexicon("given_names.txt"), _read_lexicon("surnames.txt"),
            _read_lexicon("ambiguous_names.txt") | _read_lexicon("not_names.txt"))



def _variants(names: Iterable[str]) -> list[str]:
    variants: set[str] = set()
    for name in names:
        name = (name or "").strip()
        if len(name) >= 2:
            variants.update({name, name.title(), name.upper()})
    return sorted(variants, key=len, reverse=True)


@lru_cache(maxsize=4096)
def _known_pattern(names: frozenset[str]) -> re.Pattern[str] | None:
    # Rows of one persona or one context share their names: compile each set once.
    variants = _variants(names)
    if not variants:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in variants) + r")(?!\w)")


def known_name_spans(text: str, names: Iterable[str]) -> list[tuple[int, int]]:
    """Spans of known person names in `text` (whole words)."""
    key = names if isinstance(names, frozenset) else frozenset(names)
    pattern = _known_pattern(key) if key and text else None
    return [m.span() for m in pattern.finditer(text)] if pattern is not None else []
