"""The interaction log's spool: rows written while PostgreSQL is unreachable are kept on local disk
and replayed in order once it answers; a spool a crashed process left is replayed at start; a full
spool drops and counts; a row PostgreSQL rejects fails alone and is never spooled; a replayed or late
row never brings back text that `tuneloop forget` or retention wiped. The outage is staged with a
TCP proxy in front of the test database (tests/fakes/tcp_proxy.py)."""

from __future__ import annotations

import logging
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from serving.interactions import InteractionLog, interaction_row, reaction_row
from serving.spool import Batch, Spool
from tasks.core.db.engine import engine_for, session_scope
from tasks.core.db.models import Interaction, Reaction
from tasks.signals.erasure import forget_user_hash, purge_expired_text


@pytest.fixture()
def make_log(proxied_engine, tmp_path: Path) -> Iterator[Callable[..., InteractionLog]]:
    """Factory: a started InteractionLog on the proxied database, spooling under tmp_path."""
    logs: list[InteractionLog] = []

    def factory(**overrides) -> InteractionLog:
        options = dict(flush_interval_s=0.02, spool_dir=tmp_path / "spool",
                       spool_max_bytes=10 * 1024 * 1024, retry_initial_s=0.05,
                       retry_max_s=0.2)
        options.update(overrides)
        writer = InteractionLog(options.pop("engine", proxied_engine), **options).start()
        logs.append(writer)
        return writer

    yield factory
    for writer in logs:
        writer.close(10)


def a_row(**values) -> dict:
    values = {"id": uuid.uuid4().hex, "user_hash": "u" * 64, "variant": "champion",
              "model_name": "m", "request_messages": [{"role": "user", "content": "hi"}],
              "response": "hello", **values}
    return interaction_row(**values)


def a_user() -> str:
    """A user hash of this test alone (the database is shared by the session)."""
    return uuid.uuid4().hex * 2


def wiped(row: Interaction) -> bool:
    return (row.request_messages, row.response, row.context, row.error) == ([], "", {}, None)


def a_reaction(interaction_id: str, **values) -> dict:
    return reaction_row(id=values.pop("id", uuid.uuid4().hex), interaction_id=interaction_id,
                        reaction=values.pop("reaction", "thumbs_up"), dwell_ms=1200, **values)


def stored_interactions(engine, ids) -> dict[str, Interaction]:
    with session_scope(engine) as session:
        return {row.id: row for row in session.execute(
            select(Interaction).where(Interaction.id.in_(list(ids)))).scalars()}


def stored_reactions(engine, ids) -> dict[str, Reaction]:
    with session_scope(engine) as session:
        return {row.id: row for row in session.execute(
            select(Reaction).where(Reaction.id.in_(list(ids)))).scalars()}


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def segments(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("writer-*/*.jsonl"))


def test_rows_written_during_an_outage_are_spooled_then_replayed(make_log, proxy, engine,
                                                                 tmp_path):
    writer = make_log()
    proxy.down()
    rows = [a_row() for _ in range(20)]
    reactions = [a_reaction(row["id"]) for row in rows[::2]]
    for row in rows:
        assert writer.submit(row)
    for reaction in reactions:
        assert writer.submit_reaction(reaction)
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 30), writer.stats()
    assert writer.wait_written(rows[0]["id"], 1)  # durable on disk: no longer pending
    assert not writer.is_pending(rows[0]["id"]) and writer.is_known(rows[0]["id"])
    assert segments(tmp_path / "spool") and writer.stats()["spooled_bytes"] > 0
    assert not writer.flush(0.3)  # not in the database yet
    proxy.up()
    assert writer.flush(10), writer.stats()
    assert len(stored_interactions(engine, [row["id"] for row in rows])) == 20
    assert len(stored_reactions(engine, [r["id"] for r in reactions])) == 10
    stats = writer.stats()
    assert (stats["spooled_total"], stats["replayed"], stats["spooled_rows"]) == (30, 30, 0)
    assert stats["dropped"] == stats["failed"] == 0 and not stats["database_down"]
    assert not segments(tmp_path / "spool") and not writer.is_known(rows[0]["id"])


