"""Benchmark: conversation generation throughput, dedup throughput and near-duplicate search time.

Three measurements, printed side by side in one run:

1. generation: N three-turn conversations through `run_generation` against the fake OpenAI server
   (a subprocess, its own GIL) at 1 s latency with 64 conversations in flight, Postgres writes
   (conversations, batch, personas, the LLM response cache) included, on a throwaway database on
   127.0.0.1:5432. Each conversation makes 2 × turns sequential LLM calls, so
   ideal = concurrency / (latency × calls per conversation) conversations/s and
   `ratio=<achieved/ideal>` (target >= 0.90).
2. dedup: the pipeline's dedup pass over the generated batch (`dedup_range`: MiniLM embeddings of
   the opening message and of the whole conversation, stored to Postgres, loaded back, blocked
   search, status updates) vs a raw MiniLM encode of the same texts:
   `dedup_ratio=<raw encode time / dedup time>` (target >= 0.90), on the first --dedup-n
   conversations, best of --rounds interleaved runs in alternating order (the machine is shared; min is the fair pick).
3. near-duplicate search alone (`find_duplicates`) for 20k conversations against 20k stored ones,
   on random unit vectors (two 384-d embeddings each): seconds.

    .venv/bin/python bench/generate.py [--count 1000] [--turns 3] [--concurrency 64]
                                       [--latency 1.0] [--search-n 20000] [--skip-generation]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

ADMIN_URL = os.environ.get("TUNELOOP_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MODEL = "fake-model"


def _create_database() -> tuple[str, str]:
    name = f"tuneloop_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(name: str) -> None:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def bench_generation(args: argparse.Namespace) -> str:
    """Run the generation benchmark; return the batch id (for the dedup benchmark)."""
    from tasks.generate import GenerationConfig, run_generation
    from tests.fakes.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer(latency_s=args.latency, subprocess=True,
                          responder="tests.fakes.generation_replies:reply") as server:
        cfg = GenerationConfig(
            count=args.count, turns=args.turns, seed=args.seed, concurrency=args.concurrency,
            shard_size=args.count, dedup=False, generator_base_url=server.base_url,
            user_sim_base_url=server.base_url, generator_model=MODEL, user_sim_model=MODEL,
            timeout_s=60,
        )
        import openai  # noqa: F401 - a one-time import, not generation work

        started = time.perf_counter()
        summary = run_generation(cfg)
        elapsed = time.perf_counter() - started
        stats = server.stats()
    calls = 2 * args.turns
    achieved = args.count / elapsed
    ideal = args.concurrency / (args.latency * calls)
    print(f"generate: {args.count} conversations x {args.turns} turns ({calls} sequential LLM calls "
          f"each), {args.concurrency} in flight, {args.latency:g} s latency, Postgres writes on")
    print(f"  wall={elapsed:.1f}s achieved={achieved:.2f} conv/s ideal={ideal:.2f} conv/s "
          f"ok={summary['ok']} failed={summary['failed']} llm_requests={stats['total']} "
          f"max_in_flight={stats.get('max_in_flight', 'n/a')}")
    print(f"ratio={achieved / ideal:.3f}")
    if summary["failed"]:
        from sqlalchemy import select

        from tasks.core.db.engine import get_engine, session_scope
        from tasks.core.db.models import Conversation

        with session_scope(get_engine()) as session:
            reasons = session.scalars(select(Conversation.failure_reason).where(
                Conversation.batch_id == summary["batch_id"], Conversation.status == "failed"
            ).limit(3)).all()
        print(f"  failure reasons (first 3): {reasons}")
    return summary["batch_id"]


def bench_dedup(batch_id: str, n: int, rounds: int) -> None:
    from tasks.core.db.engine import get_engine, session_scope
    from tasks.core.db.models import Conversation, GenerationBatch
    from tasks.core.embeddings import embed, get_embedder
    from tasks.generate import GenerationConfig, dedup_range
    from tasks.generate.conversation import BatchPlan
    from tasks.generate.dedup import conversation_text, opening_text

    engine = get_engine()
    with session_scope(engine) as session:
        stored = session.get(GenerationBatch, batch_id).params["config"]
        messages = [m for (m,) in session.query(Conversation.messages)
                    .filter(Conversation.batch_id == batch_id, Conversation.item_index < n,
                            Conversation.status.in_(["ok", "duplicate"]))
                    .order_by(Conversation.item_index)]
    cfg = GenerationConfig(**{**stored, "dedup": True})
    plan = BatchPlan(cfg, batch_id=batch_id)
    texts = [opening_text(m) for m in messages] + [conversation_text(m) for m in messages]
    get_embedder()  # model load is not part of either measurement
    embed(texts[:64])

    def raw_encode() -> None:
        started = time.perf_counter()
        embed(texts)
        raw_times.append(time.perf_counter() - started)

    def dedup_pass() -> None:
        started = time.perf_counter()
        summary = dedup_range(engine, plan, 0, n, scope="batch")
        dedup_runs.append((time.perf_counter() - started, summary))

    raw_times: list[float] = []
    dedup_runs: list[tuple[float, dict]] = []
    for round_index in range(rounds):  # interleaved, alternating order, best of each
        with engine.begin() as conn:
            conn.execute(text("UPDATE conversations SET embedding = NULL, opening_embedding = NULL,"
                              " duplicate_of = NULL, failure_reason = NULL, status = 'ok' "
                              "WHERE batch_id = :b AND status IN ('ok', 'duplicate')"),
                         {"b": batch_id})
        for step in ((raw_encode, dedup_pass) if round_index % 2 == 0
                     else (dedup_pass, raw_encode)):
            step()
    raw = min(raw_times)
    dedup, summary = min(dedup_runs, key=lambda run: run[0])
    phases = " ".join(f"{k}={v:.2f}s" for k, v in summary["timings"].items())
    print(f"dedup: {len(messages)} conversations = {len(texts)} texts (opening + whole), best of "
          f"{rounds} interleaved: raw_encode={raw:.2f}s ({len(texts) / raw:.1f} texts/s) "
          f"dedup_pass={dedup:.2f}s ({len(texts) / dedup:.1f} texts/s; {phases}; "
          f"duplicates={summary['duplicates']})")
    print(f"dedup_ratio={raw / dedup:.3f}")


def bench_search(n: int, stored: int) -> None:
    from tasks.generate.dedup import find_duplicates

    rng = np.random.default_rng(0)

    def unit(rows: int) -> np.ndarray:
        vectors = rng.normal(size=(rows, 384)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    opening, whole = unit(n), unit(n)
    stored_open, stored_whole = unit(stored), unit(stored)
    ids = [f"c{i}" for i in range(n)]
    stored_ids = [f"s{i}" for i in range(stored)]
    for size in (n // 4, n // 2, n):
        started = time.perf_counter()
        found = find_duplicates(ids[:size], opening[:size], whole[:size], stored_ids=stored_ids,
                                stored_opening=stored_open, stored_conversation=stored_whole)
        elapsed = time.perf_counter() - started
        print(f"near_dup_search: {size} conversations vs {stored} stored (+ within the batch), "
              f"2 x 384-d embeddings: {elapsed:.2f}s duplicates={len(found)}")
    print(f"near_dup_search_{n // 1000}k_s={elapsed:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--rounds", type=int, default=3, help="dedup measurement rounds")
    parser.add_argument("--dedup-n", type=int, default=300,
                        help="conversations of the batch used for the dedup comparison")
    parser.add_argument("--search-n", type=int, default=20_000)
    parser.add_argument("--skip-generation", action="store_true",
                        help="only the near-duplicate search benchmark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if not args.skip_generation:
        name, url = _create_database()
        os.environ["DATABASE_URL"] = url
        try:
            from tasks.core.db.engine import get_engine, migrate
            from tasks.core.settings import get_settings

            get_settings.cache_clear()
            migrate(get_engine())
            batch_id = bench_generation(args)
            bench_dedup(batch_id, args.dedup_n, args.rounds)
        finally:
            from tasks.core.db.engine import get_engine

            get_engine().dispose()
            _drop_database(name)
    bench_search(args.search_n, args.search_n)


if __name__ == "__main__":
    main()
