"""Extra HTTP processes (``--workers N``): cached answers served on more cores.

Measured (docs/performance.md): with every answer cached, the one reactor
process is the ceiling, a full core of Python at ~50k req/s while other cores
idle. ``--workers N`` starts N-1 *front* processes next to it, each listening
on the same address with ``SO_REUSEPORT`` (the kernel spreads connections over
the N sockets). A front is only an HTTP server over a bounded hot cache of
signed responses (:mod:`hsmocsp.hotcache`, ``hot_cache_entries`` per handle,
least recently used out first): it answers a plain OCSP GET/POST whose CertID it
holds (the same fast path and the same header bytes as the main process), and
relays every other connection (a miss, a nonce to echo, a CA or CRL download, a
probe, metrics, anything odd) byte for byte to the main process over a private
Unix socket, from the first request it cannot answer to the end of the
connection. So the sources, the HSM, the caches' producers and every decision
stay in one process; fronts hold no secret and never sign. A relayed connection
starts with one line naming the client (``HSMOCSP-CLIENT host port``), for the
access log.

A front holds only what its clients ask for (#11: it used to hold a copy of every
cache, ~2.4 KiB per entry per front). On a miss it could serve from a cache, it
relays the connection *and* asks the main process for that key (``want``, at most
once a second per key); the main process answers with a ``put`` when it holds a
servable answer, now or as soon as one is stored (the relayed request usually
makes it). Invalidations are still sent to every front (a revocation reaches the
fronts in the same reactor turn that the main cache drops the old answer, then one
pipe write later they drop it too), and a renewed responder certificate empties
them. A front never serves an answer past its refresh point: that request is
relayed, so the main process sees the demand and refreshes it, and the front asks
again for the refreshed one.

Frames on both pipes are the child-process layer's (:mod:`hsmocsp.childproc`: a
4-byte big-endian length and a payload):

* main -> front, pickles (the front trusts its parent): ``("init", dict)``,
  ``("put", h, key, serial, SignedResponse)``, ``("inv", h, serials or None)``;
* front -> main, JSON arrays: ``["ready", pid]``, ``["stats", {handle: {method: n}}]``,
  ``["access", [record, ...]]`` (access-log lines, only when the access log is on),
  ``["refused", {kind: n}]`` (requests the front refused: 408, 413, 414),
  ``["want", h, base64 key]``, ``["held", n]`` (responses it holds, when it changed).
  Not pickle: a front parses untrusted requests, and the main process holds the HSM
  session, so it never executes anything a front sends (as with the signing workers);
  a ``want`` is checked (known handle, bounded base64) and costs it dict operations.

Run as ``python -m hsmocsp.web.front_process``, by :mod:`hsmocsp.web.front_pool` only.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.childproc import FrameError as FrameError  # bad frames, bad payloads alike
from hsmocsp.childproc import FrameReader
from hsmocsp.childproc import encode_frame as _frame
from hsmocsp.handle import SignedResponse
from hsmocsp.hotcache import DEFAULT_ENTRIES, RequestCache, max_age_for
from hsmocsp.web.accesslog import RELAY_PREAMBLE
from hsmocsp.web.fastpath import (
    FastChannel,
    OcspRoutes,
    ResponseWriter,
    access_record,
    keep_alive,
)
from hsmocsp.web.limits import ConnectionTable, HttpLimits, connection_cap
from hsmocsp.web.problems import Problems

__all__ = ["FrameDecoder", "FrontSite", "Replica", "encode_frame", "encode_report"]

log = Logger()

MAX_FRAME = 64 << 20

SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)


def encode_frame(message: tuple[Any, ...]) -> bytes:
    """A main -> front frame (pickle)."""
    return _frame(pickle.dumps(message, protocol=5))


def encode_report(message: tuple[Any, ...]) -> bytes:
    """A front -> main frame (JSON)."""
    return _frame(json.dumps(message).encode())


def _json_message(payload: bytes) -> Any:
    message = json.loads(payload)
    return tuple(message) if isinstance(message, list) else message


def decode_report(payload: bytes) -> tuple[Any, ...]:
    """A front -> main frame's payload as a message (FrameError if it is not one)."""
    return _message(payload, _json_message)


