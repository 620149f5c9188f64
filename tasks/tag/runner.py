"""The async engine behind tagging and judging: attempt loops, a worker pool and batched writes.

- `tag_with_llm` runs one (conversation, tagger) job: up to `retries` attempts, each failed attempt
  (transport error, truncated reply, unparseable or invalid JSON) becomes a `tag_failures` row with
  the raw output, the error and its attempt number. A parse failure is quoted back to the model on
  the next attempt; later attempts use a sampling temperature and a per-attempt seed so that
  neither the model nor the response cache repeats the same failure. Attempt numbers continue
  across runs, so the audit trail of a conversation is never overwritten.
- `WorkerPool` keeps `size` jobs in flight while a producer feeds it, so there is no tail between
  shards; `BatchWriter` coalesces rows into multi-row upserts on a worker thread so Postgres writes
  never stall the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Judgment, TagFailure, TagResult
from tasks.core.ids import stable_id
from tasks.tag.taggers import BaseTagger, ConversationInput, TaggerOutputInvalid

log = logging.getLogger(__name__)

RETRY_TEMPERATURE = 0.7
RAW_OUTPUT_LIMIT = 20_000

# table name → (model, conflict columns)
_TABLES: dict[str, tuple[type, list[str]]] = {
    "tag_results": (TagResult, ["id"]),
    "tag_failures": (TagFailure, ["conversation_id", "tagger", "tagger_version", "attempt"]),
    "judgments": (Judgment, ["id"]),
}


class BatchWriter:
    """Buffers rows per table and upserts them in batches on one background thread."""

    def __init__(self, engine: Engine, *, flush_rows: int = 400, interval_s: float = 0.5) -> None:
        self.engine = engine
        self.flush_rows = flush_rows
        self.interval_s = interval_s
        self.rows_written: Counter[str] = Counter()
        self._pending: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tag-writer")
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[Any] | None = None
        self._closed = False

    def add(self, table: str, row: dict[str, Any]) -> None:
        _, conflict = _TABLES[table]
        # Dedupe within a batch: one INSERT ... ON CONFLICT cannot touch a row twice.
        self._pending[table][tuple(row[c] for c in conflict)] = row
        if sum(len(v) for v in self._pending.values()) >= self.flush_rows:
            self._kick()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
        self._executor.shutdown(wait=True)

    async def flush(self) -> None:
        while self._flushing is not None:
            await self._flushing
        batch = self._take()
        if batch:
            loop = asyncio.get_running_loop()
            self._flushing = loop.run_in_executor(self._executor, self._write, batch)
            try:
                await self._flushing
            finally:
                self._flushing = None

    def _kick(self) -> None:
        if self._flushing is None and not self._closed:
            asyncio.get_running_loop().create_task(self.flush())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    def _take(self) -> dict[str, list[dict[str, Any]]]:
        # Sorted by key: concurrent writers (mapped shards) then lock rows in the same order.
        batch = {t: [rows[k] for k in sorted(rows)] for t, rows in self._pending.items() if rows}
        self._pending = defaultdict(dict)
        return batch

    def _write(self, batch: dict[str, list[dict[str, Any]]]) -> None:
        with session_scope(self.engine) as session:
            for table in ("tag_results", "tag_failures", "judgments"):  # stable lock order
                rows = batch.get(table)
                if not rows:
                    continue
                model, conflict = _TABLES[table]
                upsert(session, model, rows, conflict=conflict)
                self.rows_written[table] += len(rows)


class WorkerPool:
    """`size` coroutines pulling jobs from a bounded queue; `submit` waits when it is full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue(
            maxsize=size * 2)
        self._workers: list[asyncio.Task[None]] = []
        self.errors: list[BaseException] = []

    async def __aenter__(self) -> WorkerPool:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.size)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _ in self._workers:
            await self._queue.put(None)
        await asyncio.gather(*self._workers)

    async def submit(self, job: Callable[[], Awaitable[None]]) -> None:
        await self._queue.put(job)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            try:
                await job()
            except Exception as exc:  # noqa: BLE001 - one job must never take the batch down
                log.exception("tagging job failed unexpectedly")
                self.errors.append(exc)


@dataclass
class RunCounts:
    """What a tagging/judging run did, per tagger or judge slot (JSON-able via `as_dict`)."""

    tagged: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    judged: Counter[str] = field(default_factory=Counter)
    judge_errors: Counter[str] = field(default_factory=Counter)
    judge_failed_attempts: Counter[str] = field(default_factory=Counter)
    usage: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {name: dict(getattr(self, name)) for name in self.__dataclass_fields__}


def result_row(conversation_id: str, tagger: BaseTagger, output: dict[str, Any], *,
               attempts: int, model: str | None = None) -> dict[str, Any]:
    return {
        "id": stable_id(conversation_id, tagger.name, tagger.version),
        "conversation_id": conversation_id,
        "tagger": tagger.name,
        "tagger_version": tagger.version,
        "backend": tagger.backend,
        "model": (model or tagger.model)[:200],
        "output": output,
        "score": tagger.score(output),
        "attempts": attempts,
    }


def failure_row(conversation_id: str, tagger: BaseTagger, attempt: int, raw: str | None,
                error: str) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "tagger": tagger.name,
        "tagger_version": tagger.version,
        "attempt": attempt,
        "raw_output": None if raw is None else raw[:RAW_OUTPUT_LIMIT],
        "error": error,
    }


def corrective_messages(messages: list[dict[str, str]], raw: str, reason: str,
                        schema: type) -> list[dict[str, str]]:
    from tasks.core.llm.client import corrective_prompt

    return [*messages, {"role": "assistant", "content": raw},
            {"role": "user", "content": corrective_prompt(reason, schema)}]


async def tag_with_llm(
    client: Any,
    tagger: BaseTagger,
    conversation: ConversationInput,
    writer: BatchWriter,
    counts: RunCounts,
    *,
    retries: int,
    first_attempt: int = 1,
    max_tokens: int = 512,
) -> bool:
    """Tag one conversation with one LLM tagger; True when a result was stored."""
    messages = tagger.format_input(conversation)
    prompt = messages
    for index in range(retries):
        attempt = first_attempt + index
        params: dict[str, Any] = {"temperature": 0.0}
        if index > 0:
            params = {"temperature": RETRY_TEMPERATURE, "seed": attempt}
        result = await client.chat(prompt, max_tokens=max_tokens, **params)
        for key, value in result.usage.items():
            counts.usage[key] += int(value or 0)
        if not result.ok:
            writer.add("tag_failures", failure_row(conversation.id, tagger, attempt, result.text,
                                                   result.error or "LLM call failed"))
            counts.failed_attempts[tagger.name] += 1
            prompt = messages
            continue
        try:
            output = tagger.format_output(result.text or "")
        except TaggerOutputInvalid as exc:
            writer.add("tag_failures", failure_row(conversation.id, tagger, attempt, result.text,
                                                   exc.reason))
            counts.failed_attempts[tagger.name] += 1
            prompt = corrective_messages(messages, result.text or "", exc.reason,
                                         tagger.output_schema)
            continue
        writer.add("tag_results", result_row(conversation.id, tagger, output, attempts=attempt,
                                             model=result.model))
        counts.tagged[tagger.name] += 1
        return True
    counts.failed[tagger.name] += 1
    log.info("tagger %s gave up on conversation %s after %d attempts", tagger.name,
             conversation.id, retries)
    return False
