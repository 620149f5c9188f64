"""Forwarding one chat request to its backend: `proxy_completion` (JSON) and `proxy_stream` (SSE
passed through chunk by chunk) try the chosen variant, fall back to the champion when the challenger
fails (logging the failed attempt as its own row), record the interaction row (`Router.record`:
the log, and what the router remembers for reactions and request-id replays), start the mirror
copy, and answer with the interaction id header. Which variant answered is never told to the
client (it would let a client game the comparison): it is in the stored row only (variant,
backend model name and version). So no answer carries a version header, and the backend's
`model` (e.g. `<base>:<name>-v2`) is rewritten to the public model id, in a JSON body and in
every SSE event (`PublicModelRewriter`). `ClosingStream` makes sure a stream is logged and its
backend released however it ends.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi.responses import Response, StreamingResponse

from serving.interactions import interaction_row
from serving.openai_schema import SSEText, completion_text, error_response
from serving.routing import RoutingState
from serving.upstream import BackendUnavailable, UpstreamResponse, UpstreamStream
from tasks.core.ids import stable_id

if TYPE_CHECKING:
    from serving.router import Router

log = logging.getLogger("serving.router")  # the router's one log, as before the split


HEADER_INTERACTION = "X-Interaction-Id"


def _response_headers(interaction_id: str) -> dict[str, str]:
    # The same header names whichever variant answered: the version is in the stored row only.
    return {HEADER_INTERACTION: interaction_id}


# A "model" key with a JSON string value. An unescaped `"model"` followed by `:` can only be an
# object key (inside a string its quotes would be escaped), so message content never matches.
# Written to start with the literal and with an unrolled string loop: about 1.5 us a chunk.
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"[^"\\]*(?:\\.[^"\\]*)*"')


class PublicModelRewriter:
    """Rewrites the `model` field of every SSE event passing through to the public model id,
    at the bytes level (no JSON parse). Chunks from the backend may end mid-line or carry
    several `data:` lines: complete lines are rewritten and passed on at once, a partial last
    line is held until its end arrives (or the stream ends: `flush`)."""

    def __init__(self, public_model: str) -> None:
        field = b'"model":' + json.dumps(public_model).encode()  # ASCII: a JSON string
        self._template = field.replace(b"\\", b"\\\\")  # a literal `re` template
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete lines received so far (rewritten); b"" while a line is incomplete."""
        data = self._tail + chunk if self._tail else chunk
        if data.endswith((b"\n", b"\r")):  # the usual chunk: whole events
            self._tail = b""
            return self._rewrite(data)
        # A field never spans a line end, so cutting after the last one never splits a value.
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        self._tail = data[cut:]
        return self._rewrite(data[:cut])

    def flush(self) -> bytes:
        """What is left of a stream that did not end with a line end (rewritten)."""
        tail, self._tail = self._tail, b""
        return self._rewrite(tail)

    def _rewrite(self, lines: bytes) -> bytes:
        if b'"model"' not in lines:
            return lines
        return _MODEL_FIELD.sub(self._template, lines)


def _backend_failed(response: UpstreamResponse | UpstreamStream | None,
                    exc: Exception | None) -> bool:
    return exc is not None or (response is not None and response.status_code >= 500)


def _log_failed_attempt(router: Router, state: RoutingState, row_base: dict[str, Any],
                        variant: str, model: str, detail: str, started: float) -> None:
    """A challenger attempt that failed before the champion answered in its place gets its own
    `backend_error` row (id derived from the served interaction's, which its context names), so
    the challenger's error rate counts it and the shadow report's error guard can roll back. It
    carries no request id: the client's X-Request-Id names the served interaction only."""
    router.record(interaction_row(
        **{**row_base, "id": stable_id(row_base["id"], "failed-attempt", variant),
           "context": {**row_base["context"], "fallback_to": row_base["id"]},
           "request_id": None},
        variant=variant, model_name=model, model_version=state.versions[variant],
        latency_ms=(time.perf_counter() - started) * 1000.0, status="backend_error",
        error=detail[:2000]))


