"""The text the detectors read: NFKC-folded, invisible characters dropped, offsets kept.

Users (and attackers) write ``ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ`` or hide a zero-width space inside a
card number; the recognizers are written for ordinary characters. `DetectionView` folds each
character with NFKC (full-width → ASCII, ligatures split), drops format characters (zero-width
spaces and joiners, soft hyphens, bidi marks) and keeps, for every folded character, the index of
the original character it came from, so a span found in the view maps back to the exact span of
the original text. ASCII text (the common case) is its own view: no copy, no map.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache


@lru_cache(maxsize=4096)
def _fold(char: str) -> str:
    if unicodedata.category(char) == "Cf":  # zero-width space/joiner, soft hyphen, bidi marks
        return ""
    return unicodedata.normalize("NFKC", char)


class DetectionView:
    """`text` as the detectors see it, with the map back to `original` offsets."""

    __slots__ = ("original", "text", "_origin")

    def __init__(self, original: str):
        self.original = original
        if original.isascii():
            self.text = original
            self._origin: list[int] | None = None
            return
        parts: list[str] = []
        origin: list[int] = []
        for index, char in enumerate(original):
            folded = char if char.isascii() else _fold(char)
            parts.append(folded)
            origin.extend([index] * len(folded))
        self.text = "".join(parts)
        self._origin = origin

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span of the view's [start, end)."""
        if self._origin is None or start >= end:
            return start, end
        first = self._origin[start]
        last = self._origin[end - 1] + 1
        # Swallow invisible characters that sat right after the span in the original.
        while last < len(self.original) and _fold(self.original[last]) == "":
            last += 1
        return first, last
