"""Traffic simulator: simulated users talk to the router and react, so a shadow report has data.

Each simulated request comes from one of `users` users (drawn with a seeded RNG), asks for a tip
about a subtopic of the input taxonomy (include/rubrics/taxonomy.yaml) through the router's
OpenAI-compatible API (the official `openai` client) with a client's API key, and the user reacts
through `POST /v1/reactions` (same key, same `user`): with probability `preference[variant]` a
`done` with a dwell inside the magic zone (15 s–2 min), otherwise a quick `dismiss` (< 5 s). The
router never tells a client which variant answered, so the simulator, which plays both the users
and the experimenter, reads it where the router stores it: once every request is answered, the
`interactions.variant` of each interaction id is read from PostgreSQL (polling until the router's
log has written them), then the reactions are posted. Every random draw of request i comes from
an RNG seeded by (seed, i), so the same seed gives the same users, prompts and reactions whatever
the concurrency. 429s from the router are retried after their Retry-After. Run:
`python -m tasks.shadow.simulate --requests 400`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from tasks.core.ids import stable_id
from tasks.core.paths import RUBRICS_DIR
from tasks.shadow.config import SignalWindows

log = logging.getLogger(__name__)

VARIANTS = ("champion", "challenger")


class SimulationError(RuntimeError):
    """The simulation cannot run; carries the router URL it was pointed at."""

    def __init__(self, message: str, *, router_url: str) -> None:
        super().__init__(message)
        self.router_url = router_url


def taxonomy_prompts(path: Any = None) -> list[str]:
    """One tip request per subtopic of the taxonomy's `topic` dimension."""
    import yaml

    data = yaml.safe_load((path or RUBRICS_DIR / "taxonomy.yaml").read_text(encoding="utf-8"))
    topics = data["dimensions"]["topic"]["values"]
    return [f"Give me one short, practical tip about {subtopic}."
            for topic in topics.values() for subtopic in topic.get("subtopics", [])]


def _validate(users: int, requests: int, preference: dict[str, float],
              concurrency: int) -> None:
    if users < 1 or requests < 1 or concurrency < 1:
        raise ValueError(f"users, requests and concurrency must be >= 1, got {users}, "
                         f"{requests}, {concurrency}; e.g. users=50, requests=400")
    unknown = set(preference) - set(VARIANTS)
    if unknown:
        raise ValueError(f"preference names unknown variants {sorted(unknown)}; use champion "
                         "and challenger, e.g. {'champion': 0.5, 'challenger': 0.7}")
    bad = {k: v for k, v in preference.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"preferences are probabilities in [0, 1], got {bad}; e.g. 0.7")


def plan_reaction(rng: random.Random, preference: float,
                  windows: SignalWindows) -> tuple[str, int]:
    """(reaction, dwell_ms): done in the magic zone with probability `preference`, else a quick
    dismiss."""
    if rng.random() < preference:
        return "done", rng.randint(windows.done_min_ms, windows.done_max_ms)
    return "dismiss", rng.randint(0, windows.dismiss_max_ms - 1)


@dataclass
class _Answered:
    """One answered request: its RNG (the reaction draws come next), user and interaction id."""

    index: int
    rng: random.Random
    user: str
    interaction_id: str


def stored_variants(engine: Any, interaction_ids: Sequence[str], *, timeout_s: float = 30.0,
                    poll_s: float = 0.1) -> dict[str, str]:
    """interaction id -> the variant that served it, as the router stored it; polls until every
    id is written or `timeout_s` passes (ids still missing are left out)."""
    from sqlalchemy import select

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Interaction

    wanted = set(interaction_ids)
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        missing = sorted(wanted - found.keys())
        with session_scope(engine) as session:  # one session per poll
            for start in range(0, len(missing), 1000):
                found.update(session.execute(
                    select(Interaction.id, Interaction.variant)
                    .where(Interaction.id.in_(missing[start:start + 1000]))).tuples().all())
        if len(found) == len(wanted) or time.monotonic() > deadline:
            return found
        time.sleep(poll_s)


async def _post_reaction(http: httpx.AsyncClient, body: dict[str, Any], key: str) -> int:
    for _ in range(8):
        response = await http.post("/reactions", json=body, headers={"Idempotency-Key": key})
        if response.status_code != 429:
            return response.status_code
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
    return 429


