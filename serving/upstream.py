"""The router's transport to its backends: one pooled HTTP client per app, aiohttp when installed
(a fraction of httpx's CPU per request) else `httpx.AsyncClient` (`make_upstream`), both behind
the same `post`/`stream` interface returning `UpstreamResponse`/`UpstreamStream`, with every
network error or timeout normalised to `BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


class BackendUnavailable(Exception):
    """A backend could not be reached or broke off (network error or timeout)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class UpstreamResponse:
    """A complete (non-streamed) backend response."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class UpstreamStream:
    """An open streamed backend response: `status_code`, `aiter_raw()`, `aread()`, `aclose()`."""

    def __init__(self, status_code: int, chunks: AsyncIterator[bytes], close: Any) -> None:
        self.status_code = status_code
        self._chunks = chunks
        self._close = close
        self._closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - normalise the client library's errors
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Release the backend connection; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        result = self._close()
        if asyncio.iscoroutine(result):
            await result


class HttpxUpstream:
    """Pooled `httpx.AsyncClient`."""

    name = "httpx"

    def __init__(self, max_connections: int) -> None:
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=min(64, max_connections),
                              keepalive_expiry=60)
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0, connect=5.0))

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> UpstreamResponse:
        try:
            response = await self.client.post(url, content=body, headers=headers,
                                              timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, httpx.TimeoutException)) from exc
        return UpstreamResponse(response.status_code, response.content)

    async def stream(self, url: str, body: bytes, headers: dict[str, str],
                     timeout_s: float) -> UpstreamStream:
        request = self.client.build_request("POST", url, content=body, headers=headers,
                                            timeout=timeout_s)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, httpx.TimeoutException)) from exc
        return UpstreamStream(response.status_code, response.aiter_raw(), response.aclose)

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpUpstream:
    """Pooled `aiohttp.ClientSession`: the same job for a fraction of httpcore's CPU per request
    (its pool scans every connection per request; see bench/router.py)."""

    name = "aiohttp"

    def __init__(self, max_connections: int) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    def _timeout(self, timeout_s: float, *, stream: bool) -> Any:
        if stream:  # a long answer may stream for a while: bound the gaps, not the total
            return self._aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=timeout_s)
        return self._aiohttp.ClientTimeout(total=timeout_s, connect=5.0)

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> UpstreamResponse:
        try:
            async with self.session.post(url, data=body, headers=headers,
                                         timeout=self._timeout(timeout_s, stream=False)) as resp:
                return UpstreamResponse(resp.status, await resp.read())
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, TimeoutError)) from exc

    async def stream(self, url: str, body: bytes, headers: dict[str, str],
                     timeout_s: float) -> UpstreamStream:
        try:
            resp = await self.session.post(url, data=body, headers=headers,
                                           timeout=self._timeout(timeout_s, stream=True))
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}",
                                     timed_out=isinstance(exc, TimeoutError)) from exc
        return UpstreamStream(resp.status, resp.content.iter_any(), resp.release)

    async def aclose(self) -> None:
        await self.session.close()


def make_upstream(http_backend: str, max_connections: int) -> HttpxUpstream | AiohttpUpstream:
    """`auto`: aiohttp when installed, else httpx."""
    if http_backend == "auto":
        import importlib.util

        http_backend = "aiohttp" if importlib.util.find_spec("aiohttp") else "httpx"
    if http_backend == "aiohttp":
        return AiohttpUpstream(max_connections)
    return HttpxUpstream(max_connections)
