"""The interaction log: every request the router answers becomes one complete `interactions`
row (`interaction_row`), queued without blocking the response and written by one batch writer
thread (`InteractionLog`) as a single insert per batch; reactions (`reaction_row`,
`InteractionLog.submit_reaction`) travel the same queue and are inserted after the interactions of
the same batch. When PostgreSQL is unreachable, batches go to a bounded local spool (`Spool`:
append-only, fsync'd JSONL segments under `spool_dir`) instead of being lost; the writer retries
with backoff, replays the spool in order once the database answers (idempotent inserts, each
segment deleted only after it is committed) and replays a spool a crashed process left behind at
start-up. A row PostgreSQL rejects is dropped alone and never spooled. `batch_json` encodes a
batch as one JSON document PostgreSQL accepts, cleaning the rare client text (NUL characters,
lone surrogates) it would reject.

Erasure holds against late writes: a row already stored is never overwritten (ON CONFLICT DO
NOTHING: a replay cannot put back text `tuneloop forget` or retention wiped), a row of a user
erased after it was made (`user_erasures.requested_at` later than its `created_at`, i.e. still
spooled when `forget` ran) is stored with its text blanked and `erased_at` set, and a reaction to
an erased interaction is not stored (forget deleted the user's reactions).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.spool import Batch, Spool, batch_json

log = logging.getLogger("serving.router")  # the router's one log, as before the split


_ROW_KEYS = ("id", "user_hash", "deployment_id", "variant", "model_name", "model_version",
             "context", "request_messages", "response", "latency_ms", "mirror_of", "status",
             "error", "stream", "ttft_ms", "created_at", "client_id", "request_id")


_SQL_TYPES = {"id": "text", "user_hash": "text", "deployment_id": "text", "variant": "text",
              "model_name": "text", "model_version": "text", "context": "jsonb",
              "request_messages": "jsonb", "response": "text", "latency_ms": "float8",
              "mirror_of": "text", "status": "text", "error": "text", "stream": "boolean",
              "ttft_ms": "float8", "created_at": "timestamptz", "client_id": "text",
              "request_id": "text"}

# The text an erased interaction keeps (as tasks/signals/erasure.py wipes it): `error` too, a
# backend's error body can quote the request it refused.
_ERASED_TEXT = {"request_messages": "'[]'::jsonb", "response": "''", "context": "'{}'::jsonb",
                "error": "NULL"}

_REACTION_KEYS = ("id", "interaction_id", "reaction", "dwell_ms", "idempotency_key",
                  "client_id", "created_at")
_REACTION_REQUIRED = frozenset(("id", "interaction_id", "reaction", "dwell_ms"))
_REACTION_SQL_TYPES = {"id": "text", "interaction_id": "text", "reaction": "text",
                       "dwell_ms": "int8", "idempotency_key": "text", "client_id": "text",
                       "created_at": "timestamptz"}

SPOOL_CAP_SETTING = "TUNELOOP_SPOOL_MAX_BYTES"
_INTERACTION, _REACTION = "interaction", "reaction"  # queue item kinds


def interaction_row(**values: Any) -> dict[str, Any]:
    """A complete interactions row (every column present, so batches insert as one statement)."""
    unknown = set(values) - set(_ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown interaction columns {sorted(unknown)}")
    row: dict[str, Any] = {"deployment_id": None, "model_version": None, "context": {},
                           "request_messages": [], "response": "", "latency_ms": 0.0,
                           "mirror_of": None, "status": "ok", "error": None, "stream": False,
                           "ttft_ms": None, "created_at": datetime.now(UTC), "client_id": None,
                           "request_id": None}
    row.update(values)
    return row


def reaction_row(**values: Any) -> dict[str, Any]:
    """A complete reactions row; `created_at` defaults to now, so a reaction replayed after an
    outage keeps the time it was made."""
    unknown = values.keys() - _REACTION_SQL_TYPES.keys()
    if unknown:
        raise ValueError(f"unknown reaction columns {sorted(unknown)}")
    missing = _REACTION_REQUIRED - values.keys()
    if missing:
        raise ValueError(f"a reaction row needs {sorted(missing)}")
    row: dict[str, Any] = {"idempotency_key": None, "client_id": None, **values}
    if row.get("created_at") is None:
        row["created_at"] = datetime.now(UTC)
    return row


class _Unavailable(Exception):
    """The database could not be reached (connection refused, lost or timed out)."""


class InteractionLog:
    """A bounded queue drained by one writer thread into `interactions` (and `reactions`) in
    batched inserts, spooled to local disk while the database is unreachable.

    `submit`/`submit_reaction` never block the caller (a full queue drops the row and counts it).
    `is_pending` is True while an interaction is only in memory and `wait_written` waits until it
    is written or spooled (durable either way); `is_known` is True while it is accepted but not
    yet in the database (in memory or spooled), so the reactions API can take a reaction during
    an outage and while the spool replays after one. `flush` waits until everything is in the
    database; `close` flushes what it can and leaves the rest spooled for the next start.
    """

    _STOP = object()

    def __init__(self, engine: Any, *, batch_size: int = 256, flush_interval_s: float = 0.2,
                 queue_max: int = 100_000, spool_dir: Path | None = None,
                 spool_max_bytes: int | None = None,
                 spool_segment_bytes: int = 4 * 1024 * 1024, retry_initial_s: float = 0.25,
                 retry_max_s: float = 2.0) -> None:
        if spool_dir is None or spool_max_bytes is None:
            from tasks.core.settings import get_settings

            settings = get_settings()
            spool_dir = settings.resolved_spool_dir if spool_dir is None else spool_dir
            spool_max_bytes = (settings.spool_max_bytes if spool_max_bytes is None
                               else spool_max_bytes)
        self.engine = engine
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.spool_dir = Path(spool_dir)
        self.spool_max_bytes = spool_max_bytes
        self.spool_segment_bytes = spool_segment_bytes
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._pending: set[str] = set()
        self._outstanding = 0  # items submitted and not yet written, spooled, failed or dropped
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._spool: Spool | None = None
        self._spool_ready = threading.Event()
        self._statements: dict[str, Any] = {}
        self._retry_at = 0.0
        self._backoff_s = retry_initial_s
        self._outage_since: float | None = None
        self._replay_rest: Batch | None = None  # what is left of a half-replayed spool line
        self._drop_logged_at = -1e9
        # Rows the database took, and rows it already held (a spool replay, a late duplicate):
        # counted from what each committed insert reports, not from what was sent.
        self.written = 0  # interaction rows inserted
        self.duplicates = 0  # interaction rows refused: the id is stored already
        self.reactions_written = 0
        self.reactions_duplicates = 0  # the id stored already, or repeated in the batch
        self.reactions_erased = 0  # left out: their interaction is erased
        self.dropped = 0  # rows of either kind: queue full, spool full or unusable
        self.failed = 0  # rows of either kind PostgreSQL rejected
        self.batches = 0
        self.spooled_total = 0  # rows ever spooled by this writer
        self.replayed = 0  # spooled rows replayed into the database (or failed there)
        self.outages = 0

    def start(self) -> InteractionLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="interaction-log",
                                            daemon=True)
            self._thread.start()
        return self

    # -- the request path: O(1), never blocks --
    def submit(self, row: dict[str, Any]) -> bool:
        with self._cond:
            self._pending.add(row["id"])
            self._outstanding += 1
        try:
            self._queue.put_nowait((_INTERACTION, row))
            return True
        except queue.Full:
            with self._cond:
                self._pending.discard(row["id"])
                self._outstanding -= 1
                self.dropped += 1
                self._cond.notify_all()
            log.error("interaction log queue full; dropped interaction %s", row["id"])
            return False

    def submit_reaction(self, row: dict[str, Any]) -> bool:
        """Queue a `reactions` row (see `reaction_row`); inserted ON CONFLICT (id) DO NOTHING
        after the interactions of the same batch (and behind the spool while it holds rows).
        False when the queue is full (dropped)."""
        row = reaction_row(**row)
        with self._cond:
            self._outstanding += 1
        try:
            self._queue.put_nowait((_REACTION, row))
            return True
        except queue.Full:
            with self._cond:
                self._outstanding -= 1
                self.dropped += 1
                self._cond.notify_all()
            log.error("interaction log queue full; dropped reaction %s", row["id"])
            return False

    def is_pending(self, interaction_id: str) -> bool:
        """Queued in memory, neither written nor spooled yet."""
        return interaction_id in self._pending

    def is_known(self, interaction_id: str) -> bool:
        """Accepted and not yet in the database: queued in memory or held in the spool."""
        spool = self._spool
        return interaction_id in self._pending or (spool is not None and spool.holds(
            interaction_id))

    def wait_written(self, interaction_id: str, timeout_s: float = 5.0) -> bool:
        """Block until `interaction_id` is no longer queued in memory (written, or spooled
        during an outage); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: interaction_id not in self._pending, timeout_s)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything submitted so far is in the database (or failed or dropped),
        spool included; False on timeout (e.g. while the database is still down)."""
        with self._cond:
            return self._cond.wait_for(self._settled, timeout_s)

    def _settled(self) -> bool:
        spool = self._spool
        return self._outstanding == 0 and (spool is None or spool.rows == 0) and (
            self._thread is None or self._spool_ready.is_set())

    def stats(self) -> dict[str, Any]:
        """The writer's counters. A settled interaction row ends up in one of written (inserted),
        duplicates (its id was stored already), dropped or failed; a reaction in one of
        reactions_written, reactions_duplicates, reactions_erased, dropped or failed."""
        spool = self._spool
        return {"written": self.written, "duplicates": self.duplicates,
                "reactions_written": self.reactions_written,
                "reactions_duplicates": self.reactions_duplicates,
                "reactions_erased": self.reactions_erased, "dropped": self.dropped,
                "failed": self.failed, "batches": self.batches,
                "queued": self._queue.qsize(),
                "spooled_rows": spool.rows if spool else 0,
                "spooled_bytes": spool.bytes if spool else 0,
                "spool_segments": len(spool.segments) if spool else 0,
                "spooled_total": self.spooled_total, "replayed": self.replayed,
                "outages": self.outages, "database_down": self._outage_since is not None}

    def close(self, timeout_s: float = 30.0) -> None:
        """Write (or spool) everything queued, try the spool once more, then stop the writer;
        what is still spooled stays on disk for the next start."""
        if self._thread is None:
            return
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("interaction log did not flush within %.0f s", timeout_s)
        self._thread = None

    # -- the writer thread --
    def _run(self) -> None:
        self._open_spool()
        stopping = False
        while not stopping:
            items, stopping = self._collect()
            if items:
                self._handle(items)
            if self._spool_rows() and time.monotonic() >= self._retry_at:
                self._retry()
        # Whatever is still queued after the stop marker (late mirror copies) is written too.
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not self._STOP:
                rest.append(item)
        for start in range(0, len(rest), self.batch_size):
            self._handle(rest[start:start + self.batch_size])
        if self._spool_rows():
            self._retry()
        self._close_spool()
        with self._cond:
            self._cond.notify_all()

    def _collect(self) -> tuple[list[Any], bool]:
        """Up to batch_size items; ([], False) when it is time to retry the database."""
        # While the spool holds rows, wake up for the next retry even if nothing arrives.
        timeout = max(0.0, self._retry_at - time.monotonic()) if self._spool_rows() else None
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False
        if first is self._STOP:
            return [], True
        items = [first]
        # Linger up to flush_interval_s for more rows: under load a batch fills up and one
        # statement carries many rows; when idle a row waits at most flush_interval_s.
        deadline = time.monotonic() + self.flush_interval_s
        while len(items) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = (self._queue.get(timeout=remaining) if remaining > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                break
            if item is self._STOP:
                return items, True
            items.append(item)
        return items, False

    def _handle(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        batch = Batch(interactions=[row for kind, row in items if kind == _INTERACTION],
                      reactions=[row for kind, row in items if kind == _REACTION])
        try:
            if self._spool_rows():
                # An outage is on (or a replay is due): queue up behind the spool, in order —
                # a reaction must not reach the database before its spooled interaction.
                self._spool_batch(batch)
                return
            rest = self._store(batch)
            if rest is None:
                if self._outage_since is not None:  # back, and there was nothing to replay
                    self._database_back()
            else:
                self._enter_outage()
                self._spool_batch(rest)
        except Exception:  # noqa: BLE001 - a bug here must not stop the writer
            log.exception("interaction log: dropping a batch of %d rows", len(items))
            with self._cond:
                self.dropped += len(items)
        finally:
            with self._cond:
                self._pending.difference_update(
                    row["id"] for kind, row in items if kind == _INTERACTION)
                self._outstanding -= len(items)
                self._cond.notify_all()

    # -- outage and spool --
    def _open_spool(self) -> None:
        try:
            if self.spool_max_bytes > 0:
                self._spool = Spool(self.spool_dir, self.spool_max_bytes,
                                    self.spool_segment_bytes).open()
        except OSError as exc:
            log.error("interaction log: cannot use the spool in %s (%s); rows are dropped "
                      "while the database is unreachable", self.spool_dir, exc)
            self._spool = None
        finally:
            self._spool_ready.set()
            with self._cond:
                self._cond.notify_all()

    def _close_spool(self) -> None:
        spool = self._spool
        if spool is None:
            return
        if spool.rows:
            log.warning("interaction log: %d rows stay spooled in %s; the next start replays "
                        "them", spool.rows, spool.dir)
        spool.close()

    def _spool_rows(self) -> int:
        return self._spool.rows if self._spool is not None else 0

    def _enter_outage(self) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self.outages += 1
            log.warning("interaction log: database unreachable; spooling rows to %s",
                        self._spool.dir if self._spool else "(no spool: dropping)")
        self._backoff_s = self.retry_initial_s
        self._retry_at = now + self._backoff_s

    def _spool_batch(self, batch: Batch) -> None:
        spool = self._spool
        if spool is None:
            self._drop(batch, f"the database is unreachable and there is no spool "
                       f"({SPOOL_CAP_SETTING}={self.spool_max_bytes}, or {self.spool_dir} "
                       "unusable)")
            return
        try:
            try:
                stored = spool.append(batch)
            except (TypeError, ValueError):  # a row that cannot be encoded fails alone
                batch = self._encodable(batch)
                stored = not batch or spool.append(batch)
        except OSError as exc:
            self._drop(batch, f"cannot write the spool in {spool.dir} ({exc})")
            return
        if not stored:
            self._drop(batch, f"the spool in {spool.dir} is full ({spool.bytes} bytes, "
                       f"{SPOOL_CAP_SETTING}={spool.max_bytes}) and the database is still "
                       "unreachable")
            return
        self.spooled_total += len(batch)

    def _drop(self, batch: Batch, reason: str) -> None:
        with self._cond:
            self.dropped += len(batch)
        now = time.monotonic()
        if now - self._drop_logged_at >= 10.0:  # one line per 10 s, not one per batch
            self._drop_logged_at = now
            log.error("interaction log: %s; dropping rows (%d dropped so far)", reason,
                      self.dropped)

    def _encodable(self, batch: Batch) -> Batch:
        kept = Batch()
        for kind, rows, target in ((_INTERACTION, batch.interactions, kept.interactions),
                                   (_REACTION, batch.reactions, kept.reactions)):
            for row in rows:
                try:
                    batch_json([row])
                except (TypeError, ValueError) as exc:
                    self._fail(kind, row, exc)
                else:
                    target.append(row)
        return kept

    def _retry(self) -> None:
        """Replay the spool; on failure try again later (exponential backoff)."""
        if self._replay():
            self._database_back()
            return
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self.outages += 1
        self._backoff_s = min(self._backoff_s * 2, self.retry_max_s)
        self._retry_at = time.monotonic() + self._backoff_s

    def _database_back(self) -> None:
        if self._outage_since is not None:
            log.warning("interaction log: database back after %.1f s (%d rows replayed from "
                        "the spool so far)", time.monotonic() - self._outage_since,
                        self.replayed)
        self._outage_since = None
        self._backoff_s = self.retry_initial_s

    def _replay(self) -> bool:
        """Replay the spool oldest line first; False when the database is unreachable."""
        spool = self._spool
        assert spool is not None
        while spool.segments:
            segment = spool.segments[0]
            for end, line in spool.read(segment):
                if line is not None:
                    todo = line if self._replay_rest is None else self._replay_rest
                    rest = self._store(todo)
                    if rest is not None:
                        self._replay_rest = rest  # the rows of this line not yet committed
                        return False
                    self._replay_rest = None
                    self.replayed += len(line)
                spool.replayed(segment, end, line)
                with self._cond:
                    self._cond.notify_all()
            spool.remove(segment)  # every line committed
        with self._cond:
            self._cond.notify_all()
        return True

    # -- the database --
    def _store(self, batch: Batch) -> Batch | None:
        """Write a batch; None when done (rejected rows counted as failed), else the rows not
        yet committed because the database is unreachable."""
        rest = self._insert_all(_INTERACTION, batch.interactions)
        if rest is not None:
            return Batch(interactions=rest, reactions=batch.reactions)
        rest = self._insert_all(_REACTION, batch.reactions)
        if rest is not None:
            return Batch(reactions=rest)
        return None

    def _insert_all(self, kind: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        if not rows:
            return None
        if kind == _REACTION:
            # The first reaction with an id is the one that counts (as in the reactions API).
            unique = list({row["id"]: row for row in reversed(rows)}.values())[::-1]
            self.reactions_duplicates += len(rows) - len(unique)
            rows = unique
        try:
            self._insert(kind, rows)
            return None
        except _Unavailable:
            return rows
        except Exception as exc:  # noqa: BLE001 - data errors do not heal on retry
            if len(rows) == 1:
                self._fail(kind, rows[0], exc)
                return None
        # One unstorable row must not cost the whole batch: write the rows one by one.
        for index, row in enumerate(rows):
            try:
                self._insert(kind, [row])
            except _Unavailable:
                return rows[index:]
            except Exception as exc:  # noqa: BLE001 - this row's data
                self._fail(kind, row, exc)
        return None

    def _insert(self, kind: str, rows: list[dict[str, Any]]) -> None:
        from sqlalchemy.exc import (
            DBAPIError,
            DisconnectionError,
            InterfaceError,
            OperationalError,
        )
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        try:
            with self.engine.begin() as conn:
                result = conn.execute(self._statement(kind), {"rows": batch_json(rows)})
                # Interactions: the INSERT's row count is the rows inserted (a conflict inserts
                # nothing); reactions: the statement answers (inserted, erased) itself.
                inserted, erased = ((result.rowcount, 0) if kind == _INTERACTION
                                    else tuple(result.one()))
        except (OperationalError, InterfaceError, DisconnectionError, PoolTimeout) as exc:
            raise _Unavailable(str(exc).splitlines()[0]) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise _Unavailable(str(exc).splitlines()[0]) from exc
            raise
        # Counted once committed; a commit whose answer was lost is replayed from the spool, and
        # its rows come back as duplicates.
        self.batches += 1
        if kind == _INTERACTION:
            self.written += inserted
            self.duplicates += len(rows) - inserted
        else:
            self.reactions_written += inserted
            self.reactions_erased += erased
            self.reactions_duplicates += len(rows) - inserted - erased

    def _fail(self, kind: str, row: dict[str, Any], error: Exception) -> None:
        with self._cond:
            self.failed += 1
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error("interaction log: dropping %s %s: %s", kind, row.get("id"), message)

    def _statement(self, kind: str) -> Any:
        """INSERT ... SELECT FROM jsonb_to_recordset(:rows) ON CONFLICT (id) DO NOTHING: a row
        is submitted once (random ids), so a conflict is a replay or a late duplicate and the
        stored row stands — also when `forget` or retention has wiped its text since. An
        interaction of a user erased after it was made (a LEFT JOIN on `user_erasures`) goes in
        wiped with `erased_at` set; a reaction to an erased interaction is left out. The
        reactions statement answers one row (inserted, erased): the rows it inserted and those
        it left out for an erased interaction; the rest conflicted.

        The whole batch travels as one JSON document (one C-speed json.dumps here, parsed by
        PostgreSQL) in one constant statement, where the generic `upsert` helper compiles a new
        multi-VALUES statement per batch and an executemany runs one INSERT per row.
        """
        statement = self._statements.get(kind)
        if statement is None:
            from sqlalchemy import text

            keys, types = ((_ROW_KEYS, _SQL_TYPES) if kind == _INTERACTION
                           else (_REACTION_KEYS, _REACTION_SQL_TYPES))
            columns = ", ".join(keys)
            rows = ("jsonb_to_recordset(CAST(:rows AS jsonb)) AS u("
                    + ", ".join(f"{key} {types[key]}" for key in keys) + ")")
            if kind == _INTERACTION:
                values = ", ".join(
                    f"CASE WHEN e.user_hash IS NULL THEN u.{key} ELSE {_ERASED_TEXT[key]} END"
                    if key in _ERASED_TEXT else f"u.{key}" for key in keys)
                sql = (f"INSERT INTO interactions ({columns}, erased_at) "
                       f"SELECT {values}, CASE WHEN e.user_hash IS NOT NULL THEN now() END "
                       f"FROM {rows} LEFT JOIN user_erasures AS e "
                       "ON e.user_hash = u.user_hash AND u.created_at < e.requested_at "
                       "ON CONFLICT (id) DO NOTHING")
            else:
                erased = ("EXISTS (SELECT 1 FROM interactions AS i "
                          "WHERE i.id = u.interaction_id AND i.erased_at IS NOT NULL)")
                sql = (f"WITH u AS (SELECT * FROM {rows}), stored AS ("
                       f"INSERT INTO reactions ({columns}) SELECT {columns} FROM u "
                       f"WHERE NOT {erased} ON CONFLICT (id) DO NOTHING RETURNING 1) "
                       "SELECT (SELECT count(*) FROM stored) AS inserted, "
                       f"(SELECT count(*) FROM u WHERE {erased}) AS erased")
            statement = text(sql)
            self._statements[kind] = statement
        return statement
