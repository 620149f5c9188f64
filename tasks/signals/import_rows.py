"""Reading a reaction log and parsing its rows (`tasks.signals.importing` writes them).

Readers yield `SourceRow`s — the values of one record and where it is (the line a CSV record or
JSONL line starts on; the 1-based row of a SQL result) — and check the source's columns once
(a CSV header or SQL result without a mapped column is refused whole: `ImportSourceError`).
`parse_row` turns one row's values into a `ParsedRow` through a `ReactionMapping`, or raises
`RowProblem` with every reason the row is bad (missing column, empty value, unparseable dwell or
timestamp, unknown action). Pure functions; nothing here touches tuneloop's database.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from tasks.signals.import_config import ReactionMapping

# A prompt or answer may be long; csv's default field limit is 128 KiB.
CSV_FIELD_LIMIT = 16 * 1024 * 1024
MISSING: Any = object()  # what `lookup` returns for a column a row lacks


class ImportSourceError(RuntimeError):
    """The source cannot be read as mapped (missing columns, not UTF-8, a failing query); the
    message says what to fix. Nothing was written."""


class RowProblem(ValueError):
    """Why one row cannot be imported (all its reasons, "; "-joined)."""


@dataclass(frozen=True)
class SourceRow:
    """One record: `number` is its line (files) or row (SQL); `values` None when the line is
    not a record at all (`problem` says why)."""

    number: int
    values: Mapping[str, Any] | None
    problem: str | None = None


@dataclass(frozen=True)
class ParsedRow:
    """One reaction event, parsed but not yet de-identified."""

    user: str
    prompt: str | dict[str, Any] | list[Any]  # structured when the source held JSON
    response: str
    action: str
    dwell_ms: int
    timestamp: datetime  # aware, UTC
    fields: dict[str, Any] = field(default_factory=dict)


# ---- values ------------------------------------------------------------------------------------
def lookup(values: Mapping[str, Any], column: str) -> Any:
    """`values[column]`, or a dotted path through nested objects (JSONL, SQL jsonb); a missing
    one is `MISSING`."""
    if column in values:
        return values[column]
    if "." not in column:
        return MISSING
    node: Any = values
    for part in column.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _shown(value: Any) -> str:
    return repr(value if not isinstance(value, str) else value.strip())[:60]


def parse_dwell_ms(value: Any, unit: str) -> int:
    """A dwell in `unit` ("s" or "ms") as whole milliseconds; RowProblem when it is not a
    finite number >= 0."""
    if isinstance(value, bool):
        raise RowProblem(f"unparseable dwell {_shown(value)} (a number of {unit} expected)")
    if isinstance(value, int | float | Decimal):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise RowProblem(f"unparseable dwell {_shown(value)} (dwell_unit: {unit}: a number "
                             f"of {'seconds' if unit == 's' else 'milliseconds'})") from None
    if not math.isfinite(number) or number < 0:
        raise RowProblem(f"dwell {_shown(value)} is not a finite number >= 0")
    return int(round(number * 1000 if unit == "s" else number))


def parse_timestamp(value: Any, fmt: str, timezone: str = "UTC") -> datetime:
    """`value` as an aware UTC datetime: a datetime/date as is, else by `fmt` (iso8601,
    unix_s, unix_ms or a strptime pattern); naive values are read in `timezone`."""
    try:
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, date):
            parsed = datetime.combine(value, time())
        elif fmt in ("unix_s", "unix_ms"):
            if isinstance(value, bool):
                raise ValueError("a boolean")
            seconds = float(str(value).strip()) / (1000 if fmt == "unix_ms" else 1)
            parsed = datetime.fromtimestamp(seconds, UTC)
        elif fmt == "iso8601":
            parsed = datetime.fromisoformat(str(value).strip())
        else:
            parsed = datetime.strptime(str(value).strip(), fmt)
    except (ValueError, OverflowError, OSError):
        raise RowProblem(f"unparseable timestamp {_shown(value)} (timestamp_format: {fmt}; set "
                         "it to match the log, e.g. unix_s or '%d/%m/%Y %H:%M')") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(timezone))
    return parsed.astimezone(UTC)


def _structured(value: Any) -> str | dict[str, Any] | list[Any]:
    """A prompt as text, or as the JSON value it holds (an object/array, as in tip_scores'
    context_json): structured prompts are de-identified field by field."""
    if isinstance(value, dict | list):
        return value
    text = str(value)
    if text.lstrip()[:1] in ("{", "["):
        try:
            parsed = json.loads(text)
        except ValueError:
            return text
        if isinstance(parsed, dict | list):
            return parsed
    return text


def _text(value: Any) -> str:
    from tasks.core.ids import canonical_json

    return canonical_json(value) if isinstance(value, dict | list) else str(value)


def selected(values: Mapping[str, Any], mapping: ReactionMapping) -> bool:
    """False when the row fails one of the mapping's `where` filters (filtered out, not bad); a
    row missing a `where` column is not filtered here: parse_row reports it bad."""
    for column, allowed in mapping.where.items():
        value = lookup(values, column)
        if value is not MISSING and str(value if value is not None else "").strip() \
                not in allowed:
            return False
    return True


def parse_row(values: Mapping[str, Any], mapping: ReactionMapping, *,
              not_after: datetime | None = None) -> ParsedRow:
    """One source row → a ParsedRow, or RowProblem with every reason it is bad. A timestamp
    later than `not_after` is bad too (a clock or time zone mix-up)."""
    raw: dict[str, Any] = {}
    problems: list[str] = []
    missing = [c for c in mapping.required_columns() if lookup(values, c) is MISSING]
    if missing:
        problems.append("missing column " + ", ".join(repr(c) for c in missing))
    for name in ("user", "prompt", "response", "action", "dwell", "timestamp"):
        column = getattr(mapping.columns, name)
        value = lookup(values, column)
        if value is MISSING:
            continue
        if _blank(value):
            problems.append(f"empty {name} (column {column!r})")
            continue
        raw[name] = value
    parsed: dict[str, Any] = {}
    if "dwell" in raw:
        try:
            parsed["dwell_ms"] = parse_dwell_ms(raw["dwell"], mapping.dwell_unit)
        except RowProblem as exc:
            problems.append(str(exc))
    if "timestamp" in raw:
        try:
            parsed["timestamp"] = parse_timestamp(raw["timestamp"], mapping.timestamp_format,
                                                  mapping.timezone)
        except RowProblem as exc:
            problems.append(str(exc))
        else:
            if not_after is not None and parsed["timestamp"] > not_after:
                problems.append(f"timestamp {_shown(raw['timestamp'])} is in the future "
                                f"(after {not_after.isoformat()}); check timezone:")
    if "action" in raw:
        action = mapping.reaction_of(str(raw["action"]))
        if action is None:
            shown = str(raw["action"]).strip()[:40]
            problems.append(f"unknown action {shown!r}; map it under actions: (e.g. {shown}: "
                            "done) or leave such rows out with where:")
        parsed["action"] = action
    if problems:
        raise RowProblem("; ".join(problems))
    fields = {c: v for c in mapping.context_columns
              if (v := lookup(values, c)) is not MISSING and not _blank(v)}
    return ParsedRow(user=str(raw["user"]).strip(), prompt=_structured(raw["prompt"]),
                     response=_text(raw["response"]), action=parsed["action"],
                     dwell_ms=parsed["dwell_ms"], timestamp=parsed["timestamp"],
                     fields=_jsonable(fields))


def _jsonable(value: Any) -> Any:
    """SQL values (Decimal, datetime ...) as JSON-able ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


