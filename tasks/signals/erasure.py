"""Erasure and retention of production text: `tuneloop forget` and `tuneloop retention`.

`forget_user` erases one end user: their reactions are deleted, their interactions' text (the
request messages, the response, the context, a backend error that may quote them) is wiped and
`erased_at` set — the rows themselves stay, so the `dataset_items` of existing snapshots keep their
foreign keys — and a `user_erasures` row records the request with its counts and the existing
dataset snapshots that hold the user's interactions (those files are not rewritten here: the list
says which to retire or rebuild). The user is named by the router's salted hash
(`tasks.core.ids.hash_user` with `settings.user_hash_salt`), never by the raw id.

`purge_expired_text` wipes the same text of every interaction older than N days and sets
`text_purged_at`, in batches. Both are idempotent, and the reaction-dataset build never reads an
erased or purged interaction, nor anything an erased user sent before their erasure was requested
(`tasks.signals.stage`).

A wiped row stays wiped: the router's interaction log inserts ON CONFLICT DO NOTHING (a spool
replay or late duplicate never writes text back) and stores a row still spooled when `forget`
ran wiped already, with `erased_at` set (serving/interactions.py). So both select by the
timestamps alone, and a rerun does not look at rows it wiped before.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from tasks.core.db.engine import session_scope
from tasks.core.db.models import Dataset, DatasetItem, Interaction, Reaction, UserErasure
from tasks.core.ids import hash_user

log = logging.getLogger(__name__)

PURGE_BATCH = 5000
_USER_HASH = re.compile(r"^[0-9a-f]{64}$")


class ErasureError(ValueError):
    """An erasure or retention request that cannot run as given; the message says the fix."""


def _wiped_text() -> dict[str, Any]:
    # `error` too: a backend's error body can quote the request it refused.
    return {"request_messages": [], "response": "", "context": {}, "error": None}


# ---- erasure -----------------------------------------------------------------------------------
def forget_user(user_id: str, *, engine: Engine | None = None, salt: str | None = None
                ) -> dict[str, Any]:
    """Erase the end user `user_id` (the id the router was sent, hashed here with the router's
    salt: `salt`, default settings.user_hash_salt). See `forget_user_hash`."""
    if not user_id:
        raise ErasureError("the user id is empty; pass the id the client sent the router "
                           "(its `user` field or X-User-Id header), e.g. --user alice@example.com")
    if salt is None:
        from tasks.core.settings import get_settings

        salt = get_settings().user_hash_salt.get_secret_value()
    return forget_user_hash(hash_user(user_id, salt), engine=engine)


def forget_user_hash(user_hash: str, *, engine: Engine | None = None) -> dict[str, Any]:
    """Erase the user whose router hash is `user_hash` (64 hex characters). Returns {"user_hash",
    "reactions_deleted", "interactions_erased", "snapshots", "requested_at", "totals"}: this run's
    counts (zero on a rerun), the snapshots holding the user's interactions ([{dataset_id, name,
    kind, artifact_uri, items}], items = the user's rows in it) and the counts of every run."""
    user_hash = user_hash.strip().lower()
    if not _USER_HASH.fullmatch(user_hash):
        raise ErasureError(f"user hash {user_hash[:80]!r} is not 64 hex characters (the router's "
                           "HMAC-SHA256 of the user id); pass the raw id with --user ID instead")
    with session_scope(engine) as session:
        # Writers of interactions and reactions (the router's log among them) wait until this
        # commits, and this waits for those in flight: a row is either committed before the wipe
        # below and wiped by it, or inserted after and wiped on the way in by the log's insert
        # (it joins `user_erasures`).
        session.execute(text("LOCK TABLE interactions, reactions IN SHARE MODE"))
        previous = session.get(UserErasure, user_hash, with_for_update=True)
        snapshots = _snapshots_holding(session, user_hash)
        of_user = select(Interaction.id).where(Interaction.user_hash == user_hash)
        reactions = session.execute(
            delete(Reaction).where(Reaction.interaction_id.in_(of_user))
            .execution_options(synchronize_session=False)).rowcount
        interactions = session.execute(
            update(Interaction)
            .where(Interaction.user_hash == user_hash, Interaction.erased_at.is_(None))
            .values(**_wiped_text(), erased_at=func.now())
            .execution_options(synchronize_session=False)).rowcount
        before = dict(previous.counts) if previous is not None else {}
        totals = {"reactions_deleted": int(before.get("reactions_deleted", 0)) + reactions,
                  "interactions_erased": int(before.get("interactions_erased", 0)) + interactions,
                  "runs": int(before.get("runs", 0)) + 1}
        # requested_at moves to this run: what the user sent until now is covered by it.
        requested_at = session.execute(
            pg_insert(UserErasure)
            .values(user_hash=user_hash, counts=totals, snapshots=snapshots)
            .on_conflict_do_update(index_elements=["user_hash"], set_={
                "requested_at": func.now(), "counts": totals, "snapshots": snapshots})
            .returning(UserErasure.requested_at)).scalar_one()
    log.info("erased user %s…: %d reactions deleted, %d interactions wiped, in %d existing "
             "snapshots", user_hash[:12], reactions, interactions, len(snapshots))
    return {"user_hash": user_hash, "reactions_deleted": reactions,
            "interactions_erased": interactions, "snapshots": snapshots,
            "requested_at": requested_at.isoformat(), "totals": totals}