def _message(payload: bytes, loads: Callable[[bytes], Any]) -> tuple[Any, ...]:
    try:
        message = loads(payload)
    except ValueError as err:
        raise FrameError(f"unreadable frame: {err}") from err
    if not isinstance(message, tuple) or not message:
        raise FrameError("frame is not a message")
    return message


class FrameDecoder:
    """Splits a byte stream into messages: :func:`encode_frame`'s (``trusted``, the
    front reading its parent) or :func:`encode_report`'s (the main process reading a
    front)."""

    def __init__(self, *, trusted: bool) -> None:
        self._reader = FrameReader(MAX_FRAME)
        self._loads: Callable[[bytes], Any] = pickle.loads if trusted else _json_message

    def feed(self, data: bytes) -> Iterator[tuple[Any, ...]]:
        for payload in self._reader.feed(data):
            yield _message(payload, self._loads)


class Replica:
    """One handle as a front sees it: where it is served, and a bounded hot cache of the
    answers this front's clients asked for (:class:`~hsmocsp.hotcache.RequestCache`)."""

    def __init__(
        self,
        name: str,
        path: str,
        max_age: float | None,
        nonce_policy: str,
        now: Callable[[], float],
        max_entries: int = DEFAULT_ENTRIES,
        index: int = 0,
    ) -> None:
        self.index = index  # the handle's place in the main process's list (for ``want``)
        self.name = name
        self.path = path
        self.max_age = max_age
        self.nonce_policy = nonce_policy
        self.now = now
        self.cache: RequestCache[SignedResponse] = RequestCache(now, nonce_policy, max_entries)

    def __len__(self) -> int:
        return len(self.cache.cache)

    def put(self, key: bytes, serial: int, value: SignedResponse) -> None:
        self.cache.cache.put(key, serial, value)

    def invalidate(self, serials: frozenset[int] | None) -> None:
        self.cache.cache.invalidate(serials)

    def find(self, der: bytes) -> tuple[bytes | None, SignedResponse | None]:
        """``(key, answer)`` for these request bytes: the answer if this process may
        serve it, else None (key None: no cached answer could ever do)."""
        return self.cache.find(der)

    def lookup(self, der: bytes) -> SignedResponse | None:
        """The answer to these request bytes if this process may serve it, else None."""
        return self.cache.find(der)[1]


class Wants:
    """Which misses a front has asked the main process for, so that a key asked many
    times (a popular certificate past its refresh point, a flood of one unknown serial)
    costs one ``want`` per ``again`` seconds, not one per request. Bounded: the oldest
    are forgotten first (then simply asked again)."""

    def __init__(self, now: Callable[[], float], again: float = 1.0,
                 max_entries: int = 10_000) -> None:  # fmt: skip
        self._now = now
        self.again = again
        self.max_entries = max_entries
        self._asked: OrderedDict[tuple[int, bytes], float] = OrderedDict()

    def should_ask(self, index: int, key: bytes) -> bool:
        now = self._now()
        item = (index, key)
        asked = self._asked.get(item)
        if asked is not None and now - asked < self.again:
            return False
        self._asked[item] = now
        self._asked.move_to_end(item)
        while len(self._asked) > self.max_entries:
            self._asked.popitem(last=False)
        return True

    def answered(self, index: int, key: bytes) -> None:
        self._asked.pop((index, key), None)


