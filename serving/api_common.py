"""What the router's `/v1` routes (chat and reactions) share: the bearer-credentials dependency,
`Rejected` for answering at once from a dependency (401, 429) before the body is looked at,
`validated_body` for routes that read their JSON by hand, the header length check
(`checked_header`), the 401 answer (`unauthorized`), and the handlers that turn validation and
HTTP errors into OpenAI-shaped bodies (`validation_error_response`, `http_error_response`,
`rejected_response`).

The router answers an invalid field with 422, `param` naming it (without the leading "body" or
"header"), the message "<param>: <pydantic's message>", code "invalid_value" and pydantic's
error list as "detail"; the model server's own handler (`serving.model_routes`) answers 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.openai_schema import error_content, error_response

ModelT = TypeVar("ModelT", bound=BaseModel)


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <router API key>")
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


async def validated_body(request: Request, model: type[ModelT]) -> tuple[Any, ModelT]:
    """(the JSON as sent, `model` validated from it) for routes that read their body by hand,
    after authentication: invalid JSON is a 400, an invalid field a 422 naming it."""
    try:
        data = json.loads(await request.body())
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


def checked_header(headers: Mapping[str, str], name: str, max_length: int) -> str | None:
    """The header's value (None when absent); longer than `max_length` is a 422 naming it."""
    value = headers.get(name)
    if value is not None and len(value) > max_length:
        raise RequestValidationError([{
            "type": "string_too_long", "loc": ("header", name),
            "msg": f"String should have at most {max_length} characters",
            "input": value[:50], "ctx": {"max_length": max_length}}])
    return value
