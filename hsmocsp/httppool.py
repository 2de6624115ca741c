"""The persistent HTTP connection pool of our outbound clients (Vault, the signer).

Why a module of its own: two things Twisted's ``HTTPConnectionPool`` does not offer,
which every client of ours needs.

* Quiet: the pool builds each connection's protocol from a factory whose ``noisy``
  is true, so every new connection to Vault or to the signer logs "Starting
  factory" and "Stopping factory": hundreds of lines an hour on a busy server,
  burying the ones an operator needs.
* Closable: ``closeCachedConnections`` closes the idle connections only. A source
  or link that stops must also close the ones carrying a request and know when
  each is really gone, or a stopped component leaves a connection and its timers
  on the reactor (the test suite's conftest reports them).

Twisted has no public hook for either; the pool's ``_factory`` attribute and
``HTTP11ClientProtocol`` (private names) are the way in. They are used here and
only here, and ``tests/unit/test_httppool.py`` fails if a Twisted upgrade renames
them, rather than the log silently filling up again.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

__all__ = ["QuietPool"]


class _TrackedClientProtocol(HTTP11ClientProtocol):
    """A connection that is in ``live`` from connectionMade to connectionLost."""

    def __init__(self, quiescent: Any, live: set[HTTP11ClientProtocol]) -> None:
        super().__init__(quiescent)  # type: ignore[no-untyped-call]
        self._live = live

    def connectionMade(self) -> None:
        self._live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:  # type: ignore[override]
        self._live.discard(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _QuietClientFactory(_HTTP11ClientFactory):
    """No log line per connection; connections tracked in ``live``."""

    noisy = False

    def __init__(self, quiescent: Any, metadata: Any, live: set[HTTP11ClientProtocol]) -> None:
        super().__init__(quiescent, metadata)  # type: ignore[no-untyped-call]
        self._live = live

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _TrackedClientProtocol(self._quiescentCallback, self._live)


class QuietPool(HTTPConnectionPool):
    """A persistent pool keeping up to ``max_per_host`` idle connections per host (for
    ``cached_timeout`` seconds when given, else Twisted's 240 s), logging no line per
    connection, that :meth:`close` closes entirely."""

    def __init__(
        self, reactor: Any, *, max_per_host: int, cached_timeout: int | None = None
    ) -> None:
        super().__init__(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.maxPersistentPerHost = max_per_host
        if cached_timeout is not None:
            self.cachedConnectionTimeout = cached_timeout
        self.live: set[HTTP11ClientProtocol] = set()
        self._factory = partial(_QuietClientFactory, live=self.live)  # type: ignore[assignment]

    def close(self) -> Deferred[None]:
        """Close the idle connections and abort the busy ones (their requests fail);
        fires once every connection is really closed."""
        closing: list[Deferred[None]] = [
            self.closeCachedConnections(),  # type: ignore[no-untyped-call]
            *(conn.abort() for conn in list(self.live)),  # type: ignore[no-untyped-call]
        ]
        return gatherResults(closing).addCallback(lambda _: None)
