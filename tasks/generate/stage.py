"""Stage entry points for generation: plan → shards (dynamic task mapping) → finalize; preview.

    plan = plan_batch(cfg)                       # {"batch_id", "shards": [{batch_id, start, stop}]}
    results = [generate_shard(s, cfg) for s in plan["shards"]]   # one Airflow mapped task each
    summary = finalize_batch(plan["batch_id"])   # batch-wide dedup, coverage, counts

Every function takes a `GenerationConfig` (or its dict form, as XCom carries it) and returns a
small JSON-able dict. Conversations are written one by one as they complete (a coalescing writer
on a background thread), keyed by deterministic ids with insert-if-absent, so a SIGKILL loses at
most the items in flight and a rerun skips every id already stored as ok, failed or duplicate
(`retry_failed=True` regenerates the failed ones with fresh call seeds, so the response cache
does not replay the failure).

Dedup runs twice, both times correct under concurrency: each shard embeds its own conversations
and checks them against the stored set (ok conversations of *other* batches, loaded once) and
within the shard; `finalize_batch` then recomputes the batch-wide greedy pass in item order, so the
outcome does not depend on how shards were scheduled. Decisions are taken under a Postgres
advisory lock, so two batches deduplicating at once see each other's committed results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from tasks.core.db.engine import get_engine, session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch
from tasks.core.db.models import Persona as PersonaRow
from tasks.core.embeddings import EMBEDDING_DIM
from tasks.core.ids import content_hash
from tasks.core.settings import Settings, get_settings
from tasks.generate.config import GenerationConfig, GenerationError, coerce_config
from tasks.generate.conversation import (
    ASSISTANT_ROLE,
    USER_ROLE,
    BatchPlan,
    ConversationGenerator,
    ItemSpec,
)
from tasks.generate.dedup import embed_conversations, find_duplicates
from tasks.generate.taxonomy import coverage_report, max_coverage_gap

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "duplicate")
DONE_STATUSES = STATUSES  # an id stored with one of these is not generated again
DEDUP_LOCK_KEY = 727_003  # pg_advisory_xact_lock key serialising dedup decisions
EMBED_CHUNK = 512

Progress = Callable[[dict[str, Any]], None]


# ---- plan ---------------------------------------------------------------------------------
def plan_batch(cfg: GenerationConfig | dict[str, Any]) -> dict[str, Any]:
    """Upsert the batch row and its persona pool; return the batch id and its shards."""
    cfg = coerce_config(cfg)
    settings = get_settings()
    plan = BatchPlan(cfg, settings=settings)
    engine = get_engine(settings)
    with session_scope(engine) as session:
        upsert(session, GenerationBatch, [{
            "id": plan.batch_id, "seed": cfg.seed, "requested": cfg.count, "status": "running",
            "params": {"config": cfg.model_dump(mode="json"), "identity": cfg.identity(settings)},
        }], update=["params", "requested", "status"])
        upsert(session, PersonaRow, [p.row() for p in plan.assignment.pool], update=[])
    shards = [{"batch_id": plan.batch_id, "start": start,
               "stop": min(start + cfg.shard_size, cfg.count)}
              for start in range(0, cfg.count, cfg.shard_size)]
    log.info("planned batch %s: %d conversations × %d turns in %d shard(s)", plan.batch_id,
             cfg.count, cfg.turns, len(shards))
    return {"batch_id": plan.batch_id, "shards": shards}


# ---- shards -------------------------------------------------------------------------------
def generate_shard(shard: dict[str, Any], cfg: GenerationConfig | dict[str, Any] | None = None,
                   *, progress: Progress | None = None) -> dict[str, Any]:
    """Generate items [start, stop) of a planned batch, skipping ids already stored; dedup them.

    `cfg` may be omitted: the config stored on the batch row by `plan_batch` is used.
    Returns {"batch_id", "start", "stop", "generated", "skipped", "ok", "failed", "duplicate"}.
    """
    batch_id, start, stop = str(shard["batch_id"]), int(shard["start"]), int(shard["stop"])
    settings = get_settings()
    engine = get_engine(settings)
    cfg = _config_for(engine, batch_id, cfg)
    plan = BatchPlan(cfg, settings=settings)
    if plan.batch_id != batch_id:
        raise GenerationError(
            f"shard belongs to batch {batch_id} but the config describes batch {plan.batch_id}; "
            "pass the same config to plan_batch and generate_shard (or omit cfg to use the "
            "stored one)", batch_id=batch_id)
    outcome = _generate_items(plan, plan.items(start, stop), engine, settings, progress)
    if cfg.dedup:
        outcome["dedup"] = dedup_range(engine, plan, start, stop, scope="shard")
    counts = _status_counts(engine, batch_id, start, stop)
    log.info("batch %s shard [%d, %d): %s", batch_id, start, stop, counts)
    return {"batch_id": batch_id, "start": start, "stop": stop,
            "generated": outcome["generated"], "skipped": outcome["skipped"], **counts}


def _config_for(engine: Engine, batch_id: str,
                cfg: GenerationConfig | dict[str, Any] | None) -> GenerationConfig:
    with session_scope(engine) as session:
        batch = session.get(GenerationBatch, batch_id)
        if batch is None:
            raise GenerationError(
                f"generation batch {batch_id} is not planned in this database; run "
                "plan_batch(cfg) first (or check DATABASE_URL)", batch_id=batch_id)
        stored = (batch.params or {}).get("config")
    if cfg is not None:
        return coerce_config(cfg)
    if not stored:
        raise GenerationError(f"batch {batch_id} has no stored config; pass cfg explicitly",
                              batch_id=batch_id)
    return GenerationConfig(**stored)


def _build_clients(cfg: GenerationConfig, engine: Engine | None,
                   settings: Settings) -> dict[str, Any]:
    """One LLMClient per distinct endpoint chain; user_sim and generator share it when equal."""
    from tasks.core.llm import LLMClient, PostgresResponseCache

    cache = PostgresResponseCache(engine) if engine is not None and cfg.use_cache else None
    clients: dict[str, Any] = {}
    by_chain: dict[str, Any] = {}
    for role in (USER_ROLE, ASSISTANT_ROLE):
        chain = [cfg.endpoint(role, settings), *cfg.fallback_endpoints(role, settings)]
        key = "|".join(ep.label() for ep in chain)
        if key not in by_chain:
            by_chain[key] = LLMClient(chain, max_concurrency=cfg.concurrency,
                                      max_retries=cfg.max_retries,
                                      timeout_s=cfg.timeout_s or settings.llm_timeout_s,
                                      cache=cache)
        clients[role] = by_chain[key]
    return clients


def _existing_ids(engine: Engine, ids: Sequence[str], statuses: Sequence[str]) -> set[str]:
    found: set[str] = set()
    with session_scope(engine) as session:
        for offset in range(0, len(ids), 5000):
            chunk = list(ids[offset: offset + 5000])
            found.update(session.scalars(select(Conversation.id).where(
                Conversation.id.in_(chunk), Conversation.status.in_(list(statuses)))))
    return found


class _RowWriter:
    """Writes finished conversations as they complete: rows arriving while a write is running
    form the next multi-row INSERT, on one background thread, so the event loop never blocks and
    a crash loses at most what is still in flight."""

    def __init__(self, engine: Engine, *, replace_failed: bool) -> None:
        self.engine = engine
        self.replace_failed = replace_failed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-writer")
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, row: dict[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._executor, self._write_rows,
                                           [row for row, _ in batch])
            except Exception as exc:  # the shard fails loudly; a rerun resumes
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        with session_scope(self.engine) as session:
            if not self.replace_failed:
                # Insert-if-absent: a stored conversation is never overwritten by a rerun.
                upsert(session, Conversation, rows, update=[])
                return
            stmt = pg_insert(Conversation).values(rows)
            columns = [c for c in rows[0] if c != "id"]
            session.execute(stmt.on_conflict_do_update(
                index_elements=["id"], set_={c: stmt.excluded[c] for c in columns},
                where=Conversation.status == "failed"))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _unexpected_failure(plan: BatchPlan, item: ItemSpec, exc: BaseException) -> dict[str, Any]:
    return {
        "id": item.id, "batch_id": plan.batch_id, "item_index": item.index,
        "persona_id": item.persona.id, "taxonomy_cell": item.cell,
        "is_edge_case": item.is_edge_case, "system_prompt": plan.system_prompt, "messages": [],
        "status": "failed", "failure_reason": f"unexpected error: {type(exc).__name__}: {exc}",
        "seed": item.seed, "params": {"turns": plan.cfg.turns, "mode": item.mode,
                                      "scenario": item.scenario},
        "template_hashes": {}, "content_hash": content_hash([]),
    }


def _generate_items(plan: BatchPlan, items: Sequence[ItemSpec], engine: Engine,
                    settings: Settings, progress: Progress | None) -> dict[str, Any]:
    from tasks.core.llm import run_sync

    cfg = plan.cfg
    skip_statuses = ("ok", "duplicate") if cfg.retry_failed else DONE_STATUSES
    done = _existing_ids(engine, [item.id for item in items], skip_statuses)
    todo = [item for item in items if item.id not in done]
    attempts = _previous_attempts(engine, [item.id for item in todo]) if cfg.retry_failed else {}
    if progress is not None and done:
        progress({"event": "skipped", "count": len(done)})
    if todo:
        with session_scope(engine) as session:  # personas are normally planned; make sure
            upsert(session, PersonaRow, list({i.persona.id: i.persona.row() for i in todo}
                                             .values()), update=[])
        run_sync(_run_items(plan, todo, engine, settings, progress, attempts))
    return {"generated": len(todo), "skipped": len(done)}


def _previous_attempts(engine: Engine, ids: Sequence[str]) -> dict[str, int]:
    """{id: next attempt number} for items stored as failed (their retry must not replay)."""
    attempts: dict[str, int] = {}
    with session_scope(engine) as session:
        for offset in range(0, len(ids), 5000):
            rows = session.execute(select(Conversation.id, Conversation.params).where(
                Conversation.id.in_(list(ids[offset: offset + 5000])),
                Conversation.status == "failed"))
            for cid, params in rows:
                attempts[cid] = int((params or {}).get("attempt", 0)) + 1
    return attempts


async def _run_items(plan: BatchPlan, items: Sequence[ItemSpec], engine: Engine | None,
                     settings: Settings, progress: Progress | None,
                     attempts: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Generate items with `concurrency` in flight; write each as it completes (engine given)."""
    cfg = plan.cfg
    clients = _build_clients(cfg, engine, settings)
    generator = ConversationGenerator(plan, user_client=clients[USER_ROLE],
                                      assistant_client=clients[ASSISTANT_ROLE],
                                      use_cache=engine is not None and cfg.use_cache,
                                      settings=settings)
    writer = _RowWriter(engine, replace_failed=cfg.retry_failed) if engine is not None else None
    results: list[dict[str, Any] | None] = [None] * len(items)
    queue = iter(enumerate(items))

    async def worker() -> None:
        for position, item in queue:  # one shared iterator: each item is taken once
            try:
                row = await generator.generate(item, (attempts or {}).get(item.id, 0))
            except Exception as exc:  # noqa: BLE001 - one bad item must not kill the batch
                log.exception("conversation %s (item %d) crashed", item.id, item.index)
                row = _unexpected_failure(plan, item, exc)
            if writer is not None:
                await writer.write(row)
            results[position] = row
            if progress is not None:
                progress({"event": "item", "status": row["status"], "id": row["id"]})

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(items)))))
    finally:
        if writer is not None:
            writer.close()
        for client in {id(c): c for c in clients.values()}.values():
            await client.aclose()  # close HTTP pools on this loop before it ends
    return [row for row in results if row is not None]


