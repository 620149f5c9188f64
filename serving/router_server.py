"""How the router app is served: `RouterApp`, the FastAPI class `serving.router.create_router_app`
builds (with a direct lane for the chat hot path), and `RouterServer`, which runs such an app
under uvicorn in a background thread on an ephemeral port for tests and demos (`base_url` is its
/v1 URL once started; `serving.router.running_router` wraps it as a context manager).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from serving.api_common import Rejected, validation_error_response
from serving.openai_schema import error_response
from serving.router_config import RouterError

log = logging.getLogger("serving.router")  # the router's one log, as before the split


class RouterApp(FastAPI):
    """FastAPI with a direct lane for the proxy hot path.

    `POST /v1/chat/completions` goes straight to its handler: Starlette's middleware stack,
    route matching and request/response wrappers were about a fifth of the router's CPU per
    request, and the handler needs none of them (it reads headers and validates the body
    itself). Its errors are answered exactly as the full stack would: the 422 handler for
    validation errors, a logged 500 for anything unexpected. Every other route, the lifespan
    and the OpenAPI document go through FastAPI as usual.
    """

    fast_routes: dict[tuple[str, str], Any]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        handler = (self.fast_routes.get((scope["method"], scope["path"]))
                   if scope["type"] == "http" and not scope.get("root_path") else None)
        if handler is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except RequestValidationError as exc:
            response = validation_error_response(request, exc)
        except Rejected as exc:
            response = exc.response
        except Exception:  # noqa: BLE001 - what ServerErrorMiddleware would do, as JSON
            log.exception("router: unhandled error in %s %s", scope["method"], scope["path"])
            response = error_response(500, "internal router error; see the router log",
                                      type_="api_error", code="internal_error")
        await response(scope, receive, send)


class RouterServer:
    """Run an app under uvicorn in a background thread on an ephemeral port (tests, demos)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.base_url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> RouterServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                http="httptools", lifespan="on", backlog=2048,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"router-{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RouterError("the router did not start within 30 s (see the log above)")
            time.sleep(0.01)
        self.base_url = f"http://{self.host}:{port}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=30)
            self._server = None

    def __enter__(self) -> RouterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
