"""Fixtures the serving tests share: a TCP proxy in front of the test database (switched down
and up to make an outage) and an engine that goes through it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tasks.core.db.engine import engine_for
from tests.fakes.tcp_proxy import TcpProxy


@pytest.fixture()
def proxy(database_url: str) -> Iterator[TcpProxy]:
    try:
        proxy = TcpProxy.in_front_of(database_url)
    except ValueError as exc:  # a unix-socket URL (embedded PostgreSQL): nothing to proxy
        pytest.skip(str(exc))
    with proxy:
        yield proxy


@pytest.fixture()
def proxied_engine(proxy: TcpProxy, database_url: str):
    engine = engine_for(proxy.url_for(database_url))
    yield engine
    engine.dispose()