def _status_counts(engine: Engine, batch_id: str, start: int | None = None,
                   stop: int | None = None) -> dict[str, int]:
    query = select(Conversation.status, func.count()).where(Conversation.batch_id == batch_id)
    if start is not None and stop is not None:
        query = query.where(Conversation.item_index >= start, Conversation.item_index < stop)
    with session_scope(engine) as session:
        found = dict(session.execute(query.group_by(Conversation.status)).tuples().all())
    return {status: int(found.get(status, 0)) for status in STATUSES}


# ---- dedup --------------------------------------------------------------------------------
def _parse_float_array(buffer: bytes | memoryview) -> np.ndarray:
    """A PostgreSQL binary 1-D real[] (array_send) → float32 vector, without Python floats."""
    raw = bytes(buffer)
    ndim = int.from_bytes(raw[0:4], "big")
    header = 12 + 8 * ndim
    pairs = np.frombuffer(raw, dtype=np.dtype([("len", ">i4"), ("value", ">f4")]), offset=header)
    return pairs["value"].astype(np.float32)


def _load_vectors(engine: Engine, where: str, params: dict[str, Any]
                  ) -> tuple[list[str], np.ndarray, np.ndarray, list[str | None]]:
    """(ids, opening vectors, conversation vectors, duplicate_of) of embedded rows matching
    `where`, in item order; vectors travel in PostgreSQL's binary array format."""
    sql = text(
        "SELECT id, duplicate_of, array_send(opening_embedding::real[]) AS o, "
        "array_send(embedding::real[]) AS e "
        f"FROM conversations WHERE {where} AND embedding IS NOT NULL "
        "AND opening_embedding IS NOT NULL ORDER BY item_index, id")
    ids: list[str] = []
    duplicate_of: list[str | None] = []
    opening: list[np.ndarray] = []
    conversation: list[np.ndarray] = []
    with engine.connect() as conn:
        for row in conn.execute(sql, params):
            ids.append(row.id)
            duplicate_of.append(row.duplicate_of)
            opening.append(_parse_float_array(row.o))
            conversation.append(_parse_float_array(row.e))
    if not ids:
        empty = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return ids, empty, empty.copy(), duplicate_of
    return ids, np.vstack(opening), np.vstack(conversation), duplicate_of