class Relay(Protocol):
    """The rest of a client connection, relayed byte for byte to the main process.

    Flow-controlled both ways (each transport is the other's producer): a client
    that sends faster than the main process reads is paused, not buffered here;
    before the backend connection is up, at most ``max_pending`` bytes are held.
    """

    def __init__(self, connect: Callable[[Protocol], Deferred[Any]],
                 max_pending: int = 1 << 16, peer: IAddress | None = None) -> None:  # fmt: skip
        self._connect = connect
        self._peer = peer
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._max_pending = max_pending
        self._paused = False
        self._backend: Protocol | None = None
        self._closed = False

    def connectionMade(self) -> None:
        self._connect(_Backend(self)).addErrback(self._unreachable)

    def _unreachable(self, failure: Failure) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(SERVICE_UNAVAILABLE)
            self.transport.loseConnection()

    def backend_up(self, backend: Protocol) -> None:
        if self._closed:
            assert backend.transport is not None
            backend.transport.loseConnection()
            return
        self._backend = backend
        assert backend.transport is not None and self.transport is not None
        backend.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.registerProducer(backend.transport, True)  # type: ignore[attr-defined]
        host = getattr(self._peer, "host", "-") or "-"
        backend.transport.write(RELAY_PREAMBLE % (host.encode("ascii", "replace"),
                                                  getattr(self._peer, "port", 0) or 0))  # fmt: skip
        for data in self._pending:
            backend.transport.write(data)
        self._pending = []
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def backend_down(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._backend is not None and self._backend.transport is not None:
            self._backend.transport.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._max_pending and not self._paused and self.transport:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._closed = True
        if self._backend is not None and self._backend.transport is not None:
            self._backend.transport.loseConnection()


class _Backend(Protocol):
    def __init__(self, client: Relay) -> None:
        self._client = client

    def connectionMade(self) -> None:
        self._client.backend_up(self)

    def dataReceived(self, data: bytes) -> None:
        transport = self._client.transport
        if transport is not None:
            transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._client.backend_down()


class FrontSite(Factory):
    """Connections of one front: replica hits answered, the rest relayed."""

    def __init__(
        self,
        replicas: list[Replica],
        now: Callable[[], float],
        connect: Callable[[Protocol], Deferred[Any]],
        limits: HttpLimits,
        clock: IReactorTime,
        access_log: bool = False,
        on_miss: Callable[[Replica, bytes], None] | None = None,
    ) -> None:
        self.replicas = replicas
        self.on_miss = on_miss  # a request this front could answer if it held the key
        self.limits = limits
        self.clock = clock
        self.table = ConnectionTable(connection_cap(limits.max_connections))
        self.problems = Problems(clock)
        self.writer = ResponseWriter(now)
        self._now = now
        self._connect = connect
        self.routes = OcspRoutes([(r.path, r) for r in replicas], limits.max_request_size)
        self.counts: dict[str, dict[str, int]] = {}
        self.handed_over = 0
        self.access_log = access_log  # records go to the main process with the counts
        self.access: list[list[Any]] = []
        self._refused_sent: dict[str, int] = {}

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return FastChannel(self, addr)

    def full_protocol(self, addr: IAddress | None, on_progress: Callable[[], None]) -> Relay:
        # Deadlines and sizes of a relayed connection are enforced by the main process,
        # which reads it; when it closes its end, the relay closes the client's.
        return Relay(self._connect, max_pending=self.limits.max_request_size + 16384, peer=addr)

    def answer(
        self, method: bytes, target: bytes, version: bytes, headers: dict[bytes, bytes],
        body: bytes, peer: IAddress | None = None,
    ) -> tuple[bytes | Deferred[bytes], bool] | None:  # fmt: skip
        """A cached answer and whether to keep the connection, or None to relay."""
        routed = self.routes.route(method, target, headers, body)
        if routed is None:
            return None
        replica, der = routed
        key, response = replica.find(der)
        if response is None:
            if key is not None and self.on_miss is not None:
                self.on_miss(replica, key)
            return None
        keep = keep_alive(version, headers)
        by_method = self.counts.setdefault(replica.name, {})
        name = method.decode("ascii")
        by_method[name] = by_method.get(name, 0) + 1
        if self.access_log:
            record = access_record(replica.name, name, der, "successful", "hit",
                                   self.clock.seconds(), 0.0, peer)  # fmt: skip
            self.access.append(record.as_list())
        return self.writer.render(
            response, max_age_for(response, self._now(), replica.max_age), version, keep
        ), keep

    def take_access(self) -> list[list[Any]]:
        access, self.access = self.access, []
        return access

    def take_counts(self) -> dict[str, dict[str, int]]:
        counts, self.counts = self.counts, {}
        return counts

    def take_refused(self) -> dict[str, int]:
        """Requests refused here (408, 413, 414) since the last call, by kind: the main
        process counts them in its metric (a front logs warnings only)."""
        totals = dict(self.problems.totals)
        fresh = {k: n - self._refused_sent.get(k, 0) for k, n in totals.items()}
        self._refused_sent = totals
        return {k: n for k, n in fresh.items() if n > 0}


def bind_reuseport(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket that other processes may bind too (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Control(Protocol):
    """The pipe from the main process (stdin) and back (stdout)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._decoder = FrameDecoder(trusted=True)
        self._replicas: list[Replica] = []
        self._wants = Wants(reactor.seconds)
        self._held_sent = -1
        self.site: FrontSite | None = None

    def dataReceived(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            kind = message[0]
            if kind == "put":
                self._replicas[message[1]].put(message[2], message[3], message[4])
                self._wants.answered(message[1], message[2])
            elif kind == "inv":
                self._replicas[message[1]].invalidate(message[2])
            elif kind == "init":
                self._init(message[1])

    def want(self, replica: Replica, key: bytes) -> None:
        """A miss on a request a cached answer could serve: ask the main process for it
        (it answers with a ``put`` when it has a servable answer, now or once signed)."""
        if self._wants.should_ask(replica.index, key):
            self._send(("want", replica.index, base64.b64encode(key).decode("ascii")))

    def _init(self, init: dict[str, Any]) -> None:
        now = self._reactor.seconds
        hot = int(init.get("hot_cache_entries", DEFAULT_ENTRIES))
        self._replicas = [
            Replica(h["name"], h["path"], h["max_age"], h["nonce"], now, hot, index)
            for index, h in enumerate(init["handles"])
        ]
        endpoint = UNIXClientEndpoint(self._reactor, init["backend"])

        def connect(protocol: Protocol) -> Deferred[Any]:
            connected: Deferred[Any] = connectProtocol(endpoint, protocol)
            return connected

        self.site = FrontSite(self._replicas, now, connect, HttpLimits(**init["limits"]),
                              self._reactor, access_log=bool(init.get("access")),
                              on_miss=self.want)  # fmt: skip
        self.site.noisy = False
        try:
            sock = bind_reuseport(init["host"], init["port"])
        except OSError as err:
            log.error("cannot listen on {host}:{port}: {why}", host=init["host"],
                      port=init["port"], why=err.strerror)  # fmt: skip
            self._reactor.stop()
            return
        self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.site)
        sock.close()  # the reactor holds its own duplicate
        self._send(("ready", os.getpid()))
        from twisted.internet.task import LoopingCall

        reports = LoopingCall(self._report)
        reports.clock = self._reactor
        reports.start(1.0, now=False)

    def held(self) -> int:
        """Responses this front holds now (every handle's hot cache)."""
        return sum(len(replica) for replica in self._replicas)

    def _report(self) -> None:
        if self.site is not None:
            counts = self.site.take_counts()
            if counts:
                self._send(("stats", counts))
            access = self.site.take_access()
            if access:
                self._send(("access", access))
            refused = self.site.take_refused()
            if refused:
                self._send(("refused", refused))
            held = self.held()
            if held != self._held_sent:
                self._held_sent = held
                self._send(("held", held))

    def _send(self, message: tuple[Any, ...]) -> None:
        assert self.transport is not None
        self.transport.write(encode_report(message))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        # The main process closed the pipe (stopping, or gone): so do we.
        if self._reactor.running:
            self._reactor.stop()


def main() -> int:
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # so is a reload
    # Our stderr is read by the main process, which logs each line under this front's name.
    # Warnings and errors only: the main process logs what it should know.
    errors_only = FilteringLogObserver(
        textFileLogObserver(sys.stderr, timeFormat=""),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
    )
    globalLogBeginner.beginLoggingTo([errors_only], redirectStandardIO=False)
    control = _Control(reactor)
    StandardIO(control)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