async def proxy_completion(router: Router, state: RoutingState, variant: str, payload: dict[str, Any],
                    row_base: dict[str, Any], started: float, mirror: bool) -> Response:
    """Non-streaming: forward, fall back to the champion if the challenger fails, log, answer."""
    response: UpstreamResponse | None = None
    error: BackendUnavailable | None = None
    for attempt_variant in ((variant, "champion") if variant == "challenger" else (variant,)):
        payload["model"] = state.backend_models[attempt_variant]
        response, error = None, None
        try:
            response = await router.post_json(attempt_variant, payload)
        except BackendUnavailable as exc:
            error = exc
        if not _backend_failed(response, error):
            if attempt_variant != variant:
                row_base["context"]["fallback_from"] = variant
            variant = attempt_variant
            break
        detail = str(error) if error else f"HTTP {response.status_code if response else '?'}"
        log.warning("router: %s backend failed (%s)", attempt_variant, detail)
        if attempt_variant != "champion":
            _log_failed_attempt(router, state, row_base, attempt_variant, payload["model"],
                                detail, started)
    latency_ms = (time.perf_counter() - started) * 1000.0
    row = interaction_row(**row_base, variant=variant, model_name=payload["model"],
                          model_version=state.versions[variant], latency_ms=latency_ms)
    headers = _response_headers(row["id"])
    if response is None or response.status_code >= 500:
        detail = str(error) if error else f"HTTP {response.status_code}"
        row.update(status="backend_error", error=detail[:2000])
        router.record(row)
        return _backend_failed_response(error, headers)
    if response.status_code >= 400:
        row.update(status="rejected", error=response.text[:2000])
        router.record(row)
        return Response(response.content, status_code=response.status_code,
                        media_type="application/json", headers=headers)
    try:
        data = response.json()
    except ValueError:
        row.update(status="backend_error", error="backend returned invalid JSON")
        router.record(row)
        return error_response(502, "the model backend returned invalid JSON; retry later",
                              type_="api_error", code="backend_error", headers=headers)
    row["response"] = completion_text(data)
    router.record(row)
    if mirror:
        router.start_mirror(payload=payload, parent_id=row["id"], user_hash=row["user_hash"],
                            client_id=row["client_id"], state=state, context=row_base["context"],
                            messages=row_base["request_messages"])
    if isinstance(data, dict):
        data["model"] = router.config.public_model  # never the variant's backend model name
        data["interaction_id"] = row["id"]
    return Response(json.dumps(data).encode(), media_type="application/json", headers=headers)


async def proxy_stream(router: Router, state: RoutingState, variant: str, payload: dict[str, Any],
                  row_base: dict[str, Any], started: float, mirror: bool) -> Response:
    """Streaming: open the backend stream (falling back before the first byte), pass it through."""
    variant, upstream, error = await _open_stream(router, state, variant, payload, row_base,
                                                  started)
    row = interaction_row(**row_base, variant=variant, model_name=payload["model"],
                          model_version=state.versions[variant])
    headers = _response_headers(row["id"])
    if upstream is None or upstream.status_code >= 400:
        return await _stream_failed(router, row, headers, upstream, error, started)
    if mirror:
        router.start_mirror(payload=payload, parent_id=row["id"], user_hash=row["user_hash"],
                            client_id=row["client_id"], state=state, context=row_base["context"],
                            messages=row_base["request_messages"])
    return _relay(router, row, headers, upstream, started)


