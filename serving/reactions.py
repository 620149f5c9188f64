"""The reactions API: how users' responses to an answer (done, dismiss, thumbs…) are recorded.

`POST /v1/reactions {interaction_id, reaction, dwell_ms, idempotency_key?}` on the router app.
The reaction id is deterministic: with an idempotency key (the `Idempotency-Key` header, else the
body field) it is stable_id(interaction, key), so a retried POST returns the same reaction (200)
instead of a second one (201 the first time); reusing a key with a different payload is a 409.
Without a key, the id derives from the payload itself, so an identical retry is also a replay.
An unknown interaction is a 404 (an interaction still in the router's write queue is waited for
briefly first), and validation errors are 422 with `param` naming the field.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from serving.api_common import BEARER, Rejected, unauthorized, validated_body
from serving.openai_schema import ERROR_RESPONSES, ErrorResponse, JsonInt, error_response
from tasks.core.ids import stable_id

if TYPE_CHECKING:
    from serving.router import Router

REACTIONS = ("done", "dismiss", "thumbs_up", "thumbs_down", "copy", "regenerate")
ReactionKind = Literal["done", "dismiss", "thumbs_up", "thumbs_down", "copy", "regenerate"]
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]+$"  # printable ASCII, as in an HTTP header (e.g. a UUID)
MAX_DWELL_MS = 7 * 24 * 3600 * 1000  # a week: anything longer is a client clock bug


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


class ReactionOut(BaseModel):
    id: str
    interaction_id: str
    reaction: ReactionKind
    dwell_ms: int
    created: bool  # False: a replay of an earlier identical request


def reaction_id(interaction_id: str, reaction: str, dwell_ms: int,
                idempotency_key: str | None) -> str:
    """Deterministic: from the idempotency key when given, else from the payload."""
    if idempotency_key:
        return stable_id("reaction", interaction_id, "key", idempotency_key)
    return stable_id("reaction", interaction_id, reaction, dwell_ms)


def record_reaction(engine: Any, reaction: ReactionIn, idempotency_key: str | None) -> ReactionOut:
    """Insert the reaction once; a replay returns the stored one. Raises ReactionError."""
    from sqlalchemy import select
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Interaction, Reaction

    rid = reaction_id(reaction.interaction_id, reaction.reaction, reaction.dwell_ms,
                      idempotency_key)
    with session_scope(engine) as session:
        exists = session.execute(
            select(Interaction.id).where(Interaction.id == reaction.interaction_id)
        ).scalar_one_or_none()
        if exists is None:
            raise ReactionError(
                f"interaction {reaction.interaction_id!r} does not exist; use the id from the "
                "router's X-Interaction-Id response header", status=404,
                interaction_id=reaction.interaction_id, code="interaction_not_found",
                param="interaction_id")
        inserted = session.execute(
            pg_insert(Reaction.__table__).values(
                id=rid, interaction_id=reaction.interaction_id, reaction=reaction.reaction,
                dwell_ms=reaction.dwell_ms, idempotency_key=idempotency_key,
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


def reactions_router(router: Router) -> APIRouter:
    """The /reactions routes bound to one router instance (auth, limits, interaction log)."""
    api = APIRouter(tags=["reactions"])

    async def authorized_key(credentials: HTTPAuthorizationCredentials | None = BEARER) -> str:
        """The caller's key id; a bad key (401) or an empty bucket (429) answers before the
        body is validated, so no unauthenticated request learns anything or escapes the limit."""
        key_id = router.authenticate(credentials)
        if key_id is None:
            raise Rejected(unauthorized())
        limited = router.rate_limited(key_id, None)
        if limited is not None:
            raise Rejected(limited)
        return key_id

    @api.post(
        "/reactions", status_code=201, response_model=ReactionOut,
        responses={**ERROR_RESPONSES, 200: {"model": ReactionOut, "description": "a replay"},
                   404: {"model": ErrorResponse, "description": "unknown interaction"},
                   409: {"model": ErrorResponse,
                         "description": "idempotency key reused with another payload"}},
        # The body is read after the key check (a caller without a key learns nothing, not
        # even whether its JSON parses); the document still describes it.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ReactionIn"}}}}},
    )
    async def post_reaction(
        request: Request,
        key_id: str = Depends(authorized_key),
        idempotency_key: str | None = Header(default=None, min_length=1, max_length=255,
                                             pattern=IDEMPOTENCY_KEY_PATTERN),
    ) -> Any:
        del key_id  # authenticated and rate-limited by the dependency
        _, body = await validated_body(request, ReactionIn)
        # The header wins when both are sent (it is what HTTP middleware and retries keep).
        key = idempotency_key or body.idempotency_key
        if router.log.is_pending(body.interaction_id):
            # The answer left the router before its row was written: wait for the writer.
            await asyncio.to_thread(router.log.wait_written, body.interaction_id, 5.0)
        try:
            out = await asyncio.to_thread(record_reaction, router.engine, body, key)
        except ReactionError as exc:
            return error_response(exc.status, str(exc), param=exc.param, code=exc.code)
        return JSONResponse(status_code=201 if out.created else 200, content=out.model_dump())

    return api
