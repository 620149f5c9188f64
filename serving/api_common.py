"""What the router's `/v1` routes (chat and reactions) share: the bearer-credentials dependency,
`Rejected` for answering at once from a dependency (401, 403, 429) before the body is looked at,
`read_body` (bounded: a body over the limit is a 413, by its Content-Length or by the bytes
actually read) and `validated_body` for routes that read their JSON by hand, the header length
check (`checked_header`), the 401 and 403 answers (`unauthorized`, `forbidden`), what the router
remembers of each recent interaction for the reactions API (`InteractionFacts`,
`RecentInteractions`), and the handlers that turn validation and HTTP errors into OpenAI-shaped
bodies (`validation_error_response`, `http_error_response`, `rejected_response`).

The router answers an invalid field with 422, `param` naming it (without the leading "body" or
"header"), the message "<param>: <pydantic's message>", code "invalid_value" and pydantic's
error list as "detail"; the model server's own handler (`serving.model_routes`) answers 400.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.openai_schema import error_content, error_response

ModelT = TypeVar("ModelT", bound=BaseModel)


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <the client's API key> "
                     "(GET /v1/router/state: the admin key)")
BEARER = Depends(_bearer)  # the credentials dependency of every /v1 route


def validation_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The router's 422 for a `RequestValidationError`: the first error names the field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ())][1:]  # drop "body" / "header"
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
    return JSONResponse(status_code=422, content={
        **error_content(message, param=param, code="invalid_value"),
        "detail": json.loads(json.dumps(errors, default=str)),
    })


def http_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


class Rejected(Exception):  # noqa: N818 - it carries the response, it is not an error
    """Raised by a route dependency (auth, rate limit) to answer `response` at once: FastAPI
    calls dependencies before it validates the body, so a bad key is a 401 whatever it sent."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


async def rejected_response(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Rejected)
    return exc.response


def too_large(max_bytes: int, size: int | None = None) -> JSONResponse:
    sent = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
    return error_response(413, f"the body is {sent}; the router accepts at most {max_bytes} "
                          "bytes per request (TUNELOOP_ROUTER_MAX_BODY_BYTES)",
                          code="request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most `max_bytes`: a larger Content-Length is refused before a byte
    is read, and a body without one (chunked) is cut off as soon as it passes the limit."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise Rejected(error_response(400, f"Content-Length {length[:40]!r} is not a "
                                          "number", code="invalid_request")) from None
        if size > max_bytes:
            raise Rejected(too_large(max_bytes, size))
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise Rejected(too_large(max_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


async def validated_body(request: Request, model: type[ModelT], max_bytes: int
                         ) -> tuple[Any, ModelT]:
    """(the JSON as sent, `model` validated from it) for routes that read their body by hand,
    after authentication: over `max_bytes` is a 413, invalid JSON a 400, an invalid field a 422
    naming it."""
    try:
        data = json.loads(await read_body(request, max_bytes))
    except ValueError as exc:
        raise Rejected(error_response(400, f"the body is not valid JSON: {exc}",
                                      code="invalid_json")) from None
    try:
        return data, model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]) from None


def unauthorized() -> JSONResponse:
    return error_response(401, "missing or invalid API key; send Authorization: Bearer <key>",
                          type_="authentication_error", code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> JSONResponse:
    return error_response(403, message, type_="permission_error", code="forbidden")


def checked_header(headers: Mapping[str, str], name: str, max_length: int) -> str | None:
    """The header's value (None when absent); longer than `max_length` is a 422 naming it."""
    value = headers.get(name)
    if value is not None and len(value) > max_length:
        raise RequestValidationError([{
            "type": "string_too_long", "loc": ("header", name),
            "msg": f"String should have at most {max_length} characters",
            "input": value[:50], "ctx": {"max_length": max_length}}])
    return value


# ---- what the router remembers of recent interactions ----------------------------------------


@dataclass(frozen=True, slots=True)
class InteractionFacts:
    """What a reaction is checked against: who got the answer, when, and whether it was one."""

    client_id: str | None
    user_hash: str | None  # None: the request named no end user (anonymous)
    created_at: datetime
    reactable: bool  # False for rows never returned to a client (mirror copies, failed attempts)

    @classmethod
    def of(cls, *, client_id: str | None, user_hash: str, created_at: datetime, variant: str,
           context: Mapping[str, Any]) -> InteractionFacts:
        return cls(client_id=client_id,
                   user_hash=None if context.get("anonymous") else user_hash,
                   created_at=created_at,
                   reactable=variant != "mirror" and "fallback_to" not in context)

    @classmethod
    def of_row(cls, row: Mapping[str, Any]) -> InteractionFacts:
        """From an `interactions` row as the router submits it (or as the database holds it)."""
        return cls.of(client_id=row["client_id"], user_hash=row["user_hash"],
                      created_at=row["created_at"], variant=row["variant"],
                      context=row["context"] or {})


class RecentInteractions:
    """The last `max_items` interactions the router answered (id -> `InteractionFacts`), so a
    reaction can still be checked while the database is unreachable. O(1), event-loop only."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, InteractionFacts] = OrderedDict()

    def add(self, interaction_id: str, facts: InteractionFacts) -> None:
        self._items[interaction_id] = facts
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def get(self, interaction_id: str) -> InteractionFacts | None:
        return self._items.get(interaction_id)

    def __len__(self) -> int:
        return len(self._items)