def _array_literal(vector: np.ndarray) -> str:
    return "{" + ",".join(np.char.mod("%.8g", vector)) + "}"


def _store_embeddings(engine: Engine, ids: Sequence[str], opening: np.ndarray,
                      conversation: np.ndarray) -> None:
    """One UPDATE ... FROM unnest(...) per chunk (driver-agnostic, no per-row round trips)."""
    sql = text(
        "UPDATE conversations AS c SET opening_embedding = v.o::double precision[], "
        "embedding = v.e::double precision[] "
        "FROM unnest(CAST(:ids AS text[]), CAST(:o AS text[]), CAST(:e AS text[])) AS v(id, o, e) "
        "WHERE c.id = v.id")
    with engine.begin() as conn:
        conn.execute(sql, {"ids": list(ids), "o": [_array_literal(v) for v in opening],
                           "e": [_array_literal(v) for v in conversation]})


def _embed_missing(engine: Engine, batch_id: str, start: int, stop: int,
                   timings: dict[str, float] | None = None) -> int:
    """Embed ok/duplicate conversations of the range that have no embeddings yet."""
    query = (select(Conversation.id, Conversation.messages)
             .where(Conversation.batch_id == batch_id, Conversation.item_index >= start,
                    Conversation.item_index < stop, Conversation.status.in_(["ok", "duplicate"]),
                    (Conversation.embedding.is_(None)) | (Conversation.opening_embedding.is_(None)))
             .order_by(Conversation.item_index))
    with session_scope(engine) as session:
        pending = session.execute(query).all()
    timings = timings if timings is not None else {}
    for offset in range(0, len(pending), EMBED_CHUNK):
        chunk = pending[offset: offset + EMBED_CHUNK]
        started = time.perf_counter()
        opening, conversation = embed_conversations([row.messages for row in chunk])
        timings["embed_s"] = timings.get("embed_s", 0.0) + time.perf_counter() - started
        started = time.perf_counter()
        _store_embeddings(engine, [row.id for row in chunk], opening, conversation)
        timings["store_s"] = timings.get("store_s", 0.0) + time.perf_counter() - started
    return len(pending)