def test_replay_keeps_submission_order(make_log, proxy, engine):
    """A row is never overwritten (ids are submitted once, so another version is a late
    duplicate): the first version stands; and a reaction lands after its spooled interaction."""
    writer = make_log(batch_size=2)  # many spool lines
    proxy.down()
    row = a_row()
    writer.submit(row)
    reaction = a_reaction(row["id"])
    writer.submit_reaction(reaction)
    for version in range(5):
        writer.submit({**row, "response": f"version {version}"})
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 7), writer.stats()
    proxy.up()
    assert writer.flush(10), writer.stats()
    assert stored_interactions(engine, [row["id"]])[row["id"]].response == "hello"
    assert reaction["id"] in stored_reactions(engine, [reaction["id"]])
    assert writer.stats()["failed"] == 0


def test_rows_submitted_while_the_spool_replays_follow_it(make_log, proxy, engine):
    writer = make_log()
    proxy.down()
    spooled = a_row()
    writer.submit(spooled)
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 1)
    proxy.up()
    # Queued right after the database is back: still behind the spooled interaction.
    reaction = a_reaction(spooled["id"])
    writer.submit_reaction(reaction)
    assert writer.flush(10), writer.stats()
    assert reaction["id"] in stored_reactions(engine, [reaction["id"]])
    assert writer.stats()["failed"] == 0


def test_a_row_still_spooled_when_its_user_is_forgotten_is_stored_wiped(make_log, proxy,
                                                                       engine):
    writer = make_log()
    alice, bob = a_user(), a_user()
    proxy.down()
    spooled = a_row(user_hash=alice, context={"note": "hers"}, error="backend quoted: hi")
    reaction = a_reaction(spooled["id"])
    bobs = a_row(user_hash=bob)
    writer.submit(spooled)
    writer.submit_reaction(reaction)
    writer.submit(bobs)
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 3), writer.stats()
    assert forget_user_hash(alice, engine=engine)["interactions_erased"] == 0  # not there yet
    later = a_row(user_hash=alice)  # sent after the erasure: hers again
    writer.submit(later)
    proxy.up()
    assert writer.flush(10), writer.stats()
    stored = stored_interactions(engine, [spooled["id"], bobs["id"], later["id"]])
    assert wiped(stored[spooled["id"]]) and stored[spooled["id"]].erased_at is not None
    assert not stored_reactions(engine, [reaction["id"]])  # forget deleted her reactions
    for kept in (bobs["id"], later["id"]):
        assert stored[kept].response == "hello" and stored[kept].erased_at is None
    assert writer.stats()["failed"] == 0


@pytest.mark.parametrize("wipe", ["forget", "retention"])
def test_a_late_copy_of_a_stored_row_never_writes_its_text_back(make_log, fresh_engine, wipe):
    writer = make_log(engine=fresh_engine)  # its own database: retention purges all of it
    row = a_row(user_hash=a_user(), created_at=datetime.now(UTC) - timedelta(days=400))
    writer.submit(row)
    assert writer.flush(10), writer.stats()
    if wipe == "forget":
        forget_user_hash(row["user_hash"], engine=fresh_engine)
    else:
        assert purge_expired_text(365, engine=fresh_engine)["interactions_purged"] == 1
    writer.submit(row)  # as a spool replay of a line whose commit went unacknowledged
    writer.submit_reaction(a_reaction(row["id"]))
    assert writer.flush(10), writer.stats()
    stored = stored_interactions(fresh_engine, [row["id"]])[row["id"]]
    assert wiped(stored)
    assert (stored.erased_at if wipe == "forget" else stored.text_purged_at) is not None
    assert writer.stats()["failed"] == 0


def test_the_spool_knows_an_id_until_its_line_is_replayed(tmp_path):
    spool = Spool(tmp_path / "spool", 10 * 1024 * 1024, segment_bytes=1024).open()
    lines = [Batch(interactions=[a_row(), a_row()]) for _ in range(4)]
    for batch in lines:
        assert spool.append(batch)
    ids = [[row["id"] for row in batch.interactions] for batch in lines]
    assert len(spool.segments) > 1  # sealed segments and the active one
    assert all(spool.holds(i) for line in ids for i in line) and not spool.holds("unknown")
    segment = spool.segments[0]
    end, first = next(spool.read(segment))
    spool.replayed(segment, end, first)
    assert not any(spool.holds(i) for i in ids[0])
    assert all(spool.holds(i) for line in ids[1:] for i in line)
    spool.close()
    reopened = Spool(tmp_path / "spool", 10 * 1024 * 1024).open()  # all of it loaded again
    assert all(reopened.holds(i) for line in ids for i in line)
    reopened.close()


