"""The one place that uses Twisted's private pool hooks (hsmocsp/httppool.py)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from hsmocsp.httppool import QuietPool


def test_the_private_hooks_still_exist_in_twisted() -> None:
    """If Twisted renames them, this fails instead of every Vault or signer
    connection logging two lines again."""
    assert HTTPConnectionPool._factory is _HTTP11ClientFactory  # type: ignore[attr-defined]
    assert _HTTP11ClientFactory.noisy is True
    built = _HTTP11ClientFactory(lambda _: None, None).buildProtocol(None)  # type: ignore[no-untyped-call]
    assert isinstance(built, HTTP11ClientProtocol)


def test_a_quiet_pool_logs_no_line_per_connection() -> None:
    pool = QuietPool(Clock(), max_per_host=3, cached_timeout=60)
    assert pool.persistent is True
    assert pool.maxPersistentPerHost == 3
    assert pool.cachedConnectionTimeout == 60
    factory = pool._factory(lambda _: None, None)  # type: ignore[attr-defined]
    assert factory.noisy is False
    assert QuietPool(Clock(), max_per_host=1).cachedConnectionTimeout == (
        HTTPConnectionPool.cachedConnectionTimeout
    )


class _Silent(Protocol):
    """A server that reads a request and never answers: the connection stays busy."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.got.callback(None)  # type: ignore[attr-defined]
        self.factory.got = Deferred()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_close_ends_a_connection_carrying_a_request() -> None:
    """closeCachedConnections alone leaves a busy connection open (and its request
    waiting); close() aborts it and fires once it is gone."""
    server = Factory.forProtocol(_Silent)
    server.got = Deferred()  # type: ignore[attr-defined]
    got = server.got  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    pool = QuietPool(reactor, max_per_host=1)
    try:
        agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
        url = f"http://127.0.0.1:{port.getHost().port}/".encode()
        request = agent.request(b"GET", url)
        request.addErrback(lambda failure: failure.value)  # the outcome, checked below
        await got
        assert len(pool.live) == 1
        await pool.close()
        assert pool.live == set()
        outcome = await request
        assert isinstance(outcome, Exception), "the request got an answer"
    finally:
        await port.stopListening()
