"""The interaction log: every request the router answers becomes one complete `interactions`
row (`interaction_row`), queued without blocking the response and written by one batch writer
thread (`InteractionLog`) as a single upsert per batch; `batch_json` encodes a batch as one JSON
document PostgreSQL accepts, cleaning the rare client text (NUL characters, lone surrogates) it
would reject.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any

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


class InteractionLog:
    """A bounded queue drained by one writer thread into `interactions` in batched upserts.

    `submit` never blocks the caller (a full queue drops the row and counts it); `wait_written`
    lets the reactions API wait for an interaction that is still queued; `close` flushes.
    """

    _STOP = object()

    def __init__(self, engine: Any, *, batch_size: int = 256, flush_interval_s: float = 0.2,
                 queue_max: int = 100_000) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._insert_stmt: Any = None
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.batches = 0

    def start(self) -> InteractionLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="interaction-log",
                                            daemon=True)
            self._thread.start()
        return self

    def submit(self, row: dict[str, Any]) -> bool:
        with self._cond:
            self._pending.add(row["id"])
        try:
            self._queue.put_nowait(row)
            return True
        except queue.Full:
            with self._cond:
                self._pending.discard(row["id"])
                self.dropped += 1
            log.error("interaction log queue full; dropped interaction %s", row["id"])
            return False

    def is_pending(self, interaction_id: str) -> bool:
        return interaction_id in self._pending

    def wait_written(self, interaction_id: str, timeout_s: float = 5.0) -> bool:
        """Block until `interaction_id` is no longer queued; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: interaction_id not in self._pending, timeout_s)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything submitted so far is written (or dropped); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout_s)

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "failed": self.failed,
                "batches": self.batches, "queued": self._queue.qsize()}

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush everything queued, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("interaction log did not flush within %.0f s", timeout_s)
        self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is self._STOP:
                break
            batch: list[dict[str, Any]] = [first]
            # Linger up to flush_interval_s for more rows: under load a batch fills up and one
            # statement carries many rows; when idle a row waits at most flush_interval_s.
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = (self._queue.get(timeout=remaining) if remaining > 0
                            else self._queue.get_nowait())
                except queue.Empty:
                    break
                if item is self._STOP:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
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
            self._write(rest[start:start + self.batch_size])

    def _write(self, batch: list[dict[str, Any]]) -> None:
        # A client retry with the same X-Request-Id lands on the same id: keep the last.
        rows = list({row["id"]: row for row in batch}.values())
        if not self._insert(rows) and len(rows) > 1:
            # One unstorable row must not cost the whole batch: write the rows one by one.
            for row in rows:
                self._insert([row])
        with self._cond:
            self._pending.difference_update(row["id"] for row in batch)
            self._cond.notify_all()

    def _statement(self) -> Any:
        """INSERT ... SELECT FROM jsonb_to_recordset(:rows) ON CONFLICT (id) DO UPDATE.

        The whole batch travels as one JSON document (one C-speed json.dumps here, parsed by
        PostgreSQL) in one constant statement, where the generic `upsert` helper compiles a new
        multi-VALUES statement per batch and an executemany runs one INSERT per row.
        """
        if self._insert_stmt is None:
            from sqlalchemy import text

            columns = ", ".join(_ROW_KEYS)
            record = ", ".join(f"{key} {_SQL_TYPES[key]}" for key in _ROW_KEYS)
            updates = ", ".join(f"{key} = EXCLUDED.{key}" for key in _ROW_KEYS if key != "id")
            self._insert_stmt = text(
                f"INSERT INTO interactions ({columns}) SELECT {columns} "
                f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS u({record}) "
                f"ON CONFLICT (id) DO UPDATE SET {updates}")
        return self._insert_stmt

    def _insert(self, rows: list[dict[str, Any]], attempts: int = 3) -> bool:
        from sqlalchemy.exc import InterfaceError, OperationalError

        for attempt in range(attempts):
            try:
                with self.engine.begin() as conn:
                    conn.execute(self._statement(), {"rows": batch_json(rows)})
                self.written += len(rows)
                self.batches += 1
                return True
            except (OperationalError, InterfaceError) as exc:  # the database went away: retry
                if attempt + 1 == attempts:
                    error: Exception = exc
                    break
                time.sleep(0.2 * (attempt + 1))
            except Exception as exc:  # noqa: BLE001 - data errors do not heal on retry
                error = exc
                break
        if len(rows) == 1:
            self.failed += 1
            log.error("interaction log: dropping interaction %s: %s", rows[0]["id"],
                      str(error).splitlines()[0])
        return False


def _clean_text(value: str) -> str:
    """Text PostgreSQL can store: no NUL characters, no lone UTF-16 surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in an interaction row")


def batch_json(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON array PostgreSQL can store: client text may carry NUL characters
    or lone surrogates, which PostgreSQL rejects; those (rare) batches are cleaned first."""
    encoded = json.dumps(rows, default=_json_default, ensure_ascii=False)
    try:
        encoded.encode("utf-8")
        clean = "\\u0000" not in encoded
    except UnicodeEncodeError:
        clean = False
    if not clean:
        encoded = json.dumps(_clean(rows), default=_json_default, ensure_ascii=False)
    return encoded
