"""Who is calling, and what they asked before: the caller an API key names (`CallerKeys` ->
`Caller`, or `ADMIN`), and per-client X-Request-Id scoping and replay (`RequestLedger`); the
router (`serving.router.Router`) owns one of each.

An X-Request-Id names a request of one client (unique per (client_id, request_id)), and is
bound to the end user who sent it: a replay naming another user (or none where the first named
one, or one where the first named none) is a 409, never the other user's answer. The last
`request_ids_max` ids are held in memory (`RequestIds`: (client, request id) -> `RequestEntry`,
loaded from the database at start by `RequestLedger.load_request_ids`), so a fresh id costs no
database read; one is made only when memory cannot vouch for the whole `request_id_window_s`.
`RequestLedger.claim_request_id` either claims a new id for an interaction (in flight until
`recorded` sees its row) or answers the replay: the stored answer with the same interaction id
(JSON or a one-chunk SSE stream), a 409 for another end user, while the first is in flight or
when it failed, a 503 while the stored answer cannot be read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi.responses import Response

from serving.interactions import InteractionLog
from serving.openai_schema import (
    SSE_DONE,
    chunk_choice,
    completion_chunk,
    error_response,
    sse_event,
    stored_completion,
)
from serving.proxy import HEADER_INTERACTION
from serving.router_config import RouterConfig

log = logging.getLogger("serving.router")  # the router's one log, as before the split


@dataclass(frozen=True, slots=True)
class Caller:
    """Whom a valid key belongs to: a named client, or the admin."""

    name: str
    admin: bool = False


ADMIN = Caller("admin", admin=True)


class CallerKeys:
    """Whose API key a Bearer token is: the named clients' keys and the admin key, held by their
    sha256 digests ("sha256:<64 hex>")."""

    def __init__(self, clients: Mapping[str, str], admin_key_sha256: str | None) -> None:
        # digest[:8] -> (digest, caller): one dict lookup, then a constant-time compare.
        self._callers: dict[bytes, tuple[bytes, Caller]] = {}
        for name, digest in clients.items():
            self._add_key(digest, Caller(name))
        if admin_key_sha256:
            self._add_key(admin_key_sha256, ADMIN)

    def _add_key(self, digest: str, caller: Caller) -> None:
        raw = bytes.fromhex(digest.removeprefix("sha256:"))
        self._callers[raw[:8]] = (raw, caller)

    def identify(self, token: str) -> Caller | None:
        """Whose key `token` is (a client or the admin), else None."""
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._callers.get(digest[:8])
        if entry is not None and hmac.compare_digest(entry[0], digest):
            return entry[1]
        return None


@dataclass(slots=True)
class RequestEntry:
    """The interaction a (client, X-Request-Id) named, its status once recorded, and the end
    user who asked."""

    interaction_id: str
    created: float  # epoch seconds
    status: str | None = None  # the row's status (ok, backend_error, ...); None: in flight
    user_hash: str | None = None  # the requester's user hash; None: the request named no user


class RequestIds:
    """(client, X-Request-Id) -> `RequestEntry` for the last `max_items` requests that sent one,
    oldest out first: what a replay is answered from without reading the database.

    `complete_since` (epoch seconds): every request id used after it is in memory. It is set
    when `load` has read the window's ids from the database (until then it is +inf: any id
    may exist) and raised past each entry evicted; an id not in memory `might_exist` only when
    that does not cover the last `window_s`. Event-loop only.
    """

    def __init__(self, max_items: int, window_s: float) -> None:
        self.max_items = max_items
        self.window_s = window_s
        self._entries: OrderedDict[tuple[str, str], RequestEntry] = OrderedDict()
        self._loaded_from = math.inf
        self._evicted_up_to = -math.inf

    @property
    def complete_since(self) -> float:
        return max(self._loaded_from, self._evicted_up_to)

    def might_exist(self, now: float) -> bool:
        """Whether an id not in memory could still name an interaction of the window."""
        return self.complete_since > now - self.window_s

    def get(self, key: tuple[str, str]) -> RequestEntry | None:
        return self._entries.get(key)

    def put(self, key: tuple[str, str], entry: RequestEntry) -> None:
        self._entries[key] = entry
        self._trim()

    def forget(self, key: tuple[str, str], interaction_id: str) -> None:
        """Drop an in-flight entry that will never be recorded (its handler died)."""
        entry = self._entries.get(key)
        if entry is not None and entry.interaction_id == interaction_id and entry.status is None:
            del self._entries[key]

    def load(self, rows: Iterable[tuple[str, str, str, str, float, str | None]],
             loaded_from: float) -> None:
        """Merge (client, request id, interaction id, status, created, user hash or None) rows
        read from the database, newest first; memory is complete from `loaded_from` on."""
        for client_id, request_id, interaction_id, status, created, user_hash in rows:
            key = (client_id, request_id)
            if key not in self._entries:
                self._entries[key] = RequestEntry(interaction_id, created, status, user_hash)
                self._entries.move_to_end(key, last=False)
        self._loaded_from = loaded_from
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self.max_items:
            _, evicted = self._entries.popitem(last=False)
            self._evicted_up_to = max(self._evicted_up_to, evicted.created)

    def __len__(self) -> int:
        return len(self._entries)


def _requester_columns() -> tuple[Any, Any]:
    """Who asked, as stored: the user hash, and whether the request named no user (its hash is
    then random: the request is matched as naming none)."""
    from tasks.core.db.models import Interaction

    return (Interaction.user_hash,
            Interaction.context.has_key("anonymous").label("anonymous"))


class RequestLedger:
    """Per-client X-Request-Id scoping and replay for the router: `requests` (what memory holds),
    the database reads behind it (through `engine`), and the replayed answers (waiting on
    `interaction_log` for a row still being written). Event-loop only, like `RequestIds`."""

    def __init__(self, config: RouterConfig, engine: Any, interaction_log: InteractionLog
                 ) -> None:
        self.config = config
        self.engine = engine
        self.interaction_log = interaction_log
        self.requests = RequestIds(config.request_ids_max, config.request_id_window_s)

    def recorded(self, row: dict[str, Any]) -> None:
        """Note the status of an interaction row just recorded, for a replay of its id."""
        if row["request_id"] is not None:
            entry = self.requests.get((row["client_id"], row["request_id"]))
            if entry is not None and entry.interaction_id == row["id"]:
                entry.status = row["status"]

    async def load_request_ids(self, retry_every_s: float = 5.0) -> None:
        """Read the window's request ids from the database into memory (so a fresh id needs no
        lookup); retried while the database is unreachable."""
        while True:
            try:
                rows, loaded_from = await asyncio.to_thread(self._recent_request_ids)
            except Exception as exc:  # noqa: BLE001 - unknown ids are looked up meanwhile
                log.warning("router: cannot load recent request ids (retrying in %.0f s): %s",
                            retry_every_s, str(exc).splitlines()[0] if str(exc) else exc)
                await asyncio.sleep(retry_every_s)
                continue
            self.requests.load(rows, loaded_from)
            log.info("router: %d recent request ids loaded", len(rows))
            return

    def _recent_request_ids(self) -> tuple[list[tuple[str, str, str, str, float, str | None]],
                                           float]:
        from sqlalchemy import select

        from tasks.core.db.engine import session_scope
        from tasks.core.db.models import Interaction

        started = time.time()
        since = datetime.fromtimestamp(started - self.requests.window_s).astimezone()
        with session_scope(self.engine) as session:
            found = session.execute(
                select(Interaction.client_id, Interaction.request_id, Interaction.id,
                       Interaction.status, Interaction.created_at, *_requester_columns())
                .where(Interaction.request_id.is_not(None), Interaction.created_at >= since)
                .order_by(Interaction.created_at.desc())
                .limit(self.requests.max_items)
            ).all()
        rows = [(client_id, request_id, interaction_id, status, created_at.timestamp(),
                 None if anonymous else user_hash)
                for client_id, request_id, interaction_id, status, created_at, user_hash,
                anonymous in found if client_id is not None]
        if len(found) < self.requests.max_items:
            return rows, started - self.requests.window_s
        return rows, found[-1].created_at.timestamp()

    def _stored_request(self, client_id: str, request_id: str) -> RequestEntry | None:
        from sqlalchemy import select

        from tasks.core.db.engine import session_scope
        from tasks.core.db.models import Interaction

        with session_scope(self.engine) as session:
            found = session.execute(
                select(Interaction.id, Interaction.status, Interaction.created_at,
                       *_requester_columns())
                .where(Interaction.client_id == client_id,
                       Interaction.request_id == request_id)
            ).first()
        if found is None:
            return None
        return RequestEntry(found.id, found.created_at.timestamp(), found.status,
                            None if found.anonymous else found.user_hash)

    def _stored_answer(self, interaction_id: str) -> tuple[str, datetime] | None:
        from sqlalchemy import select

        from tasks.core.db.engine import session_scope
        from tasks.core.db.models import Interaction

        with session_scope(self.engine) as session:
            found = session.execute(
                select(Interaction.response, Interaction.created_at)
                .where(Interaction.id == interaction_id, Interaction.status == "ok")
            ).first()
        return None if found is None else (found.response, found.created_at)

    async def claim_request_id(self, client_id: str, request_id: str, interaction_id: str,
                               *, user_hash: str | None, stream: bool) -> Response | None:
        """None when `request_id` is new for this client (it now names `interaction_id`, in
        flight, asked by `user_hash`: None when the request names no user); else the answer to
        a replay: the stored answer, or a 409."""
        key = (client_id, request_id)
        entry = self.requests.get(key)
        if entry is None and self.requests.might_exist(time.time()):
            try:
                found = await asyncio.wait_for(
                    asyncio.to_thread(self._stored_request, client_id, request_id),
                    self.config.db_wait_s)
            except Exception as exc:  # noqa: BLE001 - availability first: served as new
                log.warning("router: request id lookup failed, serving it as new: %s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                found = None
            entry = self.requests.get(key)  # claimed while this request waited?
            if entry is None and found is not None:
                entry = found
                self.requests.put(key, found)
        if entry is None:
            self.requests.put(key, RequestEntry(interaction_id, time.time(),
                                                user_hash=user_hash))
            return None
        if entry.user_hash != user_hash:
            # Checked first, and answered without the interaction id: nothing of another
            # user's request (its id, whether it is in flight or failed) reaches this one.
            return error_response(
                409, f"the X-Request-Id {request_id!r} was used by another user of this client; "
                "send a new X-Request-Id", param="x-request-id", code="request_id_conflict")
        return await self._replay(entry, request_id, stream=stream)

    async def _replay(self, entry: RequestEntry, request_id: str, *, stream: bool) -> Response:
        headers = {HEADER_INTERACTION: entry.interaction_id}
        if entry.status is None:
            return error_response(
                409, f"the request with X-Request-Id {request_id!r} is still in flight; retry "
                "once it is answered", param="x-request-id", code="request_in_flight",
                headers={**headers, "Retry-After": "1"})
        if entry.status != "ok":
            return error_response(
                409, f"the request with X-Request-Id {request_id!r} failed ({entry.status}); "
                "send a new X-Request-Id to try again", param="x-request-id",
                code="request_failed", headers=headers)
        if self.interaction_log.is_pending(entry.interaction_id):
            await asyncio.to_thread(self.interaction_log.wait_written, entry.interaction_id, 5.0)
        try:
            stored = await asyncio.wait_for(
                asyncio.to_thread(self._stored_answer, entry.interaction_id),
                self.config.db_wait_s)
        except Exception as exc:  # noqa: BLE001 - the database is down: say when to retry
            log.warning("router: cannot read the stored answer of %s: %s", entry.interaction_id,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return error_response(
                503, "the stored answer cannot be read right now; retry later",
                type_="api_error", code="database_unavailable",
                headers={**headers, "Retry-After": "5"})
        if stored is None:
            return error_response(
                409, f"the answer to X-Request-Id {request_id!r} was not stored; send a new "
                "X-Request-Id to try again", param="x-request-id", code="request_failed",
                headers=headers)
        text, created_at = stored
        completion = stored_completion(interaction_id=entry.interaction_id,
                                       created=int(created_at.timestamp()),
                                       model=self.config.public_model, text=text)
        if not stream:
            return Response(json.dumps(completion).encode(), media_type="application/json",
                            headers=headers)
        chunk = completion_chunk(completion_id=completion["id"], created=completion["created"],
                                 model=completion["model"], fingerprint="",
                                 choices=[chunk_choice({"role": "assistant", "content": text},
                                                       "stop")])
        body = (sse_event({**chunk, "interaction_id": entry.interaction_id})
                + sse_event(SSE_DONE)).encode()
        return Response(body, media_type="text/event-stream",
                        headers={**headers, "Cache-Control": "no-cache"})
