"""Interactions and reactions written as the router writes them (serving/router.py and
serving/interactions.py): user_hash = HMAC of the end-user id with the router's salt,
request_messages = the history exactly as the client sent it, response = what the backend
answered, an explicit created_at per request (the router stamps each row when it answers, so a
conversation's turns are ordered even when one batch writes them together)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import DatasetItem, Interaction, Reaction
from tasks.core.ids import hash_user, stable_id
from tasks.signals.stage import SignalConfig

SALT = "signals-test-salt"
# Two days ago: early enough for every turn to precede an erasure requested now, recent enough
# for any retention period of a few days.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
# Small minimums, no embedding model: the tests count rows exactly.
CFG = SignalConfig(min_positive=1, min_negative=0, pair_by_embedding=False)


def user(name: str) -> str:
    return hash_user(name, SALT)


def interaction(iid: str, user_hash: str, messages: list[dict[str, Any]], response: str, *,
                minute: float, variant: str = "champion", status: str = "ok",
                client_id: str | None = None, mirror_of: str | None = None) -> dict[str, Any]:
    return {"id": iid, "user_hash": user_hash, "variant": variant, "model_name": "tip-generator",
            "context": {"mode": "off", "share": 0.0, "params": {}},
            "request_messages": messages, "response": response, "status": status,
            "client_id": client_id, "mirror_of": mirror_of,
            "created_at": T0 + timedelta(minutes=minute)}


def store(engine, interactions: list[dict[str, Any]],
          reactions: dict[str, tuple[str, int]] | None = None) -> None:
    """Write the interactions, and {interaction id: (reaction, dwell_ms)} reactions."""
    with session_scope(engine) as session:
        upsert(session, Interaction, interactions)
        if reactions:
            upsert(session, Reaction, [
                {"id": stable_id("reaction", iid), "interaction_id": iid, "reaction": r,
                 "dwell_ms": d} for iid, (r, d) in reactions.items()])


def user_says(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant_says(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def snapshot_text(result: dict[str, Any]) -> str:
    """Every file of the snapshot `result` names, concatenated."""
    root = Path(result["artifact_uri"].removeprefix("file://"))
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*"))
                     if p.is_file())


def exported_rows(result: dict[str, Any], fmt: str | None = None) -> list[dict[str, Any]]:
    """The rows of every JSONL file of the snapshot (of one format's training files only)."""
    root = Path(result["artifact_uri"].removeprefix("file://"))
    paths = (sorted(root.rglob("*.jsonl")) if fmt is None else
             [p for p in sorted((root / fmt).glob("*.jsonl")) if ".provenance" not in p.name])
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()
            if line.strip()]


def dataset_interactions(engine, dataset_id: str) -> set[str]:
    with session_scope(engine) as session:
        return set(session.scalars(select(DatasetItem.interaction_id).where(
            DatasetItem.dataset_id == dataset_id)))