def test_a_spooled_id_costs_a_few_bytes_of_memory(tmp_path):
    """A full spool holds on the order of a million ids, for as long as an outage lasts."""
    left = Spool(tmp_path / "spool", 1 << 30).open()
    rows = 20_000
    ids = []
    for _ in range(rows // 1000):
        batch = Batch(interactions=[a_row() for _ in range(1000)])
        ids += [row["id"] for row in batch.interactions]
        assert left.append(batch)
    left.close()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loaded = Spool(tmp_path / "spool", 1 << 30).open()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert loaded.rows == rows and loaded.holds(ids[0]) and loaded.holds(ids[-1])
    assert held < 24 * rows, held  # a set of the id strings takes over 100 bytes an id
    loaded.close()


def test_a_spool_left_by_a_crashed_process_is_replayed_at_start(make_log, engine, tmp_path):
    left = Spool(tmp_path / "spool", 10 * 1024 * 1024).open()
    rows = [a_row() for _ in range(3)]
    batch = Batch(interactions=rows, reactions=[a_reaction(rows[0]["id"])])
    assert left.append(batch)
    segment = left.segments[-1].path
    left.close()  # the process died: its flock is gone with it
    with segment.open("ab") as handle:
        handle.write(b'{"interactions": [{"id": "cut-short')  # a write the crash interrupted
    writer = make_log()
    assert writer.flush(10), writer.stats()
    assert len(stored_interactions(engine, [row["id"] for row in rows])) == 3
    assert len(stored_reactions(engine, [r["id"] for r in batch.reactions])) == 1
    assert writer.stats()["replayed"] == 4 and not segments(tmp_path / "spool")


def test_a_free_slot_is_adopted_and_a_live_writer_s_spool_left_alone(make_log, engine, tmp_path):
    root = tmp_path / "spool"
    live = Spool(root, 10 * 1024 * 1024).open()  # slot 0, held
    live_row = a_row()
    live.append(Batch(interactions=[live_row]))
    crashed = Spool(root, 10 * 1024 * 1024).open()  # slot 1, then its process dies
    crashed_row = a_row()
    crashed.append(Batch(interactions=[crashed_row]))
    crashed.close()
    try:
        writer = make_log()  # takes slot 1 back, or slot 2 and adopts slot 1
        assert writer.flush(10), writer.stats()
        stored = stored_interactions(engine, [live_row["id"], crashed_row["id"]])
        assert list(stored) == [crashed_row["id"]]
        assert live.segments[0].path.exists()
    finally:
        live.close()


def test_a_full_spool_drops_and_counts_with_an_error_naming_the_cap(make_log, proxy, caplog):
    writer = make_log(spool_max_bytes=3000, batch_size=1)
    proxy.down()
    with caplog.at_level(logging.ERROR, logger="serving.router"):
        for _ in range(30):
            writer.submit(a_row())
        assert wait_for(lambda: writer.stats()["dropped"] > 0
                        and writer.stats()["queued"] == 0), writer.stats()
        time.sleep(0.1)
    stats = writer.stats()
    assert 0 < stats["spooled_rows"] < 30 and stats["spooled_bytes"] <= 3000
    assert stats["spooled_rows"] + stats["dropped"] == 30
    assert any("TUNELOOP_SPOOL_MAX_BYTES" in r.getMessage() for r in caplog.records)
    proxy.up()
    assert writer.flush(10)
    assert writer.written == stats["spooled_rows"]


def test_a_row_postgres_rejects_fails_alone_and_is_not_spooled(make_log, engine):
    writer = make_log()
    good = [a_row() for _ in range(3)]
    orphan = a_reaction("no-such-interaction")  # foreign key violation
    for row in good:
        writer.submit(row)
    writer.submit_reaction(orphan)
    writer.submit_reaction(a_reaction(good[0]["id"]))
    assert writer.flush(10)
    stats = writer.stats()
    assert (stats["written"], stats["reactions_written"], stats["failed"]) == (3, 1, 1)
    assert stats["spooled_total"] == 0 and stats["outages"] == 0


def counts(writer: InteractionLog, *keys: str) -> tuple[int, ...]:
    stats = writer.stats()
    return tuple(stats[key] for key in keys)


def test_a_row_submitted_twice_is_written_once_and_counted_as_a_duplicate(make_log, engine):
    writer = make_log(engine=engine)
    row, other = a_row(), a_row()
    writer.submit(row)
    assert writer.flush(10), writer.stats()
    writer.submit(dict(row, response="a late copy"))  # the stored row stands
    writer.submit(other)
    assert writer.flush(10), writer.stats()
    assert counts(writer, "written", "duplicates", "failed", "dropped") == (2, 1, 0, 0)
    assert stored_interactions(engine, [row["id"]])[row["id"]].response == "hello"


def test_a_replayed_spool_line_already_in_the_database_counts_as_duplicates(make_log, engine,
                                                                           tmp_path):
    stored, new = a_row(), a_row()
    first = make_log(engine=engine, spool_dir=tmp_path / "first")
    first.submit(stored)
    assert first.flush(10) and first.written == 1
    left = Spool(tmp_path / "spool", 10 * 1024 * 1024).open()  # its commit's answer was lost
    assert left.append(Batch(interactions=[stored, new]))
    left.close()
    writer = make_log(engine=engine)
    assert writer.flush(10), writer.stats()
    assert counts(writer, "written", "duplicates", "replayed") == (1, 1, 2)


def test_reactions_count_inserted_duplicate_and_erased_rows_apart(make_log, engine):
    writer = make_log(engine=engine)
    alice, bob = a_row(user_hash=a_user()), a_row(user_hash=a_user())
    writer.submit(alice)
    writer.submit(bob)
    assert writer.flush(10), writer.stats()
    forget_user_hash(alice["user_hash"], engine=engine)
    reaction = a_reaction(bob["id"])
    writer.submit_reaction(reaction)
    assert writer.flush(10), writer.stats()
    writer.submit_reaction(reaction)  # a retry of the same reaction, in a later batch
    writer.submit_reaction(a_reaction(alice["id"]))  # to an erased interaction: left out
    assert writer.flush(10), writer.stats()
    assert counts(writer, "reactions_written", "reactions_duplicates", "reactions_erased",
                  "failed") == (1, 1, 1, 0)
    assert list(stored_reactions(engine, [reaction["id"]])) == [reaction["id"]]


def test_a_row_that_cannot_be_encoded_fails_alone_during_an_outage(make_log, proxy, engine):
    writer = make_log()
    proxy.down()
    good = a_row()
    bad = a_row(context={"oops": object()})
    writer.submit(good)
    writer.submit(bad)
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 1), writer.stats()
    assert writer.stats()["failed"] == 1
    proxy.up()
    assert writer.flush(10)
    assert list(stored_interactions(engine, [good["id"], bad["id"]])) == [good["id"]]


