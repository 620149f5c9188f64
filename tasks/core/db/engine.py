"""Database engine, sessions, migrations and the upsert helper every stage writes through.

DATABASE_URL set → that PostgreSQL. Unset → an embedded PostgreSQL 16 (pgserver) under
`<data_dir>/pgdata`, started once and reused across runs and processes. Every engine gives up
connecting after `db_connect_timeout_s` and has the server cancel any statement running longer
than `db_statement_timeout_s` (migrations are exempt), so an unreachable or stuck database fails
fast with an error instead of hanging a task or the router's writer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from tasks.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
EMBEDDED_DB_NAME = "tuneloop"


def embedded_database_url(data_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL and return a URL to its tuneloop database."""
    import pgserver  # heavy-ish: only when no DATABASE_URL is configured

    pgdata = (data_dir / "pgdata").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(pgdata), cleanup_mode=None)
    base = server.get_uri()
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": EMBEDDED_DB_NAME}
        ).scalar()
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{EMBEDDED_DB_NAME}"'))
    admin.dispose()
    url = make_url(base).set(database=EMBEDDED_DB_NAME)
    return url.render_as_string(hide_password=False)


def resolve_database_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.database_url:
        url = settings.database_url
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        return url
    return embedded_database_url(settings.data_dir)


def engine_for(url: str) -> Engine:
    """One pooled engine per database URL (cached, so every caller shares the pool), with the
    connect and statement timeouts of the current settings."""
    settings = get_settings()
    return _pooled_engine(url, settings.db_connect_timeout_s, settings.db_statement_timeout_s)


# Keyed on plain values, not on Settings (unhashable): the same URL under the same timeouts is the
# same engine; a test that changes a timeout gets its own.
@functools.lru_cache(maxsize=8)
def _pooled_engine(url: str, connect_timeout_s: float, statement_timeout_s: float) -> Engine:
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, future=True,
                           connect_args=timeout_connect_args(url, connect_timeout_s,
                                                             statement_timeout_s))
    if statement_timeout_s > 0:
        _explain_statement_timeouts(engine, statement_timeout_s)
    return engine


def timeout_connect_args(url: str, connect_timeout_s: float,
                         statement_timeout_s: float) -> dict[str, Any]:
    """libpq connection parameters for the two timeouts (0 or less: none). A value the URL sets
    itself wins; pgserver's socket URLs (`?host=/path`) keep their query untouched."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() not in (
            "psycopg2", "psycopg"):
        return {}
    args: dict[str, Any] = {}
    if connect_timeout_s > 0 and "connect_timeout" not in parsed.query:
        # libpq takes whole seconds (and treats 1 as 2): round up, never down to "forever".
        args["connect_timeout"] = max(1, math.ceil(connect_timeout_s))
    if statement_timeout_s > 0:
        options = parsed.query.get("options", "")
        options = " ".join(options) if isinstance(options, tuple) else options
        if "statement_timeout" not in options:
            millis = max(1, round(statement_timeout_s * 1000))
            # connect_args replace the URL's own `options`, so those are carried over.
            args["options"] = f"{options} -c statement_timeout={millis}".strip()
    return args


def _explain_statement_timeouts(engine: Engine, statement_timeout_s: float) -> None:
    """Say which setting cancelled a statement: PostgreSQL's own message names no knob."""

    @event.listens_for(engine, "handle_error")
    def _note(context: Any) -> None:
        original = context.original_exception
        sqlstate = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
        if sqlstate != "57014":  # query_canceled (psycopg names it sqlstate, psycopg2 pgcode)
            return
        if "statement timeout" not in str(original):
            return
        if context.sqlalchemy_exception is not None:
            context.sqlalchemy_exception.add_note(
                f"the statement ran longer than TUNELOOP_DB_STATEMENT_TIMEOUT_S="
                f"{statement_timeout_s:g} s; raise it (0 disables) or make the statement "
                "cheaper; migrations are exempt")


def get_engine(settings: Settings | None = None) -> Engine:
    return engine_for(resolve_database_url(settings))


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error."""
    factory = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):  # -> alembic.config.Config
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine | None = None, revision: str = "head") -> None:
    """Apply Alembic migrations up to `revision` (idempotent)."""
    from alembic import command

    engine = engine or get_engine()
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        # A migration may legitimately run long (an index build, waiting for another migrator's
        # lock): the engine's statement_timeout does not apply inside its transaction.
        conn.execute(text("SET LOCAL statement_timeout = 0"))
        # Serialise concurrent migrators (demo + Airflow init + tests) on one advisory lock.
        conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL statement_timeout = 0"))  # as in migrate()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def upsert(
    session: Session,
    model: type[DeclarativeBase],
    rows: Sequence[dict[str, Any]] | Iterable[dict[str, Any]],
    *,
    conflict: Sequence[str] | None = None,
    update: Sequence[str] | None = None,
) -> int:
    """INSERT ... ON CONFLICT: update `update` columns (default: all non-key), or do nothing.

    Returns the number of rows sent. Deterministic ids make a rerun land on the same rows.
    """
    rows = list(rows)
    if not rows:
        return 0
    table = model.__table__  # type: ignore[attr-defined]
    keys = list(conflict) if conflict else [c.name for c in table.primary_key.columns]
    stmt = pg_insert(table).values(rows)
    if update is None:
        update = [c for c in rows[0] if c not in keys]
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=keys, set_={c: stmt.excluded[c] for c in update}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    session.execute(stmt)
    return len(rows)
