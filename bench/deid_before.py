"""The regex scrubber tuneloop shipped before issue #16 (`git show 41843ec:tasks/datasets/deid.py`),
detection and scrubbing only, kept verbatim so bench/deid.py can measure today's Presidio-based
scrubber against it side by side. Not used by tuneloop itself.
"""
# ruff: noqa
from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Placeholders never match any pattern below (no digits, '@', '://' or long tokens).
PLACEHOLDERS = {
    "url": "[URL]",
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "name": "[NAME]",
}

_SECRET_KEYS = (
    r"access_token|refresh_token|id_token|auth_token|token|api[_-]?key|apikey|key|secret|"
    r"client_secret|password|passwd|pwd|pass|auth|sig|signature|session|sessionid|sid|code|"
    r"otp|x-amz-signature|x-amz-credential|x-amz-security-token"
)
_URL_CHARS = r"[^\s\"'<>()\[\]{}]"
_PHONE_END = r"(?![\w.-]?\d)"
_TOKEN_SEGMENT = r"/(?=[A-Za-z0-9_-]{24,})(?=[A-Za-z_-]*\d)(?=[0-9_-]*[A-Za-z])[A-Za-z0-9_-]{24,}"


@dataclass(frozen=True)
class PiiKind:
    """One kind of PII: the regex whose matches are scrubbed, and its detectors.

    Detectors are equivalent regexes rewritten to start with a literal (the boundary checks move
    into look-behinds), which Python's regex engine scans ~30x faster than a pattern starting
    with a character class. A text contains this kind iff some detector matches it. The gate's
    "no PII" expectation runs the detectors; `find_pii` runs them first, then `pattern` for spans.
    """

    name: str
    pattern: str
    detectors: tuple[str, ...]


PII_KINDS: tuple[PiiKind, ...] = (
    # URL with user:password@ credentials, a secret-named query parameter, or a long token-like
    # path segment (mixed letters and digits, >= 24 chars: reset links, signed URLs).
    PiiKind("url", (
        r"https?://(?:"
        rf"{_URL_CHARS}*?[?&#;](?i:{_SECRET_KEYS})=[^\s&\"'<>]+{_URL_CHARS}*"
        rf"|[^\s/:@\"'<>]+:[^\s/@\"'<>]+@{_URL_CHARS}*"
        rf"|{_URL_CHARS}*?{_TOKEN_SEGMENT}{_URL_CHARS}*"
        r")"
    ), ()),
    # Bare credentials: OpenAI-style keys, GitHub tokens, AWS access key ids, JWTs, bearer tokens.
    PiiKind("secret", (
        r"\b(?:sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}"
        r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
        r"|[Bb]earer\s+[A-Za-z0-9._~+/-]{20,}=*)"
    ), (
        r"sk-(?<!\wsk-)[A-Za-z0-9_-]{20,}",
        r"gh(?<!\wgh)[pousr]_[A-Za-z0-9]{30,}",
        r"AKIA(?<!\wAKIA)[0-9A-Z]{16}",
        r"eyJ(?<!\weyJ)[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        r"earer(?<=\b[Bb]earer)\s+[A-Za-z0-9._~+/-]{20,}",
    )),
    PiiKind("email", (
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
    ), (
        r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    )),
    # Phone numbers: international (+CC ...), North American (555) 123-4567 / 555-123-4567, and
    # trunk-prefixed national numbers (020 7946 0958, 030 1234567). Dates, decimals, versions and
    # bare digit runs (ids, epoch timestamps, dwell times) deliberately do not match.
    PiiKind("phone", (
        r"(?<![\w+.-])(?:"
        r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
        r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
        r"|\d{3}[ .-]\d{3}[ .-]\d{4}"
        r"|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}"
        rf"){_PHONE_END}"
    ), (
        r"\+(?<![\w+.-]\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
        + _PHONE_END,
        r"\((?<![\w+.-]\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}" + _PHONE_END,
        r"-(?<=(?<![\w+.-])\d{3}-)\d{3}[ .-]\d{4}" + _PHONE_END,
        r"\.(?<=(?<![\w+.-])\d{3}\.)\d{3}[ .-]\d{4}" + _PHONE_END,
        r" (?<=(?<![\w+.-])\d{3} )\d{3}[ .-]\d{4}" + _PHONE_END,
        r"0(?<![\w+.-]0)\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}" + _PHONE_END,
    )),
)
# A kind without its own detectors already starts with a literal and detects itself.
PII_KINDS = tuple(k if k.detectors else PiiKind(k.name, k.pattern, (k.pattern,))
                  for k in PII_KINDS)
