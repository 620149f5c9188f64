"""A fake OpenAI-compatible HTTP server for tests and benchmarks — the only home of canned replies.

Real HTTP on 127.0.0.1 (uvicorn + a bare ASGI app, httptools/uvloop where available) on an
ephemeral port, serving `GET /v1/models` and `POST /v1/chat/completions` (plain JSON or SSE when
`stream=true`, ending with `data: [DONE]`, `usage` included). Latency is injected with
`asyncio.sleep`, and a seeded RNG picks a fault per request with probability `fault_rate`:

- ``429``: rate limited, with a `Retry-After` header (seconds, may be fractional)
- ``500``: internal server error
- ``hang``: sleep `hang_s` before answering normally (a client with a shorter timeout gives up)
- ``malformed``: HTTP 200 with a body that is not valid JSON
- ``truncated``: the reply cut in half with `finish_reason="length"`

The RNG draws in arrival order, so a retried request gets a fresh draw. Every chat request is
logged with its outcome and the `X-Request-Id`/`Idempotency-Key` headers, so tests can check that
no logical request was answered twice. `subprocess=True` runs the server in its own Python process
(benchmarks: client and server must not share a GIL); `stats()`, `log` and `requests` then go
through `GET /_stats`, `GET /_log` and `GET /_requests`.

Run standalone: ``python -m tests.fakes.fake_openai --latency-s 0.2 --fault-rate 0.1``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import random
import socket
import subprocess as _subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FAULT_KINDS = ("429", "500", "hang", "malformed", "truncated")
OUTCOMES = ("ok", *FAULT_KINDS)
REQUEST_ID_HEADERS = ("x-request-id", "idempotency-key")
_ROOT = Path(__file__).resolve().parents[2]

Responder = Callable[[dict], str]


def default_responder(request: dict) -> str:
    """A deterministic reply that mirrors the last user message (the fake's canned answer)."""
    last_user = ""
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user":
            last_user = _content_text(message.get("content"))
            break
    words = last_user.split()
    echoed = " ".join(words[:40]) if words else "nothing"
    return f"Fake reply from {request.get('model', 'fake-model')}: you said {echoed}"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: keep the text parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def count_tokens(text: str) -> int:
    """Words stand in for tokens: good enough for usage accounting tests."""
    return len(text.split())


def resolve_responder(responder: Responder | str | None) -> Responder:
    """A callable, a `module:function` import path, or None (the default responder)."""
    if responder is None:
        return default_responder
    if callable(responder):
        return responder
    module_name, _, attr = responder.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"responder {responder!r} is not an import path; use 'package.module:function'"
        )
    return getattr(importlib.import_module(module_name), attr)


