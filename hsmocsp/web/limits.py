"""What one HTTP connection may cost: deadlines, sizes, and how many may be open at once.

Seen (#9.3): with the systemd default of 1,024 descriptors, ~1,000 connections each
sending one byte every 5 s locked every new client out, because each byte reset the
idle timer and nothing bounded a request head. So here:

* a request must arrive whole (head and body) within ``request_timeout`` of its
  first byte; further bytes do not extend it;
* a connection with no request under way is closed after ``idle_timeout``;
* at most ``max_connections`` are open per process, always below the descriptor
  limit: a new connection beyond the cap closes the idlest one first (the one
  that has gone longest without completing a request), so a flood of slow
  clients can delay a new client by one accept, not lock it out;
* bodies over ``max_request_size`` and request targets over ``max_url_length``
  are refused (413, 414) before they are read.

Used by the fast path (:mod:`hsmocsp.web.fastpath`), the twisted.web channel behind
it (:mod:`hsmocsp.web.channel`) and the fronts (:mod:`hsmocsp.web.front_process`).
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

#: Descriptors kept free for everything that is not a client connection: the
#: listening sockets, signing-worker and front pipes, the store, logs, Vault.
MIN_RESERVED_FDS = 64


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection limits (config keys of the same names, documented in etc/hsmocsp.yaml)."""

    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 0  # 0: derived from RLIMIT_NOFILE (see connection_cap)
    max_request_size: int = 10_000
    max_url_length: int = 8192


def connection_cap(configured: int, nofile: int | None = None) -> int:
    """How many client connections this process may hold open.

    Below the descriptor limit ``nofile`` (default: this process's soft
    RLIMIT_NOFILE) by an eighth, and at least :data:`MIN_RESERVED_FDS`: with systemd's
    default of 1,024 that is 896, with ``LimitNOFILE=65536`` 57,344. A configured
    value (``max_connections``) is used when it is lower.
    """
    if nofile is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
    reserve = max(MIN_RESERVED_FDS, nofile // 8)
    auto = max(16, nofile - reserve)
    return auto if configured <= 0 else min(configured, auto)


class Evictable(Protocol):
    """A connection the table can close to make room."""

    def busy(self) -> bool:
        """True while a response is being produced (signing): such a connection is
        closed only if nothing else can be."""

    def evict(self) -> None: ...


class ConnectionTable:
    """The open connections of one process, idlest first.

    "Idlest" is the connection that has gone longest without completing a request
    (or since it was accepted): a slow client that never finishes one drifts to
    the front, a keep-alive client that keeps asking stays at the back.
    """

    #: Connections looked at, from the idlest, for one that is not busy.
    SCAN = 64

    def __init__(self, cap: int, on_evict: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self._open: dict[Evictable, None] = {}  # insertion order = idleness order
        self.evicted = 0
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, conn: Evictable) -> None:
        self._open[conn] = None
        while len(self._open) > self.cap:
            victim = self._idlest(conn)
            if victim is None:
                return
            del self._open[victim]
            self.evicted += 1
            if self._on_evict is not None:
                self._on_evict()
            victim.evict()

    def _idlest(self, newcomer: Evictable) -> Evictable | None:
        first = None
        for n, conn in enumerate(self._open):
            if n >= self.SCAN:
                break
            if conn is newcomer:
                continue
            if first is None:
                first = conn
            if not conn.busy():
                return conn
        return first

    def progressed(self, conn: Evictable) -> None:
        """``conn`` completed a request: it becomes the least idle."""
        if conn in self._open:
            del self._open[conn]
            self._open[conn] = None

    def closed(self, conn: Evictable) -> None:
        self._open.pop(conn, None)