async def _open_stream(router: Router, state: RoutingState, variant: str,
                       payload: dict[str, Any], row_base: dict[str, Any], started: float,
                       ) -> tuple[str, UpstreamStream | None, BackendUnavailable | None]:
    """Open the chosen variant's stream, falling back to the champion when the challenger fails
    (its failed attempt logged); the variant that answered (the chosen one when all failed),
    the last stream opened and the last error."""
    upstream: UpstreamStream | None = None
    error: BackendUnavailable | None = None
    for attempt_variant in ((variant, "champion") if variant == "challenger" else (variant,)):
        payload["model"] = state.backend_models[attempt_variant]
        upstream, error = None, None
        try:
            upstream = await router.open_stream(attempt_variant, payload)
        except BackendUnavailable as exc:
            error = exc
        if not _backend_failed(upstream, error):
            if attempt_variant != variant:
                row_base["context"]["fallback_from"] = variant
            variant = attempt_variant
            break
        if upstream is not None:
            await upstream.aclose()
        if attempt_variant != "champion":
            detail = str(error) if error else f"HTTP {upstream.status_code if upstream else '?'}"
            _log_failed_attempt(router, state, row_base, attempt_variant, payload["model"],
                                detail, started)
    return variant, upstream, error


async def _stream_failed(router: Router, row: dict[str, Any], headers: dict[str, str],
                         upstream: UpstreamStream | None,
                         error: BackendUnavailable | None, started: float) -> Response:
    """No stream to pass through: a 4xx from the backend is logged as rejected and relayed; no
    answer or a 5xx is logged as a backend error and answered 502 (504 on a timeout)."""
    if upstream is not None and upstream.status_code < 500:
        body = await upstream.aread()
        await upstream.aclose()
        row.update(status="rejected", error=body[:2000].decode(errors="replace"),
                   latency_ms=(time.perf_counter() - started) * 1000.0)
        router.record(row)
        return Response(body, status_code=upstream.status_code,
                        media_type="application/json", headers=headers)
    detail = str(error) if error else (
        f"HTTP {upstream.status_code}" if upstream is not None else "no response")
    row.update(status="backend_error", error=detail[:2000],
               latency_ms=(time.perf_counter() - started) * 1000.0)
    router.record(row)
    return _backend_failed_response(error, headers)


def _backend_failed_response(error: BackendUnavailable | None,
                             headers: dict[str, str]) -> Response:
    """502 (504 on a timeout) naming neither the variant nor the backend (the row has both)."""
    timed_out = error is not None and error.timed_out
    message = ("the model backend timed out; retry later" if timed_out
               else "the model backend failed; retry later")
    return error_response(504 if timed_out else 502, message, type_="api_error",
                          code="backend_error", headers=headers)


def _relay(router: Router, row: dict[str, Any], headers: dict[str, str],
           upstream: UpstreamStream, started: float) -> Response:
    """Pass the open stream through chunk by chunk (line by line where a chunk ends mid-line),
    its `model` fields rewritten to the public model; the row (response text, time to first
    token, final status) is logged exactly once, and the backend released, however it ends."""
    text = SSEText()
    rewriter = PublicModelRewriter(router.config.public_model)
    logged = False

    def log_once(status: str, error_text: str | None) -> None:
        nonlocal logged
        if not logged:
            logged = True
            row.update(response=text.text, status=status, error=error_text,
                       latency_ms=(time.perf_counter() - started) * 1000.0)
            router.record(row)

    async def passthrough() -> AsyncIterator[bytes]:
        status, error_text = "client_disconnected", None
        try:
            async for chunk in upstream.aiter_raw():
                if row["ttft_ms"] is None:
                    row["ttft_ms"] = (time.perf_counter() - started) * 1000.0
                text.feed(chunk)
                lines = rewriter.feed(chunk)
                if lines:
                    yield lines
            rest = rewriter.flush()
            if rest:
                yield rest
            status = "ok"
        except BackendUnavailable as exc:
            status, error_text = "backend_error", str(exc)
        finally:
            log_once(status, error_text)
            await upstream.aclose()

    async def closed() -> None:
        # A client gone before the body generator first ran never enters its `finally`.
        log_once("client_disconnected", None)
        await upstream.aclose()

    return ClosingStream(passthrough(), closed, media_type="text/event-stream",
                          headers={**headers, "Cache-Control": "no-cache"})


class ClosingStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close` once it is over, however it ended
    (finished, client gone before the first chunk, task cancelled)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()