def dedup_range(engine: Engine, plan: BatchPlan, start: int, stop: int, *,
                scope: str = "shard") -> dict[str, Any]:
    """Embed what is missing in [start, stop), then mark near-duplicates (see module docstring).

    Rows already marked duplicate are reconsidered, so the pass is idempotent and a batch-wide
    pass (`scope="batch"`) can overturn a shard's local decision.
    """
    cfg = plan.cfg
    timings: dict[str, float] = {}
    started = time.perf_counter()
    embedded = _embed_missing(engine, plan.batch_id, start, stop, timings)
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DEDUP_LOCK_KEY})
        phase = time.perf_counter()
        stored_ids, stored_open, stored_conv, _ = _load_vectors(
            engine, "batch_id <> :batch AND status = 'ok'", {"batch": plan.batch_id})
        ids, opening, conversation, current = _load_vectors(
            engine, "batch_id = :batch AND item_index >= :start AND item_index < :stop "
                    "AND status IN ('ok', 'duplicate')",
            {"batch": plan.batch_id, "start": start, "stop": stop})
        timings["load_s"] = time.perf_counter() - phase
        phase = time.perf_counter()
        duplicates = find_duplicates(
            ids, opening, conversation, stored_ids=stored_ids, stored_opening=stored_open,
            stored_conversation=stored_conv, opening_threshold=cfg.opening_threshold,
            conversation_threshold=cfg.conversation_threshold)
        timings["search_s"] = time.perf_counter() - phase
        phase = time.perf_counter()
        marked = {d.index: d for d in duplicates}
        changes = 0
        for index, cid in enumerate(ids):
            dup = marked.get(index)
            target = dup.duplicate_of if dup else None
            if current[index] == target:  # duplicate_of is set exactly when duplicate
                continue
            values: dict[str, Any] = {"status": "duplicate" if dup else "ok",
                                      "duplicate_of": target}
            if dup is not None:
                values["failure_reason"] = (f"near-duplicate of {dup.duplicate_of} "
                                            f"({dup.kind} cosine {dup.similarity:.3f} >= "
                                            f"threshold, {dup.against})")
            else:
                values["failure_reason"] = None
            conn.execute(update(Conversation).where(Conversation.id == cid).values(**values))
            changes += 1
        timings["mark_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "scope": scope, "embedded": embedded, "checked": len(ids), "stored": len(stored_ids),
        "duplicates": len(duplicates),
        "against_stored": sum(1 for d in duplicates if d.against == "stored"),
        "within_batch": sum(1 for d in duplicates if d.against == "batch"), "changed": changes,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    log.info("dedup %s [%d, %d) of %s: %s", scope, start, stop, plan.batch_id, summary)
    return summary


# ---- finalize -----------------------------------------------------------------------------
def finalize_batch(batch_id: str, cfg: GenerationConfig | dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Batch-wide dedup, coverage report (target vs achieved share per dimension) and counts.

    Stores counts and coverage on the batch row; status "done", or "incomplete" when items are
    missing (a shard failed: rerun it, then finalize again).
    """
    settings = get_settings()
    engine = get_engine(settings)
    cfg = _config_for(engine, batch_id, cfg)
    plan = BatchPlan(cfg, settings=settings, batch_id=batch_id)
    dedup = dedup_range(engine, plan, 0, cfg.count, scope="batch") if cfg.dedup else None
    counts = _status_counts(engine, batch_id)
    with session_scope(engine) as session:
        ok_rows = session.execute(
            select(Conversation.taxonomy_cell, Conversation.params)
            .where(Conversation.batch_id == batch_id, Conversation.status == "ok")).all()
    cells = []
    for cell, params in ok_rows:
        persona = (params or {}).get("persona") or {}
        cells.append({**(cell or {}), "communication_style": persona.get("communication_style"),
                      "author_profile": persona.get("author_profile")})
    report = coverage_report(plan.targets(), cells)
    gap = max_coverage_gap(report)
    stored = sum(counts.values())
    missing = cfg.count - stored
    status = "done" if missing == 0 else "incomplete"
    coverage = {"basis": "ok conversations", "total": len(cells), "max_gap": gap,
                "dimensions": report}
    batch_counts = {**counts, "requested": cfg.count, "missing": missing}
    if dedup is not None:
        batch_counts["dedup"] = dedup
    with session_scope(engine) as session:
        session.execute(update(GenerationBatch).where(GenerationBatch.id == batch_id).values(
            counts=batch_counts, coverage=coverage, status=status))
    summary = {"batch_id": batch_id, "status": status, "requested": cfg.count, **counts,
               "missing": missing, "max_coverage_gap": gap}
    log.info("finalized batch %s: %s", batch_id, summary)
    return summary


# ---- preview and the in-process run ---------------------------------------------------------
def preview(cfg: GenerationConfig | dict[str, Any], n: int | None = None) -> list[dict[str, Any]]:
    """Generate the first `n` conversations of the batch (default cfg.preview) without any writes
    (no rows, no response cache), for a look before a full run."""
    from tasks.core.llm import run_sync

    cfg = coerce_config(cfg)
    n = cfg.preview if n is None else n
    if n < 1:
        raise GenerationError("preview needs n >= 1; e.g. preview(cfg, 3) or --preview 3")
    settings = get_settings()
    plan = BatchPlan(cfg, settings=settings)
    items = plan.items(0, min(n, cfg.count))
    rows = run_sync(_run_items(plan, items, None, settings, None))
    return [{
        "id": row["id"], "index": row["item_index"], "status": row["status"],
        "failure_reason": row["failure_reason"], "taxonomy_cell": row["taxonomy_cell"],
        "persona": row["params"].get("persona", {}),
        "flaws_by_turn": row["params"].get("flaws_by_turn", []),
        "model": row.get("model", ""), "system_prompt": row["system_prompt"],
        "messages": row["messages"], "token_usage": row.get("token_usage", {}),
    } for row in rows]


def format_preview(items: Sequence[dict[str, Any]], *, width: int = 100) -> str:
    """Human-readable preview: one block per conversation (CLI output and task log)."""
    import textwrap

    blocks: list[str] = []
    for number, item in enumerate(items, start=1):
        cell = item.get("taxonomy_cell", {})
        persona = item.get("persona", {})
        head = (f"── preview {number}/{len(items)} · item {item.get('index')} · "
                f"{item.get('status')} · id {str(item.get('id'))[:12]} ")
        lines = [head + "─" * max(0, width - len(head))]
        subtopic = f"/{cell['subtopic']}" if cell.get("subtopic") else ""
        lines.append(f"cell: topic={cell.get('topic')}{subtopic} · "
                     + " · ".join(f"{k}={v}" for k, v in cell.items()
                                  if k not in ("topic", "subtopic")))
        flaws = [persona.get("primary_flaw"), *persona.get("secondary_flaws", [])]
        flaw_text = ", ".join(f for f in flaws if f) or "none"
        lines.append(f"persona: {persona.get('name')} ({persona.get('communication_style')}; "
                     f"flaws: {flaw_text})")
        if item.get("failure_reason"):
            lines.append(f"FAILED: {item['failure_reason']}")
        for message in item.get("messages", []):
            wrapped = textwrap.fill(message.get("content", ""), width=width - 12,
                                    subsequent_indent=" " * 12, replace_whitespace=False)
            lines.append(f"[{message.get('role')}]".ljust(12) + wrapped)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def run_generation(cfg: GenerationConfig | dict[str, Any],
                   progress: Progress | None = None) -> dict[str, Any]:
    """Plan, generate every shard's items in one in-process pool, finalize (CLI and demo)."""
    cfg = coerce_config(cfg)
    settings = get_settings()
    planned = plan_batch(cfg)
    engine = get_engine(settings)
    plan = BatchPlan(cfg, settings=settings, batch_id=planned["batch_id"])
    # One pool across shards: no idle tail at every shard boundary.
    outcome = _generate_items(plan, plan.items(0, cfg.count), engine, settings, progress)
    summary = finalize_batch(planned["batch_id"], cfg)
    return {**summary, "generated": outcome["generated"], "skipped": outcome["skipped"],
            "shards": len(planned["shards"])}
