"""The reactions API: how users' responses to an answer (done, dismiss, thumbs…) are recorded.

`POST /v1/reactions {interaction_id, reaction, dwell_ms, idempotency_key?, user?}` on the router
app, with a client's API key. A reaction is accepted only for an interaction that key's client
got, and, when that request named an end user (body `user` or X-User-Id), only when the
reaction names the same user (body `user` or X-User-Id; compared by the salted hash). Anything
else — another client's interaction, another user, a mirror copy or a failed attempt the client
never saw, an id that does not exist — is the same 404, so no caller learns that someone else's
interaction exists. A reaction comes at most `reaction_window_s` after its answer (else a 409),
and the body is bounded as on the chat route (413).

The reaction id is deterministic: with an idempotency key (the `Idempotency-Key` header, else the
body field) it is stable_id(interaction, key), so a retried POST returns the same reaction (200)
instead of a second one (201 the first time); reusing a key with a different payload is a 409.
Without a key, the id derives from the payload itself, so an identical retry is also a replay.
An interaction still in the router's write queue is waited for briefly first; validation errors
are 422 with `param` naming the field.

While the database is unreachable (the check fails with a connection error, or takes longer
than `db_wait_s`), a reaction is checked against the interactions the router answered recently
(`Router.recent`) and, when it passes, queued with the interaction log (`submit_reaction`:
written after the interactions, spooled to disk meanwhile) and answered 202 `queued: true`; an
interaction the router does not hold in memory is a 503 with Retry-After. The same path takes a
reaction to an interaction the database does not have yet but the log does (`is_known`: still
spooled while the spool replays after an outage, or still queued): it is written behind the
spool, after its interaction. A queued reaction whose idempotency key was used before for another
payload is dropped when it is written (the first one stands), where the database path would have
answered 409.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from serving.api_common import BEARER, InteractionFacts, Rejected, validated_body
from serving.openai_schema import ERROR_RESPONSES, ErrorResponse, JsonInt, error_response
from serving.router_config import LEGACY_CLIENT
from serving.routing import hash_user
from tasks.core.ids import stable_id

if TYPE_CHECKING:
    from serving.router import Router

REACTIONS = ("done", "dismiss", "thumbs_up", "thumbs_down", "copy", "regenerate")
ReactionKind = Literal["done", "dismiss", "thumbs_up", "thumbs_down", "copy", "regenerate"]
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]+$"  # printable ASCII, as in an HTTP header (e.g. a UUID)
MAX_DWELL_MS = 7 * 24 * 3600 * 1000  # a week: anything longer is a client clock bug
RETRY_AFTER_OUTAGE_S = 30


class ReactionError(RuntimeError):
    """A reaction cannot be recorded; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, *, status: int, interaction_id: str,
                 code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.interaction_id = interaction_id
        self.code = code
        self.param = param


