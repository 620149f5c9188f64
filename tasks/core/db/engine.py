"""Database engine, sessions, migrations and the upsert helper every stage writes through.

DATABASE_URL set → that PostgreSQL. Unset → an embedded PostgreSQL 16 (pgserver) under
`<data_dir>/pgdata`, started once and reused across runs and processes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
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


@functools.lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One pooled engine per database URL (cached, so every caller shares the pool)."""
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, future=True)


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
        # Serialise concurrent migrators (demo + Airflow init + tests) on one advisory lock.
        conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
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
