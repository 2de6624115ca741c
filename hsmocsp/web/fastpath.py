"""The OCSP fast path: answer OCSP POST/GET requests without twisted.web's machinery.

Measured (docs/performance.md): with every answer cached, ~90 % of the reactor's
time went to twisted.web's request machinery and Klein's routing, not to OCSP.
An OCSP request needs none of it: the bytes of the request are the cache key,
the response bytes are ready, only a few headers change.

:class:`FastChannel` reads the request head and body itself. A plain POST or GET
for a handle is answered here: a cached answer at once from prepared header
bytes; anything else (a miss, a nonce, a malformed request) through
:meth:`OCSPApp.outcome`, the same decision the Klein route makes, written when
it is ready and in request order. Everything that is not a plain OCSP request
(another path, HEAD, odd or duplicate headers, chunked bodies, If-None-Match,
oversized bodies) is handed, with every byte read so far, to a normal
twisted.web ``HTTPChannel`` that then owns the connection for good; so the full
path stays the one place with all of HTTP's corner cases.

Every connection, fast or handed over, is held to :class:`~hsmocsp.web.limits.HttpLimits`:
a whole request within ``request_timeout`` of its first byte (408), no request
within ``idle_timeout`` closes it, a declared body over ``max_request_size`` gets
413 and a target over ``max_url_length`` 414 before anything more is read, and
the site's :class:`~hsmocsp.web.limits.ConnectionTable` closes the idlest
connection when a new one would pass the cap (#9.3, #9.5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any, Generic, TypeVar
from typing import Protocol as TypingProtocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.server import Site

from hsmocsp.errors import HsmOcspError, MalformedRequest
from hsmocsp.handle import SignedResponse
from hsmocsp.hotcache import max_age_for
from hsmocsp.ocsp.request import decode_get_path, parse_request
from hsmocsp.ocsp.response import ResponseStatus
from hsmocsp.web.accesslog import MAX_PREAMBLE, AccessRecord, client_text
from hsmocsp.web.app import OCSPApp, Outcome
from hsmocsp.web.channel import REFUSALS, LimitedHTTPChannel, LimitedRequest, plain_response
from hsmocsp.web.endpoint import OcspEndpoint
from hsmocsp.web.headers import cache_control, content_headers, header_lines, http_date, validators
from hsmocsp.web.limits import ConnectionTable, HttpLimits, connection_cap
from hsmocsp.web.problems import Problems

#: A request head larger than this is not an OCSP request we answer fast.
MAX_HEAD = 8192
#: Bytes a client may send ahead while a response is being signed.
MAX_PIPELINED = 65536

log = Logger()

T = TypeVar("T")


class FastSite(Site):
    """A ``Site`` whose connections try the cached fast path first."""

    protocol = LimitedHTTPChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest

    def __init__(
        self,
        app: OCSPApp,
        now: Callable[[], float],
        *,
        limits: HttpLimits | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.limits = limits or HttpLimits(max_request_size=app.max_request_size)
        # The idle timer of handed-over connections is twisted.web's own (timeout=).
        super().__init__(app.resource(), timeout=self.limits.idle_timeout, reactor=clock,
                         parsePOSTFormSubmission=False)  # fmt: skip
        self.app = app
        self.problems: Problems = app.problems
        self.clock: IReactorTime = self.reactor
        self.table = ConnectionTable(
            connection_cap(self.limits.max_connections), app.metrics.connection_evicted
        )
        app.metrics.watch_connections(self.table.__len__)
        self._now = now
        self.routes = OcspRoutes([(h.path, h) for h in app.handles], self.limits.max_request_size)
        self.max_request_size = self.limits.max_request_size
        self.writer = ResponseWriter(now)
        self.fast_answers = 0
        self.full_answers = 0
        self.handed_over = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        return FastChannel(self, addr)

    def relayed(self) -> Factory:
        """The factory for the private socket fronts relay connections to: the same
        site, but each connection first names the client (``RELAY_PREAMBLE``)."""
        return _RelayedFactory(self)

    def full_protocol(self, addr: IAddress | None, on_progress: Callable[[], None]) -> Any:
        """The twisted.web protocol (with our limits), for everything the fast path declines."""
        channel = Site.buildProtocol(self, addr)
        channel.on_progress = on_progress
        channel.client_address = addr  # the relayed client's, not the private socket's
        return channel

    def answer(
        self, method: bytes, target: bytes, version: bytes, headers: dict[bytes, bytes],
        body: bytes, peer: IAddress | None = None,
    ) -> tuple[bytes | Deferred[bytes], bool] | None:  # fmt: skip
        """The whole HTTP response (now or later) and whether to keep the connection,
        or None to decline (twisted.web then takes the connection)."""
        started = perf_counter()
        routed = self.routes.route(method, target, headers, body)
        if routed is None:
            return None
        handle, der = routed
        keep = keep_alive(version, headers)
        name = method.decode("ascii")
        response = handle.cached_response(der)
        if response is not None and response.cacheable:
            self.app.metrics.response(handle.name, "successful", name)
            self.app.metrics.latency(handle.name, "cached", perf_counter() - started)
            self.fast_answers += 1
            if self.app.access.enabled:
                self.app.access.write(access_record(handle.name, name, der, "successful", "hit",
                                                    self.clock.seconds(), 0.0, peer))  # fmt: skip
            return self.writer.render(
                response, max_age_for(response, handle.now(), handle.max_age), version, keep
            ), keep
        # Not cached (a miss, a nonce, an error): the app decides, we write it.
        self.full_answers += 1
        outcome = self.app.outcome(handle, der)
        if isinstance(outcome, Deferred):
            rendered = outcome.addCallback(
                self._render_outcome, handle, name, version, keep, started, True, der, peer
            )
            return rendered, keep
        return self._render_outcome(outcome, handle, name, version, keep, started, False, der,
                                    peer), keep  # fmt: skip

    def _render_outcome(
        self, outcome: Outcome, handle: OcspEndpoint, method: str, version: bytes, keep: bool,
        started: float, waited: bool, der: bytes = b"", peer: IAddress | None = None,
    ) -> bytes:  # fmt: skip
        self.app.observe(handle, outcome, started, waited)
        if self.app.access.enabled:
            failed = isinstance(outcome, ResponseStatus)
            status = outcome.name if isinstance(outcome, ResponseStatus) else "successful"
            source = "-" if failed else ("signed" if waited else "hit")
            self.app.access.write(access_record(
                handle.name, method, der, status, source, self.clock.seconds(),
                (perf_counter() - started) * 1000, peer,
            ))  # fmt: skip
        code, headers, body = self.app.render(handle, outcome, method)
        return b"".join((
            b"%s %d %s\r\n" % (version, code, RESPONSES.get(code, b"OK")),
            header_lines(headers),
            b"Date: ", self.writer.http_now(), b"\r\n",
            _connection_header(version, keep), b"\r\n", body,
        ))  # fmt: skip


class OcspRoutes(Generic[T]):
    """Which handle a plain OCSP POST or GET is for, and the request's DER.

    Shared by the fast path and the fronts (:mod:`hsmocsp.web.front_process`), so both take
    exactly the same requests; everything else is declined (None).
    """

    def __init__(self, paths: Iterable[tuple[str, T]], max_request_size: int) -> None:
        self._post: dict[bytes, T] = {}
        self._get: list[tuple[bytes, T]] = []
        for path, target in paths:
            prefix = path.rstrip("/").encode("ascii")
            self._post[prefix or b"/"] = target
            self._get.append((prefix + b"/", target))
        self._get.sort(key=lambda item: -len(item[0]))
        self._max = max_request_size

    def route(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> tuple[T, bytes] | None:
        path = target.split(b"?", 1)[0]
        if b"if-none-match" in headers:
            return None
        if method == b"POST":
            found = self._post.get(path)
            if found is None:
                return None
            ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if ctype != b"application/ocsp-request" or len(body) > self._max:
                return None
            return found, body
        if method != b"GET" or len(path) > 2 * self._max:
            return None
        for prefix, candidate in self._get:
            if path.startswith(prefix):
                try:
                    return candidate, decode_get_path(path[len(prefix) - 1 :].decode("latin-1"))
                except MalformedRequest:
                    return None
        return None


def keep_alive(version: bytes, headers: dict[bytes, bytes]) -> bool:
    """Whether the client wants the connection kept after this response."""
    connection = headers.get(b"connection", b"").lower()
    if version == b"HTTP/1.1":
        return connection != b"close"
    return connection == b"keep-alive"


class ResponseWriter:
    """HTTP responses for cached OCSP answers, with per-response headers prepared once.

    Shared by the fast path and the extra HTTP processes (:mod:`hsmocsp.web.front_process`),
    so both send byte-identical headers.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._static: dict[str, bytes] = {}
        self._date_second = -1
        self._date = b""

    def http_now(self) -> bytes:
        now = self._now()
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = http_date(now)
        return self._date

    def render(self, response: SignedResponse, max_age: int, version: bytes, keep: bool) -> bytes:
        static = self._static.get(response.etag)
        if static is None:
            if len(self._static) > 100_000:
                self._static.clear()
            static = self._static[response.etag] = header_lines(
                validators(response) + content_headers(len(response.der))
            )
        date = self.http_now()
        connection = _connection_header(version, keep)
        return b"".join((
            version, b" 200 OK\r\n", static,
            b"Cache-Control: ", cache_control(max_age), b"\r\n",
            b"Date: ", date, b"\r\n", connection, b"\r\n", response.der,
        ))  # fmt: skip


