"""LLM response cache: a rerun of the same request (endpoint, model, messages, params) pays nothing.

`cache_key` is the sha256 of the canonical JSON of those four things. `PostgresResponseCache`
stores entries in the `llm_cache` table; lookups and writes issued by concurrent coroutines in the
same event-loop tick are coalesced into one `SELECT ... WHERE key IN (...)` / one multi-row
`INSERT ... ON CONFLICT DO NOTHING`, run on a small private thread pool, so 64 requests in flight
cost a handful of round-trips instead of 128 and never block the event loop. Only successful
responses are put; a cache failure is logged and treated as a miss, never as a failed request.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from sqlalchemy import Engine, func, select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import LlmCacheEntry
from tasks.core.ids import content_hash

log = logging.getLogger(__name__)


def cache_key(base_url: str, model: str, messages: Sequence[dict[str, Any]],
              params: dict[str, Any]) -> str:
    """sha256 of canonical JSON of (endpoint base_url, model, messages, params without Nones)."""
    return content_hash({
        "endpoint": base_url.rstrip("/"),
        "model": model,
        "messages": list(messages),
        "params": {k: v for k, v in params.items() if v is not None},
    })


class ResponseCache(Protocol):
    """What LLMClient needs from a cache. Responses are small JSON dicts
    ({"text", "finish_reason", "usage", "model"})."""

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]: ...

    async def put(self, key: str, *, endpoint: str, model: str,
                  response: dict[str, Any]) -> None: ...


class InMemoryResponseCache:
    """A process-local cache (tests, notebooks); same contract as the Postgres one."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {k: self.entries[k]["response"] for k in keys if k in self.entries}

    async def put(self, key: str, *, endpoint: str, model: str,
                  response: dict[str, Any]) -> None:
        self.entries.setdefault(key, {"endpoint": endpoint, "model": model,
                                      "response": response})


class _Coalescer:
    """Collects items submitted during one loop tick and hands them to `flush` as one batch.

    At most one batch per coalescer runs at a time; items arriving meanwhile form the next batch,
    so batch size grows with database latency instead of piling up threads.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor,
                 flush: Callable[[list[Any]], list[Any]]) -> None:
        self._loop = loop
        self._executor = executor
        self._flush = flush
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._busy = False

    def submit(self, item: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((item, future))
        if not self._busy:
            self._busy = True
            # call_soon: every coroutine already runnable in this tick gets to add its item first.
            self._loop.call_soon(self._start)
        return future

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            self._busy = False
            return
        self._loop.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._loop.run_in_executor(
                self._executor, self._flush, [item for item, _ in batch])
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - a cache failure must not fail requests
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._start()


class PostgresResponseCache:
    """`llm_cache` rows keyed by `cache_key`; first answer wins (ON CONFLICT DO NOTHING)."""

    def __init__(self, engine: Engine, *, max_workers: int = 2) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="llm-cache")
        self._warned = False
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[_Coalescer, _Coalescer]] = weakref.WeakKeyDictionary()

    def _coalescers(self) -> tuple[_Coalescer, _Coalescer]:
        loop = asyncio.get_running_loop()
        pair = self._per_loop.get(loop)
        if pair is None:
            pair = (_Coalescer(loop, self._executor, self._select),
                    _Coalescer(loop, self._executor, self._insert))
            self._per_loop[loop] = pair
        return pair

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not keys:
            return {}
        try:
            return await self._coalescers()[0].submit(list(keys))
        except Exception as exc:  # noqa: BLE001
            self._warn("llm cache lookup failed, treating as a miss: %s", exc)
            return {}

    async def put(self, key: str, *, endpoint: str, model: str,
                  response: dict[str, Any]) -> None:
        row = {"key": key, "endpoint": endpoint[:500], "model": model[:200], "response": response}
        try:
            await self._coalescers()[1].submit(row)
        except Exception as exc:  # noqa: BLE001
            self._warn("llm cache write failed (the response is still returned): %s", exc)

    def _warn(self, message: str, exc: Exception) -> None:
        # Once at WARNING, then DEBUG: a database outage must not flood the task log.
        log.log(logging.DEBUG if self._warned else logging.WARNING, message, exc)
        self._warned = True

    # ---- sync, on the executor ----------------------------------------------------------
    def _select(self, key_lists: list[list[str]]) -> list[dict[str, dict[str, Any]]]:
        wanted = sorted({k for keys in key_lists for k in keys})
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(LlmCacheEntry.key, LlmCacheEntry.response)
                .where(LlmCacheEntry.key.in_(wanted))
            ).all()
        found = {key: response for key, response in rows}
        return [{k: found[k] for k in keys if k in found} for keys in key_lists]

    def _insert(self, rows: list[dict[str, Any]]) -> list[None]:
        unique = list({row["key"]: row for row in rows}.values())
        with session_scope(self.engine) as session:
            upsert(session, LlmCacheEntry, unique, update=[])
        return [None] * len(rows)

    # ---- sync helpers (CLI, tests) ------------------------------------------------------
    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(LlmCacheEntry)).scalar())

    def close(self) -> None:
        self._executor.shutdown(wait=True)
