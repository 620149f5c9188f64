"""Benchmark: LLMClient throughput against the fake OpenAI server, side by side with bare AsyncOpenAI.

The fake server runs in a subprocess (its own GIL) with a fixed latency; N requests go through
with C in flight. ideal = C / latency requests/s, and every line prints ratio = achieved / ideal
for, in the same run and against the same server:

- `bare`: a plain `openai.AsyncOpenAI` loop (semaphore + create), the practical ceiling;
- `llmclient`: LLMClient with no cache (aiohttp transport, the default when installed);
- `llmclient-httpx`: the same on the SDK's default httpx transport, for comparison;
- `llmclient+pgcache`: LLMClient with the Postgres response cache, cold (every request misses and
  is written), when a PostgreSQL is reachable (TUNELOOP_TEST_ADMIN_URL or 127.0.0.1:5432).

Target: llmclient ratio >= 0.90 at 1 s latency. At 200 ms the client's CPU becomes the limit.

    .venv/bin/python bench/llm_client.py [--requests 640] [--concurrency 64] [--latencies 1.0 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.core.llm import LLMClient, PostgresResponseCache  # noqa: E402
from tasks.core.settings import Endpoint  # noqa: E402
from tests.fakes.fake_openai import FakeOpenAIServer  # noqa: E402

MODEL = "fake-model"


def _messages(tag: str, i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": f"request {tag} {i}: say something short"}]


async def run_bare(base_url: str, n: int, concurrency: int, tag: str) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with semaphore:
            completion = await client.chat.completions.create(
                model=MODEL, messages=_messages(tag, i), temperature=0.7, max_tokens=256)
            return completion.choices[0].message.content is not None

    await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the connection pool
    started = time.perf_counter()
    oks = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed, sum(oks)


async def run_llmclient(base_url: str, n: int, concurrency: int, tag: str,
                        cache: PostgresResponseCache | None,
                        http_backend: str = "auto") -> tuple[float, int]:
    client = LLMClient([Endpoint(base_url=base_url, model=MODEL)],
                       max_concurrency=concurrency, cache=cache,
                       http_backend=http_backend)  # type: ignore[arg-type]
    await client.chat_many([_messages(f"warm-{tag}", i) for i in range(concurrency)],
                           max_tokens=256)
    started = time.perf_counter()
    results = await client.chat_many([_messages(tag, i) for i in range(n)], max_tokens=256)
    elapsed = time.perf_counter() - started
    await client.aclose()
    return elapsed, sum(r.ok for r in results)


def _throwaway_database():
    """(engine, drop) on a fresh migrated database, or (None, reason) when none is reachable."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tasks.core.db.engine import migrate

    admin_url = os.environ.get("TUNELOOP_TEST_ADMIN_URL",
                               "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"tuneloop_bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - the cache line is optional
        return None, f"no PostgreSQL reachable at {admin_url}: {type(exc).__name__}"
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, pool_size=4, max_overflow=4)
    migrate(engine)

    def drop() -> None:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return engine, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latencies", type=float, nargs="+", default=[1.0, 0.2])
    parser.add_argument("--no-cache", action="store_true", help="skip the Postgres cache line")
    args = parser.parse_args()

    engine, drop = (None, "disabled by --no-cache") if args.no_cache else _throwaway_database()
    print(f"# {args.requests} requests, {args.concurrency} in flight, fake server in a "
          f"subprocess, {os.cpu_count()} CPUs")
    try:
        for latency in args.latencies:
            ideal = args.concurrency / latency
            with FakeOpenAIServer(latency_s=latency, subprocess=True) as server:
                runs: list[tuple[str, PostgresResponseCache | None]] = [
                    ("bare", None), ("llmclient", None), ("llmclient-httpx", None)]
                if engine is not None:
                    runs.append(("llmclient+pgcache", PostgresResponseCache(engine)))
                for name, cache in runs:
                    tag = f"{name}-{latency}"
                    if name == "bare":
                        coro = run_bare(server.base_url, args.requests, args.concurrency, tag)
                    else:
                        backend = "httpx" if name.endswith("-httpx") else "auto"
                        coro = run_llmclient(server.base_url, args.requests, args.concurrency,
                                             tag, cache, backend)
                    elapsed, ok = asyncio.run(coro)
                    achieved = args.requests / elapsed
                    print(f"latency={latency:g}s client={name:<18} ok={ok}/{args.requests} "
                          f"req/s={achieved:.1f} ideal={ideal:.1f} "
                          f"ratio={achieved / ideal:.3f}", flush=True)
            if engine is None and drop:
                print(f"# llmclient+pgcache skipped: {drop}")
    finally:
        if engine is not None and callable(drop):
            drop()


if __name__ == "__main__":
    main()
