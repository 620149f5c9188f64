"""Importing an operator's reaction log (`tuneloop import-reactions`, the import_reactions DAG):
a CSV file, a JSONL file or a SQL query, read through a mapping file (`tasks.signals.
import_config`), becomes `interactions` + `reactions` rows the reaction-dataset build reads like
the router's own.

- **De-identified on the way in**: the user id is stored as the router's salted hash
  (`deid.hash_user_id`, TUNELOOP_USER_HASH_SALT), so `tuneloop forget --user ID` finds imported
  rows too; prompt, response and context columns go through the scrubber every export uses
  (`tasks.datasets.deid`; a JSON prompt such as tip_scores' context_json field by field, with
  the names it holds). Raw text never reaches the database.
- **Marked as imported**: variant ``imported``, context ``{"source": "import", "import": {name,
  mapping_hash, format}}``, client id ``import:<name>``. Only rows marked so count as shown
  answers for the dataset build (`tasks.signals.labels.imported_row`); the router writes none of
  the marks. The prompt is one user turn, so the served-history check has nothing to verify.
- **Idempotent**: the interaction id is `stable_id` of the source name and the natural key
  (mapping `key`, default user + timestamp + prompt; the user as its salted hash, texts as
  their sha256 before scrubbing, so a scrubber change never re-imports). Inserts are ON
  CONFLICT DO NOTHING: importing the same log again adds nothing.
- **All or nothing**: one transaction. A bad row (missing column, empty value, unparseable
  dwell or timestamp, unknown action, not a record) is reported with its line (files) or row and
  key (SQL) and the reason; beyond `max_bad_rows` the run raises `ImportRejected` and writes
  nothing. Rows of an erased user from before the erasure are not stored (as the router's log
  does), and rows older than TUNELOOP_RETENTION_DAYS are skipped (the nightly purge would wipe
  them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from tasks.core.db.engine import engine_for, session_scope
from tasks.core.ids import canonical_json, content_hash, stable_id
from tasks.datasets import deid
from tasks.signals.import_config import ImportConfig, ImportConfigError, ReactionMapping
from tasks.signals.import_rows import (
    MISSING,
    ImportSourceError,
    ParsedRow,
    RowProblem,
    SourceRow,
    lookup,
    parse_row,
    read_csv,
    read_jsonl,
    read_sql,
    selected,
)
from tasks.signals.labels import IMPORT_SOURCE, IMPORTED_VARIANT

__all__ = ["ImportConfig", "ImportConfigError", "ImportRejected", "ImportSourceError",
           "deidentified_event", "import_reactions"]

log = logging.getLogger(__name__)

BATCH_ROWS = 500
MAX_LISTED_BAD_ROWS = 100  # the report lists this many; `bad` counts them all
FUTURE_TOLERANCE = timedelta(days=1)


class ImportRejected(RuntimeError):
    """More bad rows than allowed: nothing was written. `summary` is the run's report (counts
    and the bad rows with their line or key and reason)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class ImportReport:
    source: str
    name: str
    mapping: str
    mapping_hash: str
    max_bad_rows: int
    dry_run: bool
    rows: int = 0
    filtered: int = 0
    bad: int = 0
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    valid: int = 0
    duplicates: int = 0
    expired: int = 0
    events: int = 0  # distinct interactions among the valid rows
    erased: int = 0
    interactions_inserted: int = 0
    reactions_inserted: int = 0

    @property
    def over_limit(self) -> bool:
        return self.bad > self.max_bad_rows

    def add_bad(self, where: dict[str, Any], reason: str) -> None:
        self.bad += 1
        if len(self.bad_rows) < MAX_LISTED_BAD_ROWS:
            self.bad_rows.append({**where, "reason": reason})

    def summary(self, imported: bool) -> dict[str, Any]:
        return {
            "imported": imported, "dry_run": self.dry_run, "source": self.source,
            "name": self.name, "mapping": self.mapping, "mapping_hash": self.mapping_hash,
            "rows": self.rows, "filtered": self.filtered, "bad": self.bad,
            "bad_rows": self.bad_rows, "bad_rows_not_listed": self.bad - len(self.bad_rows),
            "max_bad_rows": self.max_bad_rows, "valid": self.valid,
            "duplicates": self.duplicates, "expired": self.expired,
            "erased": self.erased, "interactions_inserted": self.interactions_inserted,
            "reactions_inserted": self.reactions_inserted,
            "already_imported": max(0, self.events - self.interactions_inserted - self.erased),
        }