async def _simulate(router_url: str, api_key: str, *, users: int, requests: int,
                    preference: dict[str, float], seed: int, concurrency: int,
                    prompts: Sequence[str], model: str | None, max_tokens: int,
                    timeout_s: float, windows: SignalWindows, engine: Any,
                    variant_timeout_s: float) -> dict[str, Any]:
    import openai

    base_url = router_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"}
    by_variant = {v: {"requests": 0, "done": 0, "dismiss": 0} for v in VARIANTS}
    totals = {"ok": 0, "failed": 0, "reactions": 0, "reaction_failures": 0, "unattributed": 0}
    errors: list[str] = []
    answered: list[_Answered] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as http:
        if model is None:
            listed = await http.get("/models")
            if listed.status_code != 200:
                raise SimulationError(f"GET /models answered {listed.status_code}: "
                                      f"{listed.text[:200]}", router_url=router_url)
            model = listed.json()["data"][0]["id"]
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=6,
                                    timeout=timeout_s)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            rng = random.Random(stable_id("simulate", seed, index))
            user = f"sim-user-{seed}-{rng.randrange(users)}"
            prompt = rng.choice(prompts)
            async with semaphore:
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=model, user=user, max_tokens=max_tokens, temperature=0.7,
                        messages=[{"role": "user", "content": prompt}],
                        metadata={"source": "simulator", "seed": str(seed)})
                except openai.OpenAIError as exc:
                    totals["failed"] += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    return
                totals["ok"] += 1
                answered.append(_Answered(index, rng, user, raw.headers["x-interaction-id"]))

        async def react(item: _Answered, variant: str) -> None:
            stats = by_variant.setdefault(variant, {"requests": 0, "done": 0, "dismiss": 0})
            stats["requests"] += 1
            reaction, dwell_ms = plan_reaction(item.rng, preference.get(variant, 0.5), windows)
            async with semaphore:
                status = await _post_reaction(
                    http, {"interaction_id": item.interaction_id, "reaction": reaction,
                           "dwell_ms": dwell_ms, "user": item.user},
                    stable_id("simulate-reaction", seed, item.index, item.interaction_id))
            if status in (200, 201, 202):
                totals["reactions"] += 1
                stats[reaction] += 1
            else:
                totals["reaction_failures"] += 1

        try:
            await asyncio.gather(*(one(i) for i in range(requests)))
        finally:
            await client.close()
        answered.sort(key=lambda item: item.index)
        variants = await asyncio.to_thread(
            stored_variants, engine, [item.interaction_id for item in answered],
            timeout_s=variant_timeout_s)
        totals["unattributed"] = sum(item.interaction_id not in variants for item in answered)
        await asyncio.gather(*(react(item, variants[item.interaction_id]) for item in answered
                               if item.interaction_id in variants))
    return {**totals, "by_variant": by_variant, "errors": errors}


def simulate_traffic(
    router_url: str,
    api_key: str,
    *,
    users: int = 50,
    requests: int = 400,
    preference: dict[str, float] | None = None,
    seed: int = 0,
    concurrency: int = 8,
    prompts: Sequence[str] | None = None,
    model: str | None = None,
    max_tokens: int = 64,
    timeout_s: float = 300.0,
    windows: SignalWindows | None = None,
    engine: Any = None,
    variant_timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Send `requests` chat requests from `users` simulated users through the router at
    `router_url` (…/v1) with the client key `api_key`, then post their reactions.

    `engine`: the router's database, where the variant of each answer is read (default:
    `tasks.core.db.engine.get_engine()`, the database the router uses by default); an answer
    whose row is not written within `variant_timeout_s` gets no reaction ("unattributed").

    Returns {"requests", "ok", "failed", "reactions", "reaction_failures", "unattributed",
    "elapsed_s", "by_variant": {variant: {"requests", "done", "dismiss"}}, "errors": [first few]}.
    """
    preference = dict(preference or {"champion": 0.5, "challenger": 0.5})
    _validate(users, requests, preference, concurrency)
    prompts = list(prompts) if prompts else taxonomy_prompts()
    started = time.perf_counter()
    from tasks.core.llm import run_sync

    if engine is None:
        from tasks.core.db.engine import get_engine

        engine = get_engine()
    result = run_sync(_simulate(
        router_url, api_key, users=users, requests=requests, preference=preference, seed=seed,
        concurrency=concurrency, prompts=prompts, model=model, max_tokens=max_tokens,
        timeout_s=timeout_s, windows=windows or SignalWindows(), engine=engine,
        variant_timeout_s=variant_timeout_s))
    result = {"requests": requests, **result,
              "elapsed_s": round(time.perf_counter() - started, 3)}
    log.info("simulated %d requests (%d ok, %d failed), %d reactions: %s", requests,
             result["ok"], result["failed"], result["reactions"], result["by_variant"])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from tasks.core.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(description="simulate users and reactions via the router")
    parser.add_argument("--router-url", default=f"http://127.0.0.1:{settings.router_port}/v1")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--champion", type=float, default=0.5, help="P(done) for champion")
    parser.add_argument("--challenger", type=float, default=0.7, help="P(done) for challenger")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = simulate_traffic(
        args.router_url, settings.router_api_key.get_secret_value(), users=args.users,
        requests=args.requests, seed=args.seed, concurrency=args.concurrency,
        preference={"champion": args.champion, "challenger": args.challenger})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
