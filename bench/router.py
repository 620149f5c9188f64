"""Benchmark: latency the router adds over calling the backend directly, and interaction-log rate.

Three processes: the fake OpenAI backend (subprocess, uvloop, fixed small latency), the router
(`python -m serving.router`, its own process, backed by a throwaway PostgreSQL database for
the interaction log) and this process, an open-loop load generator: request i is sent at
t0 + i / rate whatever happened to earlier ones. Phases alternate direct → router → direct → …
so drifting load on a shared machine hits both sides alike; each request is a non-streaming chat
completion from one of 1000 users. The router runs its production front door: three named
clients (TUNELOOP_ROUTER_CLIENTS, keys stored as digests) whose keys the requests rotate through,
the default body and message limits, per-client and per-user rate limits (far above the bench
rate, so none answers 429) and a fresh X-Request-Id on every routed request (the in-memory
request-id check, no database read); its log counters come from GET /v1/router/state with the
admin key. Printed, measured in the same run:

- p50/p99 of direct and routed requests, `p50_added_ms` and `p99_added_ms` (routed − direct,
  pooled over all rounds; target p99 <= 3 ms), and `p99_added_ms_median_of_rounds` (the median
  of each round's routed − direct p99: one stall of the shared machine moves it little), the router's CPU time per request next to the backend's (what the
  latency turns into once cores are contended), and the router's own log counters
  (written/dropped/queued) at that rate;
- `interaction_log_rows_per_s`: the batch writer draining 20k queued rows, side by side with
  row-at-a-time writes (`batched_vs_single_ratio`).

    .venv/bin/python bench/router.py [--rate 300] [--seconds 5] [--rounds 3] [--latency-ms 5]
                                     [--router-args=--no-gc-freeze]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    uvloop = None

from serving.interactions import InteractionLog, interaction_row  # noqa: E402
from serving.router_config import key_digest  # noqa: E402
from tasks.core.settings import DEFAULT_LOCAL_MODEL  # noqa: E402
from tests.fakes.fake_openai import FakeOpenAIServer  # noqa: E402

CLIENT_KEYS = {name: f"bench-{name}-key-{uuid.uuid4().hex}" for name in ("web", "app", "batch")}
ADMIN_KEY = f"bench-admin-key-{uuid.uuid4().hex}"
PUBLIC_MODEL = "tuneloop-bench"
ADMIN_URL = os.environ.get("TUNELOOP_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def throwaway_database() -> tuple[str, object]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tasks.core.db.engine import engine_for, migrate

    name = f"tuneloop_bench_router_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate(engine_for(url))

    def drop() -> None:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_router(backend_url: str, database_url: str,
                 extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url,
           "TUNELOOP_ROUTER_CHAMPION_BASE_URL": backend_url,
           "TUNELOOP_ROUTER_CLIENTS": json.dumps({name: key_digest(key)
                                                  for name, key in CLIENT_KEYS.items()}),
           "TUNELOOP_ROUTER_ADMIN_KEY": ADMIN_KEY,
           "TUNELOOP_REGISTERED_MODEL_NAME": PUBLIC_MODEL,
           "TUNELOOP_LLM_MODEL": DEFAULT_LOCAL_MODEL}
    log_file = tempfile.NamedTemporaryFile("w+", prefix="bench-router-", suffix=".log")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.router", "--port", str(port), "--no-registry",
         *extra_args],
        cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    process.log_file = log_file  # type: ignore[attr-defined]  # closed (deleted) with the bench
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_file.seek(0)
            raise RuntimeError(f"router exited: {log_file.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                return process, f"{base}/v1"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("router did not answer /health within 60 s")


async def phase(session, url: str, model: str, rate: float, seconds: float,
                tag: str) -> tuple[list[float], int, float]:
    """Open loop: schedule n = rate * seconds requests at fixed times; return latencies (ms)."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    keys = list(CLIENT_KEYS.values())

    async def one(i: int) -> None:
        nonlocal errors
        body = {"model": model, "max_tokens": 16, "user": f"bench-user-{i % 1000}",
                "messages": [{"role": "user", "content": f"one short tip please ({tag} {i})"}]}
        # Both sides get the same headers (the backend ignores them).
        headers = {"Authorization": f"Bearer {keys[i % len(keys)]}",
                   "Content-Type": "application/json", "X-Request-Id": f"{tag}-{i}"}
        started = time.perf_counter()
        async with session.post(url, json=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                errors += 1
                return
        latencies.append((time.perf_counter() - started) * 1000.0)

    n = int(rate * seconds)
    start = loop.time() + 0.05
    tasks = []
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    return latencies, errors, n / elapsed


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux /proc), 0.0 when unavailable."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(backend_url: str, router_url: str, rate: float, seconds: float,
               rounds: int, pids: dict[str, int | None]) -> dict[str, list[float]]:
    import aiohttp

    results: dict[str, list[float]] = {"direct": [], "router": []}
    errors = {"direct": 0, "router": 0}
    achieved = {"direct": [], "router": []}
    per_round: dict[str, list[float]] = {"direct": [], "router": []}  # p99 of each phase
    cpu = {(name, key): 0.0 for name in results for key in pids}
    # The load generator's own pauses land on both sides' tails: a full garbage collection of
    # this process's heap (numpy, SQLAlchemy, FastAPI imported for the log benchmark) stalled
    # its event loop for ~100 ms mid-phase. Freeze the heap so collections stay small.
    gc.collect()
    gc.freeze()
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=1000)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm both paths at the bench rate (connection pools, the router's first-request
        # work, its writer's first batches): the first timed router phase after a 0.5 s warm-up
        # at 100 req/s had a p99 2-3x the others'.
        await phase(session, f"{backend_url}/chat/completions", DEFAULT_LOCAL_MODEL, rate, 2.0,
                    "warm")
        await phase(session, f"{router_url}/chat/completions", PUBLIC_MODEL, rate, 2.0, "warm")
        for round_ in range(rounds):
            for name, url, model in (
                ("direct", f"{backend_url}/chat/completions", DEFAULT_LOCAL_MODEL),
                ("router", f"{router_url}/chat/completions", PUBLIC_MODEL),
            ):
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                lat, err, rps = await phase(session, url, model, rate, seconds, f"{name}{round_}")
                for key, pid in pids.items():
                    cpu[(name, key)] += cpu_seconds(pid) - before[key]
                results[name].extend(lat)
                errors[name] += err
                achieved[name].append(rps)
                per_round[name].append(float(np.percentile(lat, 99)) if lat else float("nan"))
    for name in results:
        lat = np.array(results[name])
        print(f"{name}: n={lat.size} errors={errors[name]} "
              f"sent_rps={np.mean(achieved[name]):.1f} p50_ms={np.percentile(lat, 50):.3f} "
              f"p90_ms={np.percentile(lat, 90):.3f} p99_ms={np.percentile(lat, 99):.3f}")
    # A stall of the shared machine (either side's) lands in the pooled p99 of whichever phase
    # it hit; each round's router phase runs right after its direct phase, so the median over
    # rounds of (router p99 - direct p99) is the figure that a single stall does not move.
    print("p99_ms_per_round " + " ".join(
        f"{name}=[{', '.join(f'{v:.1f}' for v in values)}]" for name, values in per_round.items()))
    added = [r - d for d, r in zip(per_round["direct"], per_round["router"], strict=True)]
    print(f"p99_added_ms_median_of_rounds={float(np.median(added)):.3f} "
          f"(per round: {', '.join(f'{v:.1f}' for v in added)})")
    routed = len(results["router"]) or 1
    direct = len(results["direct"]) or 1
    print(f"router_cpu_ms_per_request={1000 * cpu[('router', 'router')] / routed:.3f} "
          f"backend_cpu_ms_per_request={1000 * cpu[('direct', 'backend')] / direct:.3f} "
          f"(process CPU time over the timed phases)")
    return results


def log_throughput(database_url: str, rows: int, single_rows: int) -> tuple[float, float]:
    from tasks.core.db.engine import engine_for

    engine = engine_for(database_url)
    messages = [{"role": "system", "content": "You give short, kind, practical tips. " * 3},
                {"role": "user", "content": "How do I start a budget when money is tight? " * 2}]
    response = "Write down every expense for one week, then pick one category to trim. " * 3

    def rate(batch_size: int, n: int) -> float:
        writer = InteractionLog(engine, batch_size=batch_size, flush_interval_s=0.05,
                                queue_max=n + 1)
        batch = [interaction_row(id=uuid.uuid4().hex, user_hash=uuid.uuid4().hex * 2,
                                 variant="champion", model_name="bench", model_version="1",
                                 context={"mode": "canary", "share": 0.05,
                                          "params": {"max_tokens": 64}},
                                 request_messages=messages, response=response, latency_ms=12.5)
                 for _ in range(n)]
        started = time.perf_counter()
        writer.start()
        for row in batch:
            writer.submit(row)
        writer.flush(600)
        elapsed = time.perf_counter() - started
        writer.close()
        assert writer.written == n, writer.stats()
        return n / elapsed

    return rate(256, rows), rate(1, single_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--log-rows", type=int, default=20_000)
    parser.add_argument("--router-args", default="",
                        help="extra router flags, e.g. --router-args=--no-gc-freeze")
    args = parser.parse_args()

    database_url, drop = throwaway_database()
    router = None
    try:
        with FakeOpenAIServer(subprocess=True, latency_s=args.latency_ms / 1000.0,
                              model_ids=(DEFAULT_LOCAL_MODEL,)) as backend:
            router, router_url = start_router(backend.base_url, database_url,
                                              tuple(args.router_args.split()))
            print(f"backend latency {args.latency_ms} ms, open loop {args.rate:.0f} req/s, "
                  f"{args.rounds} x {args.seconds:.0f} s per side, cpus={os.cpu_count()}, "
                  f"loadavg={os.getloadavg()[0]:.1f}")
            backend_process = getattr(backend, "_process", None)
            pids = {"router": router.pid,
                    "backend": backend_process.pid if backend_process is not None else None}
            # uvloop in the load generator too: its own CPU per request competes with both
            # sides for the two cores, and its tail lands in both sides' p99.
            runner = uvloop.run if uvloop is not None else asyncio.run
            results = runner(load(backend.base_url, router_url, args.rate, args.seconds,
                                       args.rounds, pids))
            direct, routed = np.array(results["direct"]), np.array(results["router"])
            print(f"p50_added_ms={np.percentile(routed, 50) - np.percentile(direct, 50):.3f}")
            print(f"p99_added_ms={np.percentile(routed, 99) - np.percentile(direct, 99):.3f}")
            request = urllib.request.Request(f"{router_url}/router/state",
                                             headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            time.sleep(0.5)
            with urllib.request.urlopen(request, timeout=10) as response:
                stats = json.loads(response.read())["log"]
            print(f"router_log: written={stats['written']} dropped={stats['dropped']} "
                  f"failed={stats['failed']} queued={stats['queued']} batches={stats['batches']}")
        batched, single = log_throughput(database_url, args.log_rows, max(500, args.log_rows // 20))
        print(f"interaction_log_rows_per_s={batched:.0f} (batch 256) vs {single:.0f} "
              f"(row at a time): batched_vs_single_ratio={batched / single:.1f}")
    finally:
        if router is not None:
            router.terminate()
            try:
                router.wait(timeout=30)
            except subprocess.TimeoutExpired:
                router.kill()
        drop()


if __name__ == "__main__":
    main()