def _connection_header(version: bytes, keep: bool) -> bytes:
    if version == b"HTTP/1.1":
        return b"" if keep else b"Connection: close\r\n"
    return b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n"


class FastServer(TypingProtocol):
    """What :class:`FastChannel` needs from its factory."""

    limits: HttpLimits
    table: ConnectionTable
    problems: Problems
    clock: IReactorTime
    handed_over: int

    def answer(
        self, method: bytes, target: bytes, version: bytes, headers: dict[bytes, bytes],
        body: bytes, peer: IAddress | None = None,
    ) -> tuple[bytes | Deferred[bytes], bool] | None: ...  # fmt: skip

    def full_protocol(self, addr: IAddress | None, on_progress: Callable[[], None]) -> Any: ...


class FastChannel(Protocol):
    """One connection: cached answers inline, everything else to a full protocol
    (twisted.web here; a relay to the main process in :mod:`hsmocsp.web.front_process`).

    Timers: ``idle_timeout`` while no request is under way, ``request_timeout`` from
    a request's first byte until it is whole (never extended by more bytes), none
    while a response is being produced (the signer has its own timeout). After a
    hand-over the full protocol keeps its own (twisted.web: the same limits).
    """

    def __init__(self, site: FastServer, addr: IAddress | None, relayed: bool = False) -> None:
        self.site = site
        self.addr = addr
        self._relayed = relayed  # from a front: the first line names the client
        self._buf = b""
        self._delegate: Any = None
        self._closing = False
        self._waiting = False
        self._paused = False
        self._lost = False
        self._timer: IDelayedCall | None = None
        self._kind: str | None = None
        self._deadline_at = 0.0
        self._in_request = False

    def connectionMade(self) -> None:
        self.site.table.opened(self)
        if not self._lost:
            self._expect("idle")

    # --- timers and the connection table --------------------------------------------

    def _expect(self, kind: str | None) -> None:
        """Set what the connection waits for: ``"idle"`` (no request under way),
        ``"request"`` (a request has begun) or None (a response is being produced).

        Only a deadline is stored: one timer per connection ticks at most every
        min(request_timeout, idle_timeout) and compares, so a request costs two float
        stores, not a DelayedCall (which doubled the cost of a cached answer).
        """
        self._kind = kind
        if kind is None:
            return
        limits = self.site.limits
        clock = self.site.clock
        wait = limits.idle_timeout if kind == "idle" else limits.request_timeout
        self._deadline_at = clock.seconds() + wait
        if self._timer is None:
            step = min(limits.request_timeout, limits.idle_timeout)
            self._timer = clock.callLater(step, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._kind is None or self._lost or self._closing:
            return
        clock = self.site.clock
        remaining = self._deadline_at - clock.seconds()
        if remaining > 0:
            limits = self.site.limits
            step = min(remaining, limits.request_timeout, limits.idle_timeout)
            self._timer = clock.callLater(step, self._tick)
        elif self._kind == "idle":
            self._close()
        else:
            self._refuse(408, "request not complete within request_timeout")

    def _stop_timer(self) -> None:
        self._kind = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _progressed(self) -> None:
        self.site.table.progressed(self)

    def busy(self) -> bool:
        return self._waiting

    def evict(self) -> None:
        """The table needs room: this connection is the idlest."""
        self._stop_timer()
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.loseConnection()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _refuse(self, code: int, why: str) -> None:
        """Answer ``code`` with ``Connection: close``; read nothing more."""
        self._stop_timer()
        self.site.problems.report(str(code), why, self.addr)
        if self.transport is not None and not self._closing:
            self.transport.write(plain_response(code, REFUSALS.get(code, b"")))
        self._close()

    # --- reading ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        if self._closing:
            return
        self._buf += data
        if self._relayed and not self._read_preamble():
            return
        if self._waiting:
            if len(self._buf) > MAX_PIPELINED and self.transport is not None and not self._paused:
                self._paused = True  # a client pipelining far ahead waits for us
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            return
        limits = self.site.limits
        while self._buf:
            if not self._in_request:
                self._in_request = True
                self._expect("request")
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if b"\r\n" not in self._buf and len(self._buf) > limits.max_url_length + 64:
                    self._refuse(414, f"request line over {limits.max_url_length + 64} bytes")
                elif len(self._buf) > MAX_HEAD:
                    self._hand_over()
                return
            parsed = _parse_head(self._buf[:end])
            if parsed is None:
                self._hand_over()
                return
            method, target, version, headers = parsed
            if len(target) > limits.max_url_length:
                self._refuse(414, f"request target of {len(target)} bytes")
                return
            length = int(headers.get(b"content-length", b"0"))
            if length > limits.max_request_size:
                self._refuse(413, f"declared body of {length} bytes")
                return
            total = end + 4 + length
            if len(self._buf) < total:
                return
            result = self.site.answer(method, target, version, headers, self._buf[end + 4 : total],
                                      self.addr)  # fmt: skip
            if result is None:
                self._hand_over()
                return
            response, keep = result
            self._buf = self._buf[total:]
            self._in_request = False
            if isinstance(response, Deferred):
                # Answer in order: read nothing more until this response is written.
                self._waiting = True
                self._expect(None)
                response.addCallback(self._deliver, keep).addErrback(self._broken)
                return
            if not self._write(response, keep):
                return
        self._expect("idle")

    def _read_preamble(self) -> bool:
        """``HSMOCSP-CLIENT host port`` from a front; True once read (False: wait/closed)."""
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_PREAMBLE:
                self._close()
            return False
        parts = self._buf[:end].split(b" ")
        self._buf = self._buf[end + 2 :]
        self._relayed = False
        try:
            if len(parts) != 3 or parts[0] != b"HSMOCSP-CLIENT":
                raise ValueError("no preamble")
            host, port = parts[1].decode("ascii"), int(parts[2])
        except (ValueError, UnicodeError):
            self._close()
            return False
        kind = IPv6Address if ":" in host else IPv4Address
        self.addr = kind("TCP", host, port)
        return True

    def _write(self, response: bytes, keep: bool) -> bool:
        """Write one response; False when the connection is closing."""
        assert self.transport is not None
        self.transport.write(response)
        self._progressed()
        if not keep:
            self._stop_timer()
            self._close()
            return False
        return True

    def _deliver(self, response: bytes, keep: bool) -> None:
        self._waiting = False
        if self._lost:
            return
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if self._write(response, keep):
            self._expect("idle")
            if self._buf:
                self.dataReceived(b"")

    def _broken(self, failure: Failure) -> None:
        log.failure("fast path: cannot write a response", failure)
        if not self._lost and self.transport is not None:
            self.transport.loseConnection()

    def _hand_over(self) -> None:
        self.site.handed_over += 1
        self._stop_timer()
        delegate = self.site.full_protocol(self.addr, self._progressed)
        self._delegate = delegate
        delegate.makeConnection(self.transport)
        buf, self._buf = self._buf, b""
        delegate.dataReceived(buf)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        self._stop_timer()
        self.site.table.closed(self)
        if self._delegate is not None:
            self._delegate.connectionLost(reason)


class _RelayedFactory(Factory):
    """:meth:`FastSite.relayed`: the site's channels, expecting the relay preamble."""

    def __init__(self, site: FastSite) -> None:
        self.site = site
        self.noisy = False

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return FastChannel(self.site, addr, relayed=True)


def access_record(
    handle: str, method: str, der: bytes, status: str, source: str, now: float, ms: float,
    peer: IAddress | None,
) -> AccessRecord:  # fmt: skip
    """An access-log record; the serials are read from the request again (a few µs, and
    only while the access log is on)."""
    try:
        serials = tuple(cid.serial for cid in parse_request(der).cert_ids) if der else ()
    except HsmOcspError:
        serials = ()
    return AccessRecord(now, client_text(peer), handle, method, serials, status, source, ms)


def _parse_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, bytes]] | None:
    """Request line and headers, or None for anything we would rather not judge."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        key = name.lower()
        if key in headers:
            return None  # duplicates (e.g. two Content-Length): let twisted.web decide
        headers[key] = value.strip()
    if b"transfer-encoding" in headers or b"expect" in headers:
        return None
    length = headers.get(b"content-length")
    if length is not None and not length.isdigit():
        return None
    return parts[0], parts[1], parts[2], headers
