"""Scrubbing a stream of text lines or JSONL records: what `tuneloop scrub` runs.

The same functions as the pipeline (`scrub_text`, `scrub_value`), one line at a time, so a user
can clean a file before sharing it and get exactly what an export would contain. With JSONL,
`fields` names the values to scrub (dotted paths through objects and lists, e.g.
``messages.content``); with no fields every string value is scrubbed and user-id fields are
hashed. Names found under name fields of a record are scrubbed from the rest of that record, and
with `pseudonymize` one record (one conversation) shares its pseudonyms.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tasks.datasets.deid.scrub import Pseudonyms, names_in, scrub_text, scrub_value


class StreamError(ValueError):
    """An input line cannot be read as asked (the message names the line and the fix)."""


def scrub_lines(lines: Iterable[str], *, jsonl: bool = False, fields: Sequence[str] = (),
                pseudonymize: bool = False, counts: Counter[str] | None = None
                ) -> Iterator[str]:
    """Each input line scrubbed (without its line break); `counts` gathers categories."""
    jsonl = jsonl or bool(fields)
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        pseudonyms = Pseudonyms() if pseudonymize else None
        if not jsonl:
            yield scrub_text(line, pseudonyms=pseudonyms, counts=counts)
            continue
        if not line.strip():
            yield line
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise StreamError(
                f"line {number} is not JSON ({exc.msg} at column {exc.colno}); scrub plain "
                "text without --field/--jsonl, or fix the line") from None
        names = names_in(record)
        if fields:
            for field in fields:
                record = _scrub_path(record, field.split("."), names, pseudonyms, counts)
        else:
            record = scrub_value(record, names, pseudonyms=pseudonyms, counts=counts)
        yield json.dumps(record, ensure_ascii=False)


def _scrub_path(value: Any, path: list[str], names: set[str], pseudonyms: Pseudonyms | None,
                counts: Counter[str] | None) -> Any:
    if not path:
        if isinstance(value, str):
            return scrub_text(value, names, pseudonyms=pseudonyms, counts=counts)
        return scrub_value(value, names, pseudonyms=pseudonyms, counts=counts)
    if isinstance(value, list):
        return [_scrub_path(item, path, names, pseudonyms, counts) for item in value]
    if isinstance(value, dict) and path[0] in value:
        return {**value, path[0]: _scrub_path(value[path[0]], path[1:], names, pseudonyms,
                                              counts)}
    return value