# ---- one event ---------------------------------------------------------------------------------
def _key_part(name: str, parsed: ParsedRow, user_hash: str) -> str:
    if name == "user":
        return user_hash
    if name == "timestamp":
        return parsed.timestamp.isoformat()
    if name == "dwell":
        return str(parsed.dwell_ms)
    if name == "prompt":
        raw = parsed.prompt if isinstance(parsed.prompt, str) else canonical_json(parsed.prompt)
        return content_hash(raw)
    if name == "response":
        return content_hash(parsed.response)
    return parsed.action


def interaction_id(mapping: ReactionMapping, parsed: ParsedRow, user_hash: str) -> str:
    """The deterministic id of an imported event: its source name and natural key."""
    return stable_id("import", mapping.name, *(f"{k}={_key_part(k, parsed, user_hash)}"
                                               for k in mapping.key))


def _clean(value: Any) -> Any:
    """Text PostgreSQL stores: no NUL characters, no lone surrogates."""
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def deidentified_event(parsed: ParsedRow, mapping: ReactionMapping, source_format: str, *,
                       salt: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(interactions row, reactions row) for one parsed event: the user hashed with the
    router's salt, the texts scrubbed, the rows marked as imported."""
    user_hash = deid.hash_user_id(parsed.user, salt)
    structured = not isinstance(parsed.prompt, str)
    names = deid.names_in(parsed.fields) | (deid.names_in(parsed.prompt) if structured else set())
    if structured:
        prompt = canonical_json(deid.scrub_value(_clean(parsed.prompt), names, salt=salt))
    else:
        prompt = deid.scrub_text(_clean(parsed.prompt), names)
    context: dict[str, Any] = {
        "source": IMPORT_SOURCE,
        "import": {"name": mapping.name, "mapping_hash": mapping.content_hash[:16],
                   "format": source_format},
    }
    if parsed.fields:
        context["fields"] = deid.scrub_value(_clean(parsed.fields), names, salt=salt)
    iid = interaction_id(mapping, parsed, user_hash)
    interaction = {
        "id": iid, "user_hash": user_hash, "variant": IMPORTED_VARIANT,
        "model_name": mapping.model_name, "context": context,
        "request_messages": [{"role": "user", "content": prompt}],
        "response": deid.scrub_text(_clean(parsed.response), names),
        "created_at": parsed.timestamp.isoformat(), "client_id": mapping.client_id,
    }
    reaction = {
        "id": stable_id("import-reaction", iid, parsed.action, parsed.dwell_ms),
        "interaction_id": iid, "reaction": parsed.action, "dwell_ms": parsed.dwell_ms,
        "client_id": mapping.client_id,
        "created_at": (parsed.timestamp + timedelta(milliseconds=parsed.dwell_ms)).isoformat(),
    }
    return interaction, reaction


# ---- writing -----------------------------------------------------------------------------------
# One statement per batch; the batch travels as one JSON document (as the router's log writes).
# Interactions of a user erased after the event (user_erasures.requested_at later than it) are
# not stored; a reaction is stored only beside a stored, unerased interaction.
_INSERT_INTERACTIONS = text("""
WITH u AS (
  SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS u(
    id text, user_hash text, variant text, model_name text, context jsonb,
    request_messages jsonb, response text, created_at timestamptz, client_id text)
), erased AS (
  SELECT u.id FROM u JOIN user_erasures e
    ON e.user_hash = u.user_hash AND u.created_at < e.requested_at
), inserted AS (
  INSERT INTO interactions (id, user_hash, deployment_id, variant, model_name, model_version,
      context, request_messages, response, latency_ms, mirror_of, status, error, stream,
      ttft_ms, created_at, client_id, request_id)
  SELECT u.id, u.user_hash, NULL, u.variant, u.model_name, NULL, u.context, u.request_messages,
      u.response, 0, NULL, 'ok', NULL, false, NULL, u.created_at, u.client_id, NULL
  FROM u WHERE u.id NOT IN (SELECT id FROM erased)
  ON CONFLICT (id) DO NOTHING
  RETURNING id
)
SELECT (SELECT count(*) FROM inserted) AS inserted, (SELECT count(*) FROM erased) AS erased
""")

_INSERT_REACTIONS = text("""
WITH u AS (
  SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS u(
    id text, interaction_id text, reaction text, dwell_ms int8, client_id text,
    created_at timestamptz)
), inserted AS (
  INSERT INTO reactions (id, interaction_id, reaction, dwell_ms, idempotency_key, client_id,
      created_at)
  SELECT u.id, u.interaction_id, u.reaction, u.dwell_ms, NULL, u.client_id, u.created_at
  FROM u
  WHERE EXISTS (SELECT 1 FROM interactions i
                WHERE i.id = u.interaction_id AND i.erased_at IS NULL)
  ON CONFLICT (id) DO NOTHING
  RETURNING id
)
SELECT count(*) FROM inserted
""")


def _write(session: Any, interactions: list[dict[str, Any]], reactions: list[dict[str, Any]],
           report: ImportReport) -> None:
    if interactions:
        row = session.execute(_INSERT_INTERACTIONS, {
            "rows": json.dumps(interactions, ensure_ascii=False)}).one()
        report.interactions_inserted += int(row.inserted)
        report.erased += int(row.erased)
    if reactions:
        report.reactions_inserted += int(session.execute(_INSERT_REACTIONS, {
            "rows": json.dumps(reactions, ensure_ascii=False)}).scalar_one())


# ---- the run -----------------------------------------------------------------------------------
def _source_rows(cfg: ImportConfig, mapping: ReactionMapping, engine: Engine | None
                 ) -> Iterator[SourceRow]:
    if cfg.source_format == "csv":
        return read_csv(cfg.file, mapping)
    if cfg.source_format == "jsonl":
        return read_jsonl(cfg.file)
    url = cfg.source_url.get_secret_value()
    if url:
        url = "postgresql" + url[len("postgres"):] if url.startswith("postgres:") else url
        source = engine_for(url)
    else:
        from tasks.core.db.engine import get_engine

        source = engine or get_engine()
    return read_sql(source, cfg.sql, mapping)


def _where(row: SourceRow, cfg: ImportConfig, mapping: ReactionMapping,
           salt: str | None) -> dict[str, Any]:
    """Where a bad row is: its line (files), or its row and natural key (SQL) — the user as its
    salted hash (prefix) and texts as sha256 prefixes, so no report carries user data."""
    if cfg.source_format != "sql":
        return {"line": row.number}
    key: dict[str, Any] = {}
    for name in mapping.key:
        value = lookup(row.values or {}, getattr(mapping.columns, name))
        if value is MISSING or value is None or (isinstance(value, str) and not value.strip()):
            key[name] = None
        elif name == "user":
            key[name] = deid.hash_user_id(str(value).strip(), salt)[:12]
        elif name in ("prompt", "response") or isinstance(value, dict | list):
            raw = canonical_json(value) if isinstance(value, dict | list) else str(value)
            key[name] = "sha256:" + content_hash(raw)[:12]
        else:
            key[name] = str(value)[:60]
    return {"row": row.number, "key": key}


def _log_bad_rows(report: ImportReport, what: str) -> None:
    # Where and why: a reason quotes at most 60 characters of a dwell, timestamp or action
    # value, never a prompt, an answer or a user id.
    for bad in report.bad_rows[:20]:
        log.warning("%s bad row %s", what, canonical_json(bad))
    if report.bad > 20:
        log.warning("... and %d more bad rows (the summary lists up to %d)", report.bad - 20,
                    MAX_LISTED_BAD_ROWS)


def _rejection(report: ImportReport, cfg: ImportConfig) -> ImportRejected:
    summary = report.summary(imported=False)
    _log_bad_rows(report, "rejected:")
    shown = "; ".join(
        f"{'line ' + str(b['line']) if 'line' in b else 'row ' + str(b['row'])}: {b['reason']}"
        for b in report.bad_rows[:3])
    more = f" (and {report.bad - 3} more)" if report.bad > 3 else ""
    where = cfg.file if cfg.source_format != "sql" else "the sql query's result"
    return ImportRejected(
        f"{report.bad} bad row(s) in {where}, more than max_bad_rows={cfg.max_bad_rows}; "
        f"nothing was imported: {shown}{more}; fix the rows or the mapping, or raise "
        "max_bad_rows (--allow-bad N) to skip and report them", summary)


def import_reactions(cfg: ImportConfig, *, engine: Engine | None = None, salt: str | None = None,
                     now: datetime | None = None,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Import the log `cfg` names into interactions + reactions (see the module docstring).
    Returns the summary {"imported", "rows", "filtered", "bad", "bad_rows", "valid",
    "duplicates", "expired", "erased", "interactions_inserted", "reactions_inserted",
    "already_imported", ...}; raises ImportRejected past `max_bad_rows` (nothing written) and
    ImportSourceError when the source cannot be read as mapped."""
    from tasks.core.settings import get_settings

    mapping = cfg.reaction_mapping()
    now = now or datetime.now(UTC)
    retention_days = get_settings().retention_days
    cutoff = now - timedelta(days=retention_days) if retention_days else None
    report = ImportReport(source=cfg.source_format, name=mapping.name, mapping=mapping.path,
                          mapping_hash=mapping.content_hash[:16],
                          max_bad_rows=cfg.max_bad_rows, dry_run=cfg.dry_run)
    seen_interactions: set[str] = set()
    seen_reactions: set[str] = set()
    interactions: list[dict[str, Any]] = []
    reactions: list[dict[str, Any]] = []
    with session_scope(engine) as session:
        # Held to the commit: `tuneloop forget` (SHARE lock) either finished before — its
        # user_erasures row is then seen by every insert below — or waits and wipes these rows.
        session.execute(text("LOCK TABLE interactions, reactions IN ROW EXCLUSIVE MODE"))
        for row in _source_rows(cfg, mapping, engine):
            report.rows += 1
            if progress is not None and report.rows % BATCH_ROWS == 0:
                progress(report.rows)
            if row.values is None:
                report.add_bad(_where(row, cfg, mapping, salt), row.problem or "not a record")
                continue
            if not selected(row.values, mapping):
                report.filtered += 1
                continue
            try:
                parsed = parse_row(row.values, mapping, not_after=now + FUTURE_TOLERANCE)
            except RowProblem as exc:
                report.add_bad(_where(row, cfg, mapping, salt), str(exc))
                continue
            if report.over_limit:
                continue  # rejected already: count the rest, de-identify and write nothing
            report.valid += 1
            if cutoff is not None and parsed.timestamp < cutoff:
                report.expired += 1
                continue
            interaction, reaction = deidentified_event(parsed, mapping, cfg.source_format,
                                                       salt=salt)
            if interaction["id"] in seen_interactions:
                report.duplicates += 1
            else:
                seen_interactions.add(interaction["id"])
                interactions.append(interaction)
            if reaction["id"] not in seen_reactions:
                seen_reactions.add(reaction["id"])
                reactions.append(reaction)
            if len(interactions) >= BATCH_ROWS or len(reactions) >= BATCH_ROWS:
                _write(session, interactions, reactions, report)
                interactions, reactions = [], []
        if report.over_limit:
            raise _rejection(report, cfg)  # session_scope rolls everything back
        _write(session, interactions, reactions, report)
        report.events = len(seen_interactions)
        if cfg.dry_run:
            session.rollback()
    if progress is not None:
        progress(report.rows)
    summary = report.summary(imported=not cfg.dry_run)
    _log_bad_rows(report, "skipped")
    log.info("import %s (%s): %d rows, %d filtered, %d bad, %d new interactions, %d new "
             "reactions, %d already imported%s", mapping.name, cfg.source_format, report.rows,
             report.filtered, report.bad, report.interactions_inserted,
             report.reactions_inserted, summary["already_imported"],
             " (dry run: rolled back)" if cfg.dry_run else "")
    return summary