PII_PATTERNS: dict[str, str] = {kind.name: kind.pattern for kind in PII_KINDS}
# The flat list the gate's regex expectation runs (any match = PII present).
PII_DETECTORS: tuple[str, ...] = tuple(d for kind in PII_KINDS for d in kind.detectors)

# Fields whose string values are person names (in interaction contexts, persona attributes...).
NAME_FIELDS = frozenset({
    "name", "user_name", "username", "first_name", "last_name", "full_name", "display_name",
    "given_name", "family_name", "nickname", "author", "author_name", "customer_name",
    "contact_name", "recipient", "sender",
})
# Fields whose values identify a user: replaced by the salted hash.
USER_ID_FIELDS = frozenset({"user_id", "userid", "user", "user_hash", "account_id", "customer_id"})

_SENSITIVE_FIELDS = NAME_FIELDS | USER_ID_FIELDS
_COMPILED = {kind.name: (re.compile(kind.pattern), tuple(re.compile(d) for d in kind.detectors))
             for kind in PII_KINDS}
_DETECTORS = tuple(d for _, detectors in _COMPILED.values() for d in detectors)


class PiiFound(ValueError):
    """PII was found where none may be (an exported file or artifact)."""

    def __init__(self, findings: list[dict[str, Any]]):
        self.findings = findings
        where = ", ".join(sorted({str(f.get("path", "?")) for f in findings}))
        kinds = ", ".join(sorted({f["kind"] for f in findings}))
        super().__init__(
            f"{len(findings)} PII match(es) of kind {kinds} in {where}; "
            "export through tasks.datasets.deid.scrub_text / scrub_value before writing"
        )


@dataclass(frozen=True)
class PiiMatch:
    """One PII occurrence: its kind, span in the text, and the matched text."""

    kind: str
    start: int
    end: int
    text: str


def _name_variants(names: Iterable[str]) -> list[str]:
    # As written, Title-cased and UPPER-cased; not lower-cased, so that a user called "Will" or
    # "May" does not scrub every "will" and "may" from the text.
    variants: set[str] = set()
    for name in names:
        name = (name or "").strip()
        if len(name) >= 2:
            variants.update({name, name.title(), name.upper()})
    return sorted(variants, key=len, reverse=True)


def _name_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    key = names if isinstance(names, frozenset) else frozenset(names)
    return _compiled_names(key) if key else None


@functools.lru_cache(maxsize=4096)
def _compiled_names(names: frozenset[str]) -> re.Pattern[str] | None:
    # Rows of one persona or one context share their names: compile each set once.
    variants = _name_variants(names)
    if not variants:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in variants) + r")(?!\w)")


def find_names(text: str, names: Iterable[str]) -> list[PiiMatch]:
    """Occurrences of known person names in `text` (whole words)."""
    pattern = _name_pattern(names)
    if pattern is None or not text:
        return []
    return [PiiMatch("name", m.start(), m.end(), m.group()) for m in pattern.finditer(text)]


def find_pii(text: str, names: Iterable[str] = ()) -> list[PiiMatch]:
    """All PII in `text`, non-overlapping, in order (the earliest, then longest, match wins).

    `names` adds person names known from structured fields; they match as whole words, as
    written, Title-cased or UPPER-cased.
    """
    if not text:
        return []
    candidates: list[PiiMatch] = []
    for kind, (pattern, detectors) in _COMPILED.items():
        if not any(detector.search(text) for detector in detectors):
            continue
        candidates.extend(PiiMatch(kind, m.start(), m.end(), m.group()) for m in
                          pattern.finditer(text))
    candidates.extend(find_names(text, names))
    candidates.sort(key=lambda m: (m.start, -(m.end - m.start)))
    chosen: list[PiiMatch] = []
    end = -1
    for match in candidates:
        if match.start >= end:
            chosen.append(match)
            end = match.end
    return chosen


def scrub_text(text: str, names: Iterable[str] = ()) -> str:
    """`text` with every PII match replaced by its placeholder (e.g. ``[EMAIL]``)."""
    matches = find_pii(text, names)
    if not matches:
        return text
    parts: list[str] = []
    cursor = 0
    for match in matches:
        parts.append(text[cursor:match.start])
        parts.append(PLACEHOLDERS[match.kind])
        cursor = match.end
    parts.append(text[cursor:])
    return "".join(parts)