class ReactionIn(BaseModel):
    """A user's reaction to one interaction (the id the router returned in X-Interaction-Id)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    interaction_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    reaction: ReactionKind
    dwell_ms: JsonInt = Field(ge=0, le=MAX_DWELL_MS,
                          description="time between showing the answer and the reaction")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255,
                                        pattern=IDEMPOTENCY_KEY_PATTERN)
    user: str | None = Field(default=None, min_length=1, max_length=256,
                             description="the end user who reacts (else the X-User-Id header): "
                             "required when the chat request named one, and the same one")


class ReactionOut(BaseModel):
    id: str
    interaction_id: str
    reaction: ReactionKind
    dwell_ms: int
    created: bool  # False: a replay of an earlier identical request
    queued: bool = False  # True: accepted while the database is down, written when it is back


@dataclass(frozen=True, slots=True)
class Reactor:
    """Who reacts: the authenticated client and the end user it names (salted hash, or None)."""

    client_id: str
    user_hash: str | None


def reaction_id(interaction_id: str, reaction: str, dwell_ms: int,
                idempotency_key: str | None) -> str:
    """Deterministic: from the idempotency key when given, else from the payload."""
    if idempotency_key:
        return stable_id("reaction", interaction_id, "key", idempotency_key)
    return stable_id("reaction", interaction_id, reaction, dwell_ms)


def check_reaction(facts: InteractionFacts | None, interaction_id: str, reactor: Reactor, *,
                   window_s: float, now: datetime) -> None:
    """Raise ReactionError unless `reactor` may react to the interaction `facts` describe: 404
    (one answer for every kind of "not yours") or 409 outside the window."""
    # Rows from before named clients were made with the one key, now the client "default".
    owner = None if facts is None else (facts.client_id or LEGACY_CLIENT)
    same_user = facts is not None and (facts.user_hash is None or (
        reactor.user_hash is not None
        and hmac.compare_digest(facts.user_hash, reactor.user_hash)))
    if facts is None or owner != reactor.client_id or not facts.reactable or not same_user:
        raise ReactionError(
            f"interaction {interaction_id!r} does not exist; use the id from the router's "
            "X-Interaction-Id response header, with the API key and the user of that request",
            status=404, interaction_id=interaction_id, code="interaction_not_found",
            param="interaction_id")
    age_s = (now - facts.created_at).total_seconds()
    if age_s > window_s:
        raise ReactionError(
            f"interaction {interaction_id!r} was answered {age_s / 3600:.1f} h ago; reactions "
            f"are accepted within {window_s / 3600:.1f} h of the answer",
            status=409, interaction_id=interaction_id, code="reaction_window_closed",
            param="interaction_id")


def record_reaction(engine: Any, reaction: ReactionIn, idempotency_key: str | None,
                    reactor: Reactor, *, window_s: float,
                    now: datetime | None = None) -> ReactionOut:
    """Check the reaction against its interaction, insert it once; a replay returns the stored
    one. Raises ReactionError; database errors propagate (the caller's outage path)."""
    from sqlalchemy import select
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Interaction, Reaction

    rid = reaction_id(reaction.interaction_id, reaction.reaction, reaction.dwell_ms,
                      idempotency_key)
    with session_scope(engine) as session:
        found = session.execute(
            select(Interaction.client_id, Interaction.user_hash, Interaction.created_at,
                   Interaction.variant, Interaction.context, Interaction.erased_at)
            .where(Interaction.id == reaction.interaction_id)
        ).first()
        # An erased user's interaction takes no reaction: the same 404 as any "not yours"
        # (`tuneloop forget` deleted their reactions; none may come back after it).
        facts = None if found is None or found.erased_at is not None else InteractionFacts.of(
            client_id=found.client_id, user_hash=found.user_hash, created_at=found.created_at,
            variant=found.variant, context=found.context or {})
        check_reaction(facts, reaction.interaction_id, reactor, window_s=window_s,
                       now=now or datetime.now(UTC))
        inserted = session.execute(
            pg_insert(Reaction.__table__).values(
                id=rid, interaction_id=reaction.interaction_id, reaction=reaction.reaction,
                dwell_ms=reaction.dwell_ms, idempotency_key=idempotency_key,
                client_id=reactor.client_id,
            ).on_conflict_do_nothing(index_elements=["id"]).returning(Reaction.id)
        ).scalar_one_or_none()
        # RETURNING tells a first write from a replay, also under concurrent retries.
        created = inserted is not None
        stored = session.get(Reaction, rid)
        assert stored is not None
        same = (stored.interaction_id, stored.reaction, int(stored.dwell_ms)) == (
            reaction.interaction_id, reaction.reaction, reaction.dwell_ms)
        if not same:
            raise ReactionError(
                f"idempotency key {idempotency_key!r} was already used for a different "
                f"reaction ({stored.reaction}, dwell_ms={stored.dwell_ms}); send a new key",
                status=409, interaction_id=reaction.interaction_id, code="idempotency_conflict",
                param="idempotency_key")
        return ReactionOut(id=stored.id, interaction_id=stored.interaction_id,
                           reaction=stored.reaction, dwell_ms=int(stored.dwell_ms),
                           created=created)


def queue_reaction(router: Router, reaction: ReactionIn, idempotency_key: str | None,
                   reactor: Reactor, *, why: str = "the database is unreachable"
                   ) -> JSONResponse:
    """The outage path: check against the router's recent interactions, queue with the log.
    `why` is what keeps the database from checking it (the 503s say so)."""
    now = datetime.now(UTC)
    facts = router.recent.get(reaction.interaction_id)
    retry = {"Retry-After": str(RETRY_AFTER_OUTAGE_S)}
    if facts is None:
        return error_response(
            503, f"{why} and the router cannot check this interaction without it; retry in "
            f"{RETRY_AFTER_OUTAGE_S} s", type_="api_error", code="database_unavailable",
            headers=retry)
    try:
        check_reaction(facts, reaction.interaction_id, reactor,
                       window_s=router.config.reaction_window_s, now=now)
    except ReactionError as exc:
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code)
    rid = reaction_id(reaction.interaction_id, reaction.reaction, reaction.dwell_ms,
                      idempotency_key)
    queued = router.log.submit_reaction({
        "id": rid, "interaction_id": reaction.interaction_id, "reaction": reaction.reaction,
        "dwell_ms": reaction.dwell_ms, "idempotency_key": idempotency_key,
        "client_id": reactor.client_id, "created_at": now})
    if not queued:
        return error_response(
            503, f"{why} and the router's queue is full; retry in {RETRY_AFTER_OUTAGE_S} s",
            type_="api_error", code="database_unavailable", headers=retry)
    out = ReactionOut(id=rid, interaction_id=reaction.interaction_id,
                      reaction=reaction.reaction, dwell_ms=reaction.dwell_ms, created=True,
                      queued=True)
    return JSONResponse(status_code=202, content=out.model_dump())


