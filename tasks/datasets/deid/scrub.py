"""Scrubbing: every detected span becomes a typed placeholder, until nothing is detected.

`scrub_text` replaces each finding of `find_pii` with ``<CATEGORY>`` (``<EMAIL>``, ``<PHONE>``,
``<PERSON>`` …) or, with `Pseudonyms`, with a numbered one that stays the same for the same value
within a conversation (``<PERSON_1>`` is always Priya, ``<PERSON_2>`` always Tom). It then
detects again and repeats: replacing one entity can expose another (text glued to an email),
so the result is *closed* — the detector finds nothing in it — and therefore *idempotent*:
``scrub_text(scrub_text(x)) == scrub_text(x)``. Placeholders contain nothing any recognizer
matches. Should a text still show PII after `MAX_ROUNDS` (never seen; a guard, not a path), it
is replaced whole by ``<REDACTED>`` rather than exported.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import cache, partial
from typing import Any

from tasks.datasets.deid.detect import PiiMatch, find_pii
from tasks.datasets.deid.users import USER_ID_FIELDS, hash_user_id

log = logging.getLogger(__name__)

MAX_ROUNDS = 4
REDACTED = "<REDACTED>"
# Fields whose string values are person names (interaction contexts, persona attributes ...).
NAME_FIELDS = frozenset({
    "name", "user_name", "username", "first_name", "last_name", "full_name", "display_name",
    "given_name", "family_name", "nickname", "author", "author_name", "customer_name",
    "contact_name", "recipient", "sender",
})


def placeholder(kind: str) -> str:
    """The placeholder of a category: ``<EMAIL>``."""
    return f"<{kind}>"


class Pseudonyms:
    """Consistent numbered placeholders for one conversation (or one user's stream).

    The same value (compared case-, space- and punctuation-insensitively, so "+44 20 7946 0958"
    and "+442079460958" are one phone) always gets the same ``<KIND_n>``; a person named in part
    ("Priya" after "Priya Sharma") keeps the full name's pseudonym.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = {}
        self._name_parts: dict[str, str] = {}  # casefolded name part -> its person's pseudonym

    def __call__(self, match: PiiMatch) -> str:
        return self.of(match.kind, match.text)

    def of(self, kind: str, value: str) -> str:
        """The pseudonym of `value` as a `kind` (assigned on first sight, in reading order)."""
        key = (kind, re.sub(r"[\W_]+", "", value.casefold()))
        if key in self._ids:
            return self._ids[key]
        parts = [p for p in re.split(r"[\W_]+", value.casefold()) if len(p) >= 2]
        known = next((self._name_parts[p] for p in parts if p in self._name_parts), None) \
            if kind == "PERSON" else None
        if known is None:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            known = f"<{kind}_{self._counts[kind]}>"
        self._ids[key] = known
        if kind == "PERSON":
            for part in parts:
                self._name_parts.setdefault(part, known)
        return known


@cache
def _anonymizer() -> Any:
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


# Presidio's TextReplaceBuilder rebuilds the whole string per entity (quadratic in entities x
# length: 11k names in 100 KB took 0.4 s, 10x the 10 KB time squared); handing it segments of at
# most this many entities keeps the replacement linear.
_SEGMENT = 64


def _replace(text: str, matches: Sequence[PiiMatch], pseudonyms: Pseudonyms | None) -> str:
    """Presidio's AnonymizerEngine replaces the (non-overlapping, sorted) matches: typed
    placeholders, or pseudonyms assigned beforehand in reading order (the engine works from the
    end), one segment of `_SEGMENT` matches at a time."""
    from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

    kinds = {match.kind for match in matches}
    if pseudonyms is None:
        operators = {kind: OperatorConfig("replace", {"new_value": placeholder(kind)})
                     for kind in kinds}
    else:
        for match in matches:
            pseudonyms(match)
        operators = {kind: OperatorConfig("custom", {"lambda": partial(pseudonyms.of, kind)})
                     for kind in kinds}
    parts: list[str] = []
    cursor = 0
    for first in range(0, len(matches), _SEGMENT):
        group = matches[first:first + _SEGMENT]
        end = group[-1].end if first + _SEGMENT < len(matches) else len(text)
        results = [RecognizerResult(m.kind, m.start - cursor, m.end - cursor, 1.0) for m in group]
        parts.append(_anonymizer().anonymize(text[cursor:end], results, operators).text)
        cursor = end
    return "".join(parts)


def scrub_text(text: str, names: Iterable[str] = (), *, pseudonyms: Pseudonyms | None = None,
               counts: Counter[str] | None = None) -> str:
    """`text` with every PII finding replaced by its placeholder; closed and idempotent.

    `counts`, when given, is incremented per category replaced (what `--report` prints).
    """
    if not text:
        return text
    names = frozenset(names)
    for _ in range(MAX_ROUNDS):
        matches = find_pii(text, names)
        if not matches:
            return text
        if counts is not None:
            counts.update(match.kind for match in matches)
        text = _replace(text, matches, pseudonyms)
    if find_pii(text, names):
        log.warning("a text still showed PII after %d scrubbing rounds; exported as %s",
                    MAX_ROUNDS, REDACTED)
        return REDACTED
    return text


def names_in(value: Any) -> set[str]:
    """Person names found under NAME_FIELDS anywhere in a JSON-like value."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).lower() in NAME_FIELDS and isinstance(item, str):
                found.add(item)
                # "Ada Lovelace" also leaks as "Ada" or "Lovelace" in free text.
                found.update(part for part in item.split() if len(part) >= 3)
            else:
                found |= names_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= names_in(item)
    return found


def scrub_value(value: Any, names: Iterable[str] = (), *, salt: str | None = None,
                pseudonyms: Pseudonyms | None = None, counts: Counter[str] | None = None) -> Any:
    """A de-identified version of a JSON-like value (dicts, lists, strings, scalars).

    Strings are scrubbed; values under NAME_FIELDS become ``<PERSON>``; values under
    USER_ID_FIELDS become salted hashes. A value with nothing to scrub is returned as is (not
    copied); otherwise a scrubbed copy is returned and the input is left untouched.
    """
    names = frozenset(names)
    scrubbed = _scrub_value(value, names, salt, pseudonyms, counts)
    return value if scrubbed == value else scrubbed


def _scrub_value(value: Any, names: frozenset[str], salt: str | None,
                 pseudonyms: Pseudonyms | None, counts: Counter[str] | None) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            lowered = str(key).lower()
            if lowered in NAME_FIELDS and isinstance(item, str):
                if item and not _is_placeholder(item):
                    item = pseudonyms(PiiMatch("PERSON", 0, len(item), item)) \
                        if pseudonyms is not None else placeholder("PERSON")
                    if counts is not None:
                        counts["PERSON"] += 1
                out[key] = item
            elif lowered in USER_ID_FIELDS and isinstance(item, str | int) and item != "":
                out[key] = hash_user_id(str(item), salt)
            else:
                out[key] = _scrub_value(item, names, salt, pseudonyms, counts)
        return out
    if isinstance(value, list | tuple):
        return [_scrub_value(item, names, salt, pseudonyms, counts) for item in value]
    if isinstance(value, str):
        return scrub_text(value, names, pseudonyms=pseudonyms, counts=counts)
    return value


def _is_placeholder(value: str) -> bool:
    return re.fullmatch(r"<[A-Z_]+(?:_\d+)?>", value) is not None


def scrub_messages(messages: Sequence[Mapping[str, Any]], names: Iterable[str] = (), *,
                   pseudonymize: bool = False) -> list[dict[str, Any]]:
    """Chat messages with their `content` scrubbed (roles and other keys kept).

    With `pseudonymize`, one `Pseudonyms` spans the conversation: the same person is the same
    ``<PERSON_n>`` in every message.
    """
    names = frozenset(names)
    pseudonyms = Pseudonyms() if pseudonymize else None
    return [{**dict(m), "content": scrub_text(str(m.get("content", "")), names,
                                              pseudonyms=pseudonyms)} for m in messages]
