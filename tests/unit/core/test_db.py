"""Schema: migrations upgrade/downgrade cleanly; deterministic ids make writes upserts; engines
give up connecting and cancel long statements after the configured timeouts."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tasks.core.db.engine import (
    downgrade,
    engine_for,
    migrate,
    session_scope,
    timeout_connect_args,
    upsert,
)
from tasks.core.db.models import Conversation, GenerationBatch
from tasks.core.ids import stable_id

EXPECTED_TABLES = {
    "generation_batches", "personas", "conversations", "tag_results", "tag_failures",
    "judgments", "datasets", "dataset_items", "dataset_exclusions", "interactions", "reactions",
    "deployments", "comparison_reports", "llm_cache",
}


def test_migrations_upgrade_downgrade_upgrade(fresh_engine):
    assert EXPECTED_TABLES <= set(inspect(fresh_engine).get_table_names())
    downgrade(fresh_engine, "base")
    assert not (EXPECTED_TABLES & set(inspect(fresh_engine).get_table_names()))
    migrate(fresh_engine)
    migrate(fresh_engine)  # idempotent
    assert EXPECTED_TABLES <= set(inspect(fresh_engine).get_table_names())


def test_upsert_twice_keeps_one_row_with_latest_values(fresh_engine):
    batch_id = stable_id("batch", 7)
    conv_id = stable_id(batch_id, "cell", 0)
    with session_scope(fresh_engine) as s:
        upsert(s, GenerationBatch, [{"id": batch_id, "seed": 7, "params": {}, "requested": 1}])
    for text in ("first", "second"):
        with session_scope(fresh_engine) as s:
            upsert(s, Conversation, [{
                "id": conv_id, "batch_id": batch_id, "item_index": 0,
                "messages": [{"role": "user", "content": text}],
            }])
    with session_scope(fresh_engine) as s:
        assert s.scalar(select(func.count()).select_from(Conversation)) == 1
        assert s.get(Conversation, conv_id).messages[0]["content"] == "second"


def test_stable_id_is_deterministic_and_input_sensitive():
    assert stable_id("a", 1) == stable_id("a", 1)
    assert stable_id("a", 1) != stable_id("a", 2)
    assert stable_id("a", "1b") != stable_id("a1", "b")


# ---- engine timeouts ---------------------------------------------------------------------------


@pytest.fixture()
def db_timeouts(monkeypatch):
    """Set TUNELOOP_DB_*_TIMEOUT_S for one test (settings cache cleared around it)."""
    from tasks.core.settings import get_settings

    def apply(*, connect_s: float | None = None, statement_s: float | None = None) -> None:
        if connect_s is not None:
            monkeypatch.setenv("TUNELOOP_DB_CONNECT_TIMEOUT_S", str(connect_s))
        if statement_s is not None:
            monkeypatch.setenv("TUNELOOP_DB_STATEMENT_TIMEOUT_S", str(statement_s))
        get_settings.cache_clear()

    yield apply
    monkeypatch.undo()
    get_settings.cache_clear()


def test_engine_for_shares_one_engine_per_url_and_timeouts(database_url, db_timeouts):
    assert engine_for(database_url) is engine_for(database_url)
    default = engine_for(database_url)
    db_timeouts(statement_s=1.5)
    assert engine_for(database_url) is engine_for(database_url) is not default


def test_a_long_statement_is_cancelled_with_an_error_naming_the_setting(database_url,
                                                                        db_timeouts):
    db_timeouts(statement_s=0.5)
    engine = engine_for(database_url)
    started = time.monotonic()
    with pytest.raises(OperationalError) as caught, engine.connect() as conn:
        conn.execute(sql_text("SELECT pg_sleep(10)"))
    assert time.monotonic() - started < 3
    assert "canceling statement due to statement timeout" in str(caught.value)
    assert any("TUNELOOP_DB_STATEMENT_TIMEOUT_S=0.5" in note
               for note in getattr(caught.value, "__notes__", []))
    with engine.connect() as conn:  # the pool is fine afterwards
        assert conn.execute(sql_text("SELECT 1")).scalar() == 1


def test_connecting_to_a_dead_port_fails_within_the_connect_timeout(database_url, db_timeouts):
    db_timeouts(connect_s=2)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = make_url(database_url).set(host="127.0.0.1", port=port)
    engine = engine_for(dead.render_as_string(hide_password=False))
    started = time.monotonic()
    with pytest.raises(OperationalError), engine.connect():
        pass
    assert time.monotonic() - started < 2.5


def test_a_server_that_never_answers_fails_after_the_connect_timeout(database_url, db_timeouts):
    from tests.fakes.tcp_proxy import TcpProxy

    db_timeouts(connect_s=2)
    try:
        proxy = TcpProxy.in_front_of(database_url)
    except ValueError as exc:
        pytest.skip(str(exc))
    with proxy:
        proxy.down(hang=True)  # accepts the TCP connection, never says a word
        engine = engine_for(proxy.url_for(database_url))
        started = time.monotonic()
        with pytest.raises(OperationalError, match="timeout"), engine.connect():
            pass
        elapsed = time.monotonic() - started
        engine.dispose()
    assert 1.5 < elapsed < 4.0


def test_migrations_are_exempt_from_the_statement_timeout(make_database, db_timeouts):
    """A migrator waiting for another one's advisory lock longer than the timeout goes on."""
    db_timeouts(statement_s=0.5)
    url = make_database("tuneloop_timeout")
    holder = create_engine(url, poolclass=NullPool)  # another migrator, mid-migration
    locked = threading.Event()

    def hold_the_migration_lock() -> None:
        with holder.connect() as conn:
            conn.execute(sql_text("SELECT pg_advisory_lock(727274)"))
            locked.set()
            time.sleep(1.5)
            conn.execute(sql_text("SELECT pg_advisory_unlock(727274)"))

    thread = threading.Thread(target=hold_the_migration_lock)
    thread.start()
    assert locked.wait(10)
    engine = engine_for(url)
    started = time.monotonic()
    migrate(engine)
    thread.join()
    holder.dispose()
    assert time.monotonic() - started >= 1.0  # it did wait, three times the timeout
    assert "reactions" in inspect(engine).get_table_names()


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://u@db:5432/t", {"connect_timeout": 5, "options": "-c statement_timeout=60000"}),
    # pgserver: a unix socket in the query string; the query is left as it is
    ("postgresql://postgres:@/tuneloop?host=/tmp/pgdata",
     {"connect_timeout": 5, "options": "-c statement_timeout=60000"}),
    ("postgresql://u@db/t?options=-c%20search_path%3Dx",
     {"connect_timeout": 5, "options": "-c search_path=x -c statement_timeout=60000"}),
    ("postgresql://u@db/t?connect_timeout=9&options=-c%20statement_timeout%3D0", {}),
    ("sqlite:///x.db", {}),
])
def test_timeout_connect_args_respect_what_the_url_says(url, expected):
    assert timeout_connect_args(url, 5.0, 60.0) == expected


def test_timeouts_of_zero_mean_none():
    assert timeout_connect_args("postgresql://u@db/t", 0, 0) == {}
    assert timeout_connect_args("postgresql://u@db/t", 0.2, 0.0004) == {
        "connect_timeout": 1, "options": "-c statement_timeout=1"}