def test_close_during_an_outage_leaves_the_spool_for_the_next_start(make_log, proxy, engine,
                                                                    tmp_path):
    writer = make_log()
    proxy.down()
    row = a_row()
    writer.submit(row)
    writer.close(10)
    assert segments(tmp_path / "spool")
    proxy.up()
    again = make_log()
    assert again.flush(10), again.stats()
    assert row["id"] in stored_interactions(engine, [row["id"]])


def test_a_hanging_database_counts_as_down_after_the_connect_timeout(proxy, database_url,
                                                                     make_log, engine,
                                                                     monkeypatch):
    from tasks.core.settings import get_settings

    monkeypatch.setenv("TUNELOOP_DB_CONNECT_TIMEOUT_S", "1")  # libpq waits at least 2 s
    get_settings.cache_clear()
    try:
        hanging = engine_for(proxy.url_for(database_url))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    writer = make_log(engine=hanging)
    proxy.down(hang=True)
    row = a_row()
    started = time.monotonic()
    writer.submit(row)
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 1, 8), writer.stats()
    assert time.monotonic() - started < 6
    proxy.up()
    assert writer.flush(15), writer.stats()
    assert row["id"] in stored_interactions(engine, [row["id"]])
    hanging.dispose()


def test_reaction_rows_name_their_columns():
    with pytest.raises(ValueError, match="unknown reaction columns"):
        reaction_row(id="r", interaction_id="i", reaction="done", dwell_ms=1, emoji="x")
    with pytest.raises(ValueError, match="needs"):
        reaction_row(id="r", reaction="done", dwell_ms=1)
    assert reaction_row(id="r", interaction_id="i", reaction="done",
                        dwell_ms=1)["created_at"] is not None


def test_submit_stays_cheap_during_an_outage(make_log, proxy):
    writer = make_log()
    proxy.down()
    rows = [a_row() for _ in range(2000)]
    started = time.perf_counter()
    for row in rows:
        writer.submit(row)
    per_submit_us = (time.perf_counter() - started) / len(rows) * 1e6
    assert per_submit_us < 200, per_submit_us  # about 2 µs on a laptop; generous for CI
    assert wait_for(lambda: writer.stats()["spooled_rows"] == 2000, 20), writer.stats()
    proxy.up()
    assert writer.flush(20)