class _FakeApp:
    """The ASGI app: routing, fault injection, the request log and the per-outcome counters."""

    def __init__(
        self,
        *,
        latency_s: float,
        fault_rate: float,
        faults: Sequence[str],
        responder: Responder,
        seed: int,
        hang_s: float,
        retry_after_s: float,
        model_ids: Sequence[str],
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use some of {FAULT_KINDS}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {fault_rate}; e.g. 0.2")
        if fault_rate > 0 and not faults:
            raise ValueError("fault_rate > 0 needs at least one fault kind; e.g. faults=('500',)")
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.responder = responder
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.model_ids = tuple(model_ids)
        self.rng = random.Random(seed)
        self.counter = 0
        self.requests: list[dict] = []
        self.log: list[dict] = []
        self.counts: dict[str, int] = dict.fromkeys((*OUTCOMES, "total"), 0)
        self.in_flight = 0
        self.max_in_flight = 0

    # ---- state --------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {**self.counts, "max_in_flight": self.max_in_flight}

    def reset(self) -> None:
        self.requests.clear()
        self.log.clear()
        for key in self.counts:
            self.counts[key] = 0
        self.max_in_flight = self.in_flight

    def _pick_outcome(self) -> str:
        if self.fault_rate > 0 and self.rng.random() < self.fault_rate:
            return self.rng.choice(self.faults)
        return "ok"

    # ---- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in self.model_ids]
            await _send_json(send, 200, {"object": "list", "data": data})
        elif method == "POST" and path == "/v1/chat/completions":
            body = await _read_body(receive)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._chat(scope, body, send)
            finally:
                self.in_flight -= 1
        elif method == "GET" and path == "/_stats":
            await _send_json(send, 200, self.stats())
        elif method == "GET" and path == "/_log":
            await _send_json(send, 200, self.log)
        elif method == "GET" and path == "/_requests":
            await _send_json(send, 200, self.requests)
        elif method == "POST" and path == "/_reset":
            self.reset()
            await _send_json(send, 200, {"reset": True})
        else:
            await _send_json(send, 404, _error("not_found", f"no route {method} {path}"))

    async def _chat(self, scope: dict, body: bytes, send: Callable) -> None:
        try:
            request = json.loads(body)
            if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
                raise ValueError("body must be an object with a 'messages' list")
        except ValueError as exc:
            await _send_json(send, 400, _error("invalid_request_error", f"bad request: {exc}"))
            return
        model = request.get("model")
        if model not in self.model_ids:
            await _send_json(send, 404, _error(
                "model_not_found", f"The model {model!r} does not exist; try {self.model_ids[0]!r}"
            ))
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        outcome = self._pick_outcome()
        self.counter += 1
        self.counts[outcome] += 1
        self.counts["total"] += 1
        self.requests.append(request)
        self.log.append({
            "seq": self.counter,
            "received_at": time.monotonic(),
            "outcome": outcome,
            "model": model,
            "request_id": next((headers[h] for h in REQUEST_ID_HEADERS if h in headers), None),
            "attempt": headers.get("x-attempt"),
        })

        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if outcome == "429":
            await _send_json(
                send, 429, _error("rate_limit_exceeded", "Rate limit reached (fake)"),
                extra_headers=[(b"retry-after", f"{self.retry_after_s:g}".encode())],
            )
            return
        if outcome == "500":
            await _send_json(send, 500, _error("server_error", "The server had an error (fake)"))
            return
        if outcome == "hang":
            try:
                await asyncio.sleep(self.hang_s)
            except asyncio.CancelledError:
                return  # server shutting down under a hung request: end quietly, no traceback

        content = self.responder(request)
        finish_reason = "stop"
        stops = request.get("stop")
        for stop in [stops] if isinstance(stops, str) else (stops or []):
            if stop and stop in content:
                content = content[: content.index(stop)]
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens")
        words = content.split(" ")
        if max_tokens and count_tokens(content) > int(max_tokens):
            content, finish_reason = " ".join(words[: int(max_tokens)]), "length"
        if outcome == "truncated":
            content, finish_reason = content[: max(1, len(content) // 2)], "length"

        prompt_tokens = sum(count_tokens(_content_text(m.get("content")))
                            for m in request["messages"])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(content),
                 "total_tokens": prompt_tokens + count_tokens(content)}
        completion_id = f"chatcmpl-fake-{self.counter}"
        if request.get("stream"):
            await self._stream(send, request, completion_id, content, finish_reason, usage,
                               malformed=outcome == "malformed")
            return
        if outcome == "malformed":
            await _send_raw(send, 200, b'{"id": "' + completion_id.encode()
                            + b'", "choices": [{"message": {"content": "unterminated',
                            b"application/json")
            return
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }],
            "usage": usage,
        }
        await _send_json(send, 200, payload)

    async def _stream(self, send: Callable, request: dict, completion_id: str, content: str,
                      finish_reason: str, usage: dict, *, malformed: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        base = {"id": completion_id, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request["model"]}

        async def event(data: str) -> None:
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                        "more_body": True})

        await event(json.dumps({**base, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
        if malformed:
            await event('{"choices": [{"delta": {"content": "broken')
        pieces = content.split(" ")
        for i, piece in enumerate(pieces):
            text = piece if i == 0 else " " + piece
            await event(json.dumps({**base, "choices": [
                {"index": 0, "delta": {"content": text}, "finish_reason": None}]}))
        await event(json.dumps({**base, "choices": [
            {"index": 0, "delta": {}, "finish_reason": finish_reason}]}))
        if (request.get("stream_options") or {}).get("include_usage"):
            await event(json.dumps({**base, "choices": [], "usage": usage}))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})


def _error(code: str, message: str) -> dict:
    return {"error": {"message": message, "type": code, "code": code, "param": None}}


async def _read_body(receive: Callable) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_json(send: Callable, status: int, payload: Any,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send_raw(send, status, json.dumps(payload).encode(), b"application/json",
                    extra_headers)


async def _send_raw(send: Callable, status: int, body: bytes, content_type: bytes,
                    extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


def _uvicorn_config(app: _FakeApp, *, fast: bool):
    import uvicorn

    def available(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    return uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        http="httptools" if available("httptools") else "h11",
        loop="uvloop" if fast and available("uvloop") else "asyncio",
        backlog=4096,
        timeout_keep_alive=60,
        timeout_graceful_shutdown=1,
    )


def _bind_ephemeral() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class FakeOpenAIServer:
    """Start with `with FakeOpenAIServer(...) as server:` and point clients at `server.base_url`."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULT_KINDS,
        responder: Responder | str | None = None,
        seed: int = 0,
        hang_s: float = 30.0,
        retry_after_s: float = 0.05,
        subprocess: bool = False,
        model_ids: Sequence[str] = ("fake-model",),
    ) -> None:
        if subprocess and responder is not None and not isinstance(responder, str):
            raise ValueError(
                "a subprocess server cannot receive a Python callable; pass responder as an "
                "import path, e.g. responder='tests.fakes.fake_openai:default_responder'"
            )
        self._options = {
            "latency_s": latency_s, "fault_rate": fault_rate, "faults": list(faults),
            "seed": seed, "hang_s": hang_s, "retry_after_s": retry_after_s,
            "model_ids": list(model_ids),
        }
        self._responder = responder
        self.subprocess = subprocess
        self.base_url = ""
        self._app: _FakeApp | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._process: _subprocess.Popen[str] | None = None
        # Validate eagerly (also for a subprocess) so a bad option fails here, not in the child.
        app = _FakeApp(responder=resolve_responder(responder), **self._options)
        if not subprocess:
            self._app = app

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        if self.base_url:
            return self
        if self.subprocess:
            self._start_subprocess()
        else:
            self._start_thread()
        return self

    def _start_thread(self) -> None:
        import uvicorn

        assert self._app is not None
        sock = _bind_ephemeral()
        port = sock.getsockname()[1]
        self._server = uvicorn.Server(_uvicorn_config(self._app, fast=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"fake-openai-{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start within 10 s")
            time.sleep(0.005)
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def _start_subprocess(self) -> None:
        options = dict(self._options)
        if self._responder is not None:
            options["responder"] = self._responder
        self._process = _subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.fake_openai", "--options-json",
             json.dumps(options)],
            cwd=str(_ROOT), stdout=_subprocess.PIPE, text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # the child prints "PORT <n>" once listening
        if not line.startswith("PORT "):
            self._process.kill()
            raise RuntimeError(f"the fake OpenAI subprocess failed to start (said {line!r})")
        self.base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def stop(self) -> None:
        if self._server is not None:
            # force_exit: do not wait for hung handlers; their tasks are cancelled with the loop.
            self._server.should_exit = True
            self._server.force_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = None
            self._thread = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except _subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        self.base_url = ""

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- inspection ---------------------------------------------------------------------
    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.root_url + path, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, int]:
        """Counts per outcome (ok, 429, 500, hang, malformed, truncated), total, and the
        highest number of chat requests in flight at once (max_in_flight)."""
        if self.subprocess:
            return self._get("/_stats")
        assert self._app is not None
        return self._app.stats()

    @property
    def requests(self) -> list[dict]:
        """Chat request bodies received, in arrival order."""
        if self.subprocess:
            return self._get("/_requests")
        assert self._app is not None
        return self._app.requests

    @property
    def log(self) -> list[dict]:
        """One entry per chat request: seq, received_at (monotonic), outcome, model, request_id
        (X-Request-Id or Idempotency-Key header), attempt (X-Attempt header)."""
        if self.subprocess:
            return self._get("/_log")
        assert self._app is not None
        return self._app.log

    def reset(self) -> None:
        """Forget logged requests and zero the counters (the fault RNG keeps its position)."""
        if self.subprocess:
            req = urllib.request.Request(self.root_url + "/_reset", method="POST", data=b"")
            with urllib.request.urlopen(req, timeout=10):
                return
        assert self._app is not None
        self._app.reset()


def _serve_forever(options: dict) -> None:
    import uvicorn

    responder = resolve_responder(options.pop("responder", None))
    app = _FakeApp(responder=responder, **options)
    sock = _bind_ephemeral()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(_uvicorn_config(app, fast=True)).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options-json", help="all options as one JSON object")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--responder", default=None, help="module:function")
    args = parser.parse_args(argv)
    if args.options_json:
        options = json.loads(args.options_json)
    else:
        options = {"latency_s": args.latency_s, "fault_rate": args.fault_rate,
                   "faults": list(FAULT_KINDS), "seed": args.seed, "hang_s": 30.0,
                   "retry_after_s": 0.05, "model_ids": ["fake-model"]}
        if args.responder:
            options["responder"] = args.responder
    _serve_forever(options)


if __name__ == "__main__":
    main()