def reactions_router(router: Router) -> APIRouter:
    """The /reactions routes bound to one router instance (auth, limits, interaction log)."""
    from sqlalchemy.exc import InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    # What "the database is unreachable" looks like from a session (a statement timeout is an
    # OperationalError too); the wait itself is bounded by db_wait_s.
    unreachable = (OperationalError, InterfaceError, PoolTimeout, TimeoutError)
    api = APIRouter(tags=["reactions"])
    config = router.config

    async def authorized_client(
            credentials: HTTPAuthorizationCredentials | None = BEARER) -> str:
        """The caller's client name; a bad key (401), the admin key (403) or an empty bucket
        (429) answers before the body is validated, so no unauthenticated request learns
        anything or escapes the limit."""
        client_id = router.client_of(router.authenticate(credentials))
        limited = router.rate_limited(client_id, None)
        if limited is not None:
            raise Rejected(limited)
        return client_id

    @api.post(
        "/reactions", status_code=201, response_model=ReactionOut,
        responses={**ERROR_RESPONSES, 200: {"model": ReactionOut, "description": "a replay"},
                   202: {"model": ReactionOut,
                         "description": "queued while the database is unreachable"},
                   404: {"model": ErrorResponse,
                         "description": "no interaction of this client (and user) has that id"},
                   409: {"model": ErrorResponse,
                         "description": "idempotency key reused with another payload, or the "
                         "reaction window closed"},
                   503: {"model": ErrorResponse,
                         "description": "the database is unreachable; see Retry-After"}},
        # The body is read after the key check (a caller without a key learns nothing, not
        # even whether its JSON parses); the document still describes it.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ReactionIn"}}}}},
    )
    async def post_reaction(
        request: Request,
        client_id: str = Depends(authorized_client),
        idempotency_key: str | None = Header(default=None, min_length=1, max_length=255,
                                             pattern=IDEMPOTENCY_KEY_PATTERN),
        x_user_id: str | None = Header(default=None, max_length=256,
                                       description="the end user who reacts (when the body "
                                       "has no `user`)"),
    ) -> Any:
        _, body = await validated_body(request, ReactionIn, config.max_body_bytes)
        # The header wins when both are sent (it is what HTTP middleware and retries keep).
        key = idempotency_key or body.idempotency_key
        user_id = body.user or x_user_id
        reactor = Reactor(client_id=client_id,
                          user_hash=hash_user(user_id, router._salt) if user_id else None)
        # Asked before the database: a row leaves the log only once it is committed, so one the
        # log knows now and the database then lacks is still spooled (or queued), not unknown.
        known = router.log.is_known(body.interaction_id)
        if router.log.is_pending(body.interaction_id):
            # The answer left the router before its row was written: wait for the writer.
            await asyncio.to_thread(router.log.wait_written, body.interaction_id, 5.0)
        try:
            out = await asyncio.wait_for(
                asyncio.to_thread(record_reaction, router.engine, body, key, reactor,
                                  window_s=config.reaction_window_s),
                config.db_wait_s)
        except ReactionError as exc:
            if exc.code == "interaction_not_found" and known:
                return queue_reaction(router, body, key, reactor,
                                      why="the database does not have this interaction yet "
                                      "(the router is still writing it)")
            return error_response(exc.status, str(exc), param=exc.param, code=exc.code)
        except unreachable:
            return queue_reaction(router, body, key, reactor)
        return JSONResponse(status_code=201 if out.created else 200, content=out.model_dump())

    return api