def _snapshots_holding(session: Any, user_hash: str) -> list[dict[str, Any]]:
    stmt = (select(Dataset.id, Dataset.name, Dataset.kind, Dataset.artifact_uri,
                   func.count().label("items"))
            .join(DatasetItem, DatasetItem.dataset_id == Dataset.id)
            .join(Interaction, Interaction.id == DatasetItem.interaction_id)
            .where(Interaction.user_hash == user_hash)
            .group_by(Dataset.id, Dataset.name, Dataset.kind, Dataset.artifact_uri,
                      Dataset.created_at)
            .order_by(Dataset.created_at, Dataset.id))
    return [{"dataset_id": row.id, "name": row.name, "kind": row.kind,
             "artifact_uri": row.artifact_uri, "items": int(row.items)}
            for row in session.execute(stmt)]


# ---- retention ---------------------------------------------------------------------------------
def purge_expired_text(days: int, *, engine: Engine | None = None, now: datetime | None = None,
                       batch_size: int = PURGE_BATCH) -> dict[str, Any]:
    """Wipe the text of every interaction created more than `days` days before `now` (default:
    the current time) and set its `text_purged_at`, `batch_size` rows per transaction. Returns
    {"days", "cutoff", "interactions_purged", "batches"}; a rerun purges nothing new."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ErasureError(f"retention days must be a whole number >= 1 (got {days!r}); set "
                           "TUNELOOP_RETENTION_DAYS=90 (or pass --days 90), or unset it to keep "
                           "interaction text")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=days)
    purged = batches = 0
    while True:
        with session_scope(engine) as session:
            # Purged and erased rows are wiped already (and stay so): timestamps alone select,
            # on the created_at index, and a rerun skips what it did before.
            batch = (select(Interaction.id)
                     .where(Interaction.created_at < cutoff,
                            Interaction.text_purged_at.is_(None), Interaction.erased_at.is_(None))
                     .limit(batch_size).with_for_update(skip_locked=True).scalar_subquery())
            count = session.execute(
                update(Interaction).where(Interaction.id.in_(batch))
                .values(**_wiped_text(), text_purged_at=now)
                .execution_options(synchronize_session=False)).rowcount
        if count:
            purged += count
            batches += 1
        if count < batch_size:
            break
    log.info("retention: purged the text of %d interactions older than %d days (before %s)",
             purged, days, cutoff.isoformat())
    return {"days": days, "cutoff": cutoff.isoformat(), "interactions_purged": purged,
            "batches": batches}


def nightly_retention(*, engine: Engine | None = None, now: datetime | None = None
                      ) -> dict[str, Any]:
    """The nightly run's purge: `purge_expired_text(settings.retention_days)`, or a skip
    ({"skipped": True, "reason"}) when TUNELOOP_RETENTION_DAYS is unset."""
    from tasks.core.settings import get_settings

    days = get_settings().retention_days
    if days is None:
        reason = "TUNELOOP_RETENTION_DAYS is unset: interaction text is kept"
        log.info("retention: %s", reason)
        return {"skipped": True, "reason": reason}
    return {"skipped": False, **purge_expired_text(days, engine=engine, now=now)}