# ---- readers -----------------------------------------------------------------------------------
def _check_columns(have: list[str], mapping: ReactionMapping, where: str) -> None:
    """A flat source (CSV header, SQL result) must have every mapped column."""
    missing = [c for c in mapping.required_columns() if c not in have]
    if missing:
        raise ImportSourceError(
            f"{where} has no column {', '.join(repr(c) for c in missing)} (mapping "
            f"{mapping.path or mapping.name}); its columns are {', '.join(have) or 'none'}: "
            "fix the mapping's columns: or the source")


def read_csv(path: str | Path, mapping: ReactionMapping) -> Iterator[SourceRow]:
    """The records of a CSV file with a header line (UTF-8, a BOM allowed); `number` is the
    line each record starts on (the header is line 1)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    name = Path(path).name
    line = 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ImportSourceError(f"file {name} is empty; a CSV log starts with a "
                                        "header line naming its columns")
            header = [h.strip() for h in header]
            _check_columns(header, mapping, f"file {name}")
            line = reader.line_num
            for record in reader:
                start, line = line + 1, reader.line_num
                if not record or not any(cell.strip() for cell in record):
                    continue
                yield SourceRow(start, dict(zip(header, record, strict=False)))
    except UnicodeDecodeError:
        raise ImportSourceError(f"file {name} is not UTF-8 text (after line {line}); re-save "
                                "it as UTF-8") from None
    except csv.Error as exc:
        raise ImportSourceError(f"file {name} line {line + 1} is not CSV ({exc})") from None


def read_jsonl(path: str | Path) -> Iterator[SourceRow]:
    """One JSON object per line (blank lines skipped); `number` is the line."""
    name = Path(path).name
    number = 0
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    reason = getattr(exc, "msg", str(exc))
                    yield SourceRow(number, None, f"not valid JSON ({reason})")
                    continue
                if not isinstance(value, dict):
                    yield SourceRow(number, None, f"not a JSON object (a {type(value).__name__})")
                    continue
                yield SourceRow(number, value)
    except UnicodeDecodeError:
        raise ImportSourceError(f"file {name} is not UTF-8 text (after line {number}); re-save "
                                "it as UTF-8") from None


def read_sql(engine: Any, query: str, mapping: ReactionMapping,
             batch_size: int = 1000) -> Iterator[SourceRow]:
    """The rows of `query`, run in a READ ONLY transaction and streamed (a server-side
    cursor); `number` is the 1-based row (add ORDER BY for stable numbers). The query is sent
    as written: no bind parameters, so `%` and `:` need no escaping."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            result = conn.execution_options(
                stream_results=True, max_row_buffer=batch_size, no_parameters=True,
            ).exec_driver_sql(query)
            keys = [str(k) for k in result.keys()]
            _check_columns(keys, mapping, "the sql query's result")
            for number, row in enumerate(result, 1):
                yield SourceRow(number, dict(zip(keys, row, strict=True)))
    except OperationalError:
        raise  # unreachable or cancelled: worth a retry
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise ImportSourceError(f"the sql query failed: {first}; fix the query") from None
