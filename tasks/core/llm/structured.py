"""Structured output: pull one JSON value out of an LLM reply and validate it with pydantic.

Models wrap JSON in prose, in ```json fences, leave trailing commas, use single quotes or Python
literals (True/None), or stop mid-object when they hit max_tokens. `extract_json` finds the first
balanced ``{...}`` or ``[...]`` that parses (after cheap repairs) and otherwise raises
`StructuredOutputError` saying what was wrong; `parse_structured` adds pydantic validation. Both
are pure functions: the tagger and judge stages reuse them on stored raw outputs.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)```", re.DOTALL)
_OPENERS = {"{": "}", "[": "]"}
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
# Reading every brace of a pathological reply is quadratic; a real reply has few candidates.
_MAX_CANDIDATES = 32


class StructuredOutputError(ValueError):
    """An LLM reply holds no usable JSON (or JSON that fails the schema).

    `raw` is the reply as received, `reason` a one-line cause fit to quote back to the model,
    `errors` the pydantic error list when validation (not parsing) failed.
    """

    def __init__(self, reason: str, *, raw: str | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw
        self.errors = errors or []


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (whole reply, fenced block, or embedded in prose).

    Tolerates trailing commas, single-quoted strings and Python literals. Raises
    StructuredOutputError naming the problem (empty reply, no JSON, unclosed = truncated, or the
    JSON decoder's message for the first candidate).
    """
    if text is None or not text.strip():
        raise StructuredOutputError("the reply is empty; expected a JSON object", raw=text)
    try:
        whole = json.loads(text)
        if isinstance(whole, dict | list):
            return whole
    except ValueError:
        pass

    first_error: str | None = None
    for body in _fenced_blocks(text):
        value, error = _parse_candidate(body.strip())
        if error is None:
            return value
        first_error = first_error or f"the ```json block is not valid JSON: {error}"
    for candidate, start in _balanced_candidates(text):
        value, error = _parse_candidate(candidate)
        if error is None:
            return value
        first_error = first_error or f"the JSON starting at character {start} is invalid: {error}"
    if first_error:
        raise StructuredOutputError(first_error, raw=text)
    opener = _first_opener(text)
    if opener is not None:
        raise StructuredOutputError(
            f"the JSON starting at character {opener} is never closed; the reply looks truncated "
            "(raise max_tokens)",
            raw=text,
        )
    raise StructuredOutputError("the reply contains no JSON object or array", raw=text)


def parse_structured(text: str, schema: type[T]) -> T:
    """`extract_json` then `schema.model_validate`; every failure is a StructuredOutputError."""
    data = extract_json(text)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise StructuredOutputError(
            f"the JSON does not match {schema.__name__}: {describe_validation_error(exc)}",
            raw=text,
            errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors()],
        ) from None


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """`field 'score': Input should be a valid number (got 'high'); ...` — short and quotable."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = err.get("input")
        shown = json.dumps(got, default=str)[:60] if err["type"] != "missing" else None
        parts.append(f"field '{loc}': {err['msg']}" + (f" (got {shown})" if shown else ""))
    more = exc.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# ---- internals --------------------------------------------------------------------------------
def _fenced_blocks(text: str) -> list[str]:
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    # ```json blocks first, then untagged ones; other languages are rarely the answer.
    return ([b for lang, b in blocks if lang == "json"]
            + [b for lang, b in blocks if lang == ""])


def _first_opener(text: str) -> int | None:
    positions = [p for p in (text.find("{"), text.find("[")) if p >= 0]
    return min(positions) if positions else None


def _balanced_candidates(text: str) -> list[tuple[str, int]]:
    """Substrings from an opener to its matching closer, strings (either quote) respected."""
    found: list[tuple[str, int]] = []
    start = 0
    while len(found) < _MAX_CANDIDATES:
        positions = [p for p in (text.find("{", start), text.find("[", start)) if p >= 0]
        if not positions:
            break
        begin = min(positions)
        end = _matching_close(text, begin)
        if end is not None:
            found.append((text[begin:end + 1], begin))
        start = begin + 1
    return found


def _matching_close(text: str, begin: int) -> int | None:
    stack: list[str] = []
    quote: str | None = None
    i = begin
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in ('"', "'"):
            # An apostrophe inside prose-like text ("don't") is not a string opener.
            if ch == '"' or not (i > 0 and text[i - 1].isalnum()):
                quote = ch
        elif ch in _OPENERS:
            stack.append(_OPENERS[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i
        i += 1
    return None


def _parse_candidate(candidate: str) -> tuple[Any, str | None]:
    try:
        return json.loads(candidate), None
    except ValueError as exc:
        error = str(exc)
    try:
        return json.loads(_repair(candidate)), None
    except ValueError:
        return None, error


def _repair(candidate: str) -> str:
    """Single quotes → double, drop trailing commas, Python literals → JSON (outside strings)."""
    out: list[str] = []
    i, n = 0, len(candidate)
    while i < n:
        ch = candidate[i]
        if ch == '"':
            j = i + 1
            while j < n and candidate[j] != '"':
                j += 2 if candidate[j] == "\\" else 1
            out.append(candidate[i:j + 1])
            i = j + 1
        elif ch == "'":
            j = i + 1
            chars: list[str] = []
            while j < n and candidate[j] != "'":
                if candidate[j] == "\\" and j + 1 < n:
                    nxt = candidate[j + 1]
                    chars.append("'" if nxt == "'" else "\\" + nxt)
                    j += 2
                    continue
                chars.append('\\"' if candidate[j] == '"' else candidate[j])
                j += 1
            out.append('"' + "".join(chars) + '"')
            i = j + 1
        elif ch == ",":
            j = i + 1
            while j < n and candidate[j] in " \t\r\n":
                j += 1
            if j < n and candidate[j] in "}]":
                i = j  # trailing comma: skip it
            else:
                out.append(ch)
                i += 1
        elif ch.isalpha():
            j = i
            while j < n and (candidate[j].isalnum() or candidate[j] == "_"):
                j += 1
            word = candidate[i:j]
            out.append(_PY_LITERALS.get(word, word))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)
