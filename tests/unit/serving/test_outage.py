"""Acceptance (#15): a 60 s PostgreSQL outage under 50 req/s loses 0 interactions and 0 reactions.

A TCP proxy (tests/fakes/tcp_proxy.py) stands in front of the test database; the interaction
log writes through it while traffic arrives the way the router sends it (an interaction row per
request, a reaction for every third answer shortly after). The proxy then cuts PostgreSQL off —
live connections reset, new ones refused — for TUNELOOP_TEST_OUTAGE_S seconds (default 60; set
it lower for a quick run), brings it back, and every id sent must be in the database. A shorter
variant drives the real router app over HTTP with a fake OpenAI backend, reacting before, during
and after the outage (also while the spool replays).
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import func, select

from serving.interactions import InteractionLog, interaction_row, reaction_row
from tasks.core.db.engine import session_scope
from tasks.core.db.models import Interaction, Reaction

OUTAGE_S = float(os.environ.get("TUNELOOP_TEST_OUTAGE_S", "60"))
RATE_PER_S = float(os.environ.get("TUNELOOP_TEST_OUTAGE_RATE", "50"))
ROUTER_OUTAGE_S = float(os.environ.get("TUNELOOP_TEST_ROUTER_OUTAGE_S", "5"))
REACTION_EVERY = 3  # a reaction for every third answer


@dataclass
class Traffic:
    """Interaction rows at a steady rate, as the router submits them, and a reaction for every
    third one on the next tick, as the reactions API hands them over during an outage."""

    writer: InteractionLog
    rate_per_s: float
    interactions: list[str] = field(default_factory=list)
    reactions: list[str] = field(default_factory=list)
    submit_us: list[float] = field(default_factory=list)
    rejected: int = 0
    outage: bool = False  # the database is down: what a reaction names is held by the log

    def run(self, seconds: float) -> None:
        interval = 1.0 / self.rate_per_s
        next_at = time.monotonic()
        end = next_at + seconds
        waiting_reaction: str | None = None
        while next_at < end:
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            next_at += interval
            if waiting_reaction is not None:
                self._react(waiting_reaction)
                waiting_reaction = None
            interaction_id = self._answer()
            if len(self.interactions) % REACTION_EVERY == 0:
                waiting_reaction = interaction_id
        if waiting_reaction is not None:
            self._react(waiting_reaction)

    def _answer(self) -> str:
        n = len(self.interactions)
        row = interaction_row(
            id=uuid.uuid4().hex, user_hash=f"{n % 97:064d}", variant="champion",
            model_name="champ-base", model_version="3", client_id="key-outage",
            request_id=f"req-{uuid.uuid4().hex}",
            context={"mode": "off", "share": 0.0, "params": {"max_tokens": 64}},
            request_messages=[{"role": "user", "content": f"question {n}: how do I budget?"}],
            response=f"answer {n}: write down every expense for a week", latency_ms=12.0)
        started = time.perf_counter()
        accepted = self.writer.submit(row)
        self.submit_us.append((time.perf_counter() - started) * 1e6)
        self.rejected += not accepted
        self.interactions.append(row["id"])
        return row["id"]

    def _react(self, interaction_id: str) -> None:
        # What lets the reactions API take a reaction it cannot check in the database.
        assert not self.outage or self.writer.is_known(interaction_id), interaction_id
        row = reaction_row(id=uuid.uuid4().hex, interaction_id=interaction_id,
                           reaction="thumbs_up", dwell_ms=1500, client_id="key-outage")
        self.rejected += not self.writer.submit_reaction(row)
        self.reactions.append(row["id"])


def count_stored(engine, model, ids: list[str]) -> int:
    total = 0
    with session_scope(engine) as session:
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            total += session.scalar(select(func.count()).select_from(model).where(
                model.id.in_(chunk)))
    return total


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def segments(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("writer-*/*.jsonl"))


def test_a_postgres_outage_under_load_loses_no_interaction_and_no_reaction(
        proxy, proxied_engine, engine, tmp_path):
    # The router's own writer settings (RouterConfig defaults).
    writer = InteractionLog(proxied_engine, batch_size=256, flush_interval_s=0.2,
                            spool_dir=tmp_path / "spool").start()
    traffic = Traffic(writer, RATE_PER_S)
    try:
        traffic.run(3.0)
        assert writer.flush(10), writer.stats()
        proxy.down()
        outage_started = time.monotonic()
        first_in_outage = len(traffic.interactions)
        traffic.outage = True
        traffic.run(OUTAGE_S)
        traffic.outage = False
        during = writer.stats()
        unknown = [i for i in traffic.interactions[first_in_outage:] if not writer.is_known(i)]
        proxy.up()
        outage_s = time.monotonic() - outage_started
        traffic.run(5.0)
        recovered = writer.flush(30)
        after = writer.stats()
    finally:
        writer.close()
    stored_interactions = count_stored(engine, Interaction, traffic.interactions)
    stored_reactions = count_stored(engine, Reaction, traffic.reactions)
    p99_us = statistics.quantiles(traffic.submit_us, n=100)[98]
    print(f"\noutage {outage_s:.1f} s at {RATE_PER_S:g} req/s: sent "
          f"{len(traffic.interactions)} interactions + {len(traffic.reactions)} reactions; "
          f"spooled {after['spooled_total']} rows (peak {during['spooled_rows']} rows, "
          f"{during['spooled_bytes']} bytes in {during['spool_segments']} segments); "
          f"replayed {after['replayed']}; stored {stored_interactions} + {stored_reactions}; "
          f"lost {len(traffic.interactions) - stored_interactions} + "
          f"{len(traffic.reactions) - stored_reactions}; submit median "
          f"{statistics.median(traffic.submit_us):.1f} µs, p99 {p99_us:.1f} µs")
    assert recovered, after
    assert not unknown, f"{len(unknown)} interactions sent during the outage not held: {unknown[:3]}"
    assert traffic.rejected == 0 and after["dropped"] == 0 and after["failed"] == 0, after
    assert stored_interactions == len(traffic.interactions)
    assert stored_reactions == len(traffic.reactions)
    # It really was an outage: the rows went through the spool, and the spool is gone.
    assert during["database_down"] and after["outages"] == 1
    assert after["spooled_total"] >= OUTAGE_S * RATE_PER_S * 0.9
    assert after["replayed"] == after["spooled_total"] and after["spooled_rows"] == 0
    assert not segments(tmp_path / "spool")
    # The request path never waits for the database or the disk. (The median, not p99: on a
    # loaded CI box the tail is the scheduler's; bench/router.py measures latency properly.)
    assert statistics.median(traffic.submit_us) < 200


# ---- the same through the router over HTTP -----------------------------------------------------


@dataclass
class RouterTraffic:
    """Chat requests to the router over HTTP, with a reaction to every third answer."""

    client: httpx.Client
    log: InteractionLog
    ids: list[str] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    reaction_ids: list[str] = field(default_factory=list)
    chat_statuses: list[int] = field(default_factory=list)
    reaction_statuses: list[int] = field(default_factory=list)

    def run(self, seconds: float, rate_per_s: float = 20.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            user = f"user-{len(self.ids) % 7}"
            response = self.client.post("/chat/completions", json={
                "model": "tuneloop", "user": user,
                "messages": [{"role": "user", "content": f"question {len(self.ids)}"}]})
            self.chat_statuses.append(response.status_code)
            if response.status_code != 200:
                continue
            self.ids.append(response.headers["x-interaction-id"])
            self.users[self.ids[-1]] = user
            if len(self.ids) % REACTION_EVERY == 0:
                self.react(self.ids[-1])
            time.sleep(1.0 / rate_per_s)

    def react(self, interaction_id: str, reaction: str = "thumbs_up") -> int:
        response = self.client.post("/reactions", json={
            "interaction_id": interaction_id, "reaction": reaction, "dwell_ms": 900,
            "user": self.users[interaction_id]})
        self.reaction_statuses.append(response.status_code)
        if response.status_code in (201, 202):
            self.reaction_ids.append(response.json()["id"])
        return response.status_code

    def spooled(self, interaction_id: str) -> bool:
        return self.log.is_known(interaction_id) and not self.log.is_pending(interaction_id)


def test_the_router_keeps_answering_through_an_outage_and_logs_every_interaction(
        proxy, proxied_engine, engine, data_dir):
    """Short (TUNELOOP_TEST_ROUTER_OUTAGE_S, default 5 s): the router answers every chat request
    while PostgreSQL is down and takes reactions to them throughout, also while the spool
    replays after it (a reaction to a still-spooled interaction is queued behind it, not a
    404), and every interaction id it returned and every reaction it accepted is stored once
    the database is back."""
    from serving.router import create_router_app
    from serving.router_config import BackendConfig, RouterConfig
    from serving.router_server import RouterServer
    from tests.fakes.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer(model_ids=("champ-base",)) as backend:
        config = RouterConfig(
            backends={"champion": BackendConfig(base_url=backend.base_url,
                                                base_model="champ-base",
                                                model_template="openai"),
                      "challenger": BackendConfig(base_url=backend.base_url,
                                                  base_model="champ-base",
                                                  model_template="openai")},
            registered_model_name=f"outage-{uuid.uuid4().hex[:8]}", public_model="tuneloop",
            api_keys=["outage-key"], user_hash_salt="salt", use_registry=False,
            deployment_ttl_s=1.0, log_flush_interval_s=0.05, rate_limit_per_s=0,
            key_rate_limit_per_s=0)
        server = RouterServer(create_router_app(config, engine=proxied_engine)).start()
        router = server.app.state.router
        replaying: list[int] = []  # statuses of reactions to interactions still spooled
        try:
            with httpx.Client(base_url=server.base_url, timeout=30,
                              headers={"Authorization": "Bearer outage-key"}) as client:
                traffic = RouterTraffic(client, router.log)
                traffic.run(1.0)
                proxy.down()
                traffic.run(ROUTER_OUTAGE_S)
                spooled = router.log.stats()["spooled_rows"]
                assert wait_until(lambda: not any(map(router.log.is_pending, traffic.ids)))
                spooled_ids = [i for i in traffic.ids if traffic.spooled(i)]
                # The replay held up (as by the lock `tuneloop forget` takes) while the database
                # answers again: a reaction to an interaction still spooled finds no row there
                # and is queued behind it (202), where it used to be a 404.
                with engine.connect() as holder:
                    holder.exec_driver_sql("LOCK TABLE interactions IN SHARE MODE")
                    proxy.up()
                    for interaction_id in spooled_ids[::REACTION_EVERY]:
                        replaying.append(traffic.react(interaction_id, "done"))
                        assert traffic.spooled(interaction_id)  # the replay was held indeed
                    holder.rollback()
                traffic.run(1.0)  # reacting on while the rest of the replay runs
                assert router.log.flush(30), router.log.stats()
        finally:
            server.stop()
    stats = router.log.stats()
    ids, reaction_ids, statuses = traffic.ids, traffic.reaction_ids, traffic.reaction_statuses
    stored_interactions = count_stored(engine, Interaction, ids)
    stored_reactions = count_stored(engine, Reaction, reaction_ids)
    print(f"\nrouter outage {ROUTER_OUTAGE_S:g} s: {len(ids)} answers, reactions answered "
          f"{ {code: statuses.count(code) for code in set(statuses)} } (while the spool "
          f"replayed: { {code: replaying.count(code) for code in set(replaying)} }), "
          f"{spooled} rows spooled mid-outage; lost {len(ids) - stored_interactions} + "
          f"{len(reaction_ids) - stored_reactions}; log {stats}")
    assert set(traffic.chat_statuses) == {200}
    assert spooled > 0 and 202 in statuses  # some went through the outage path
    assert set(statuses) <= {201, 202}
    assert replaying and set(replaying) == {202}, replaying  # queued behind the spool
    assert stored_interactions == len(ids)
    assert stored_reactions == len(reaction_ids)
    assert stats["dropped"] == stats["failed"] == 0
