"""A TCP proxy that can cut the line: tests put it in front of PostgreSQL to stage an outage.

`TcpProxy(upstream_host, upstream_port)` listens on an ephemeral 127.0.0.1 port and forwards
every connection byte for byte (one thread per direction). `down()` stages an outage: live
connections are reset and new ones are accepted and reset at once (what a client sees while the
server restarts); `down(hang=True)` instead accepts new connections and never answers them (a
dead network path: only the client's connect timeout ends the wait). `up()` forwards again.
`url_for(database_url)` rewrites a database URL to go through the proxy.

    with TcpProxy.in_front_of(url) as proxy:
        engine = create_engine(proxy.url_for(url))
        proxy.down(); ...; proxy.up()
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Any

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


def _reset(sock: socket.socket) -> None:
    """Abort a connection no thread is reading."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.close()


def _cut(sock: socket.socket) -> None:
    """Abort a connection a pump thread is reading: shutdown wakes its recv (close would not),
    and the pump closes it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class TcpProxy:
    """Forward 127.0.0.1:<port> to an upstream address; switch it down and up at will."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # the accept loop notices close() within 0.2 s
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._held: list[socket.socket] = []  # accepted while hanging, never answered
        self._mode = "up"
        self._closed = False
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    # -- control --
    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    @property
    def is_up(self) -> bool:
        return self._mode == "up"

    def down(self, *, hang: bool = False) -> None:
        """Reset every live connection; refuse new ones (reset), or with `hang` hold them open
        unanswered."""
        with self._lock:
            self._mode = "hang" if hang else "reset"
            live, self._live = self._live, set()
        for sock in live:
            _cut(sock)

    def up(self) -> None:
        """Forward again; connections held by a hang are reset (their clients gave up)."""
        with self._lock:
            self._mode = "up"
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)

    def close(self) -> None:
        self._closed = True
        self.down()
        self.up()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        if not self._thread.is_alive():
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def in_front_of(cls, database_url: str) -> TcpProxy:
        """A started proxy to the host and port of `database_url` (TCP URLs only: a unix
        socket URL, as pgserver's, raises ValueError)."""
        from sqlalchemy.engine import make_url

        url = make_url(database_url)
        if not url.host or url.query.get("host"):
            raise ValueError(f"{url.render_as_string()} does not reach PostgreSQL over TCP")
        return cls(url.host, url.port or 5432).start()

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        from sqlalchemy.engine import make_url

        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    # -- forwarding --
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                mode = self._mode
                if mode == "hang":
                    self._held.append(client)
            if mode == "hang":
                continue
            if mode == "reset":
                self.refused += 1
                _reset(client)
                continue
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
            server.settimeout(None)
        except OSError:
            _reset(client)
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._mode != "up":  # cut while connecting upstream
                _reset(client)
                _reset(server)
                return
            self._live.update((client, server))
            self.accepted += 1
        for source, target in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True,
                             name="tcp-proxy-pump").start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                target.sendall(chunk)
        except OSError:
            pass
        # One side ended: end both (a reset from down() lands here too).
        with self._lock:
            self._live.discard(source)
            self._live.discard(target)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
