"""Postgres system of record: models, engine/session helpers and migrations."""

from tasks.core.db.engine import get_engine, migrate, session_scope, upsert

__all__ = ["get_engine", "migrate", "session_scope", "upsert"]
