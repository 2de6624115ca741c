"""twisted.web's HTTP channel with the limits of :mod:`hsmocsp.web.limits`.

The fast path hands every request it does not answer itself (probes, CA/CRL
downloads, metrics, chunked bodies, odd headers) to twisted.web, which by itself
resets its idle timer on every byte, has no deadline for a request, streams a
body of any declared length into a temporary file before the resource sees it
(a 1.5 GB POST reached /tmp, #9.5), answers an over-long request line with a bare
400 and lets Klein log a traceback for a path that is not UTF-8 (#9.10). Here:

* ``request_timeout`` from a request's first byte to its last (408, then close);
* a declared Content-Length over ``max_request_size`` is answered 413 before a
  byte of the body is read; a chunked body is cut off (413) the moment it passes
  the limit; a body is only ever held in memory, and never beyond the limit;
* a request target over ``max_url_length`` is answered 414, a header line over
  the line limit 431;
* a path that is not UTF-8 is answered by :meth:`OCSPApp.undecodable_path`
  (malformedRequest under a handle's path, else 400), never by Klein.

Each refusal is reported to :class:`~hsmocsp.web.problems.Problems` (a count,
rate-limited log lines), never as a traceback. Only public twisted.web hooks are
overridden (``allHeadersReceived``, ``allContentReceived``, ``requestDone``,
``lineReceived``, ``lineLengthExceeded``, ``Request.gotLength``,
``handleContentChunk``, ``process``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request

from hsmocsp.web.limits import HttpLimits


def plain_response(code: int, body: bytes = b"", extra: bytes = b"") -> bytes:
    """A complete ``Connection: close`` response for a refused request."""
    reason = RESPONSES.get(code, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Cache-Control: max-age=0, no-cache, no-store\r\nConnection: close\r\n%s\r\n%s"
        % (code, reason, len(body), extra, body)
    )


#: Why each refusal happened, for the log and the reply body.
REFUSALS = {
    400: b"bad request\n",
    408: b"request not received in time\n",
    413: b"request too large\n",
    414: b"request URL too long\n",
    431: b"request header line too long\n",
}


class LimitedHTTPChannel(HTTPChannel):
    """An ``HTTPChannel`` with a whole-request deadline and size limits.

    ``site`` (set by ``Site.buildProtocol``) provides ``limits`` (an
    :class:`HttpLimits`), ``problems`` and ``app``. ``on_progress``, when set by
    the fast path that handed this connection over, is called after each complete
    response, so the connection table sees the connection as active.
    """

    site: Any
    on_progress: Callable[[], None] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._deadline: IDelayedCall | None = None
        self._in_request = False  # a request's first byte arrived, its last not yet
        self._handling = False  # a whole request arrived and is being answered
        self._at_request_line = True
        self._refused = False

    @property
    def limits(self) -> HttpLimits:
        limits: HttpLimits = self.site.limits
        return limits

    def connectionMade(self) -> None:
        # The longest line we accept: a request line with a maximal target (the target
        # check itself is in lineReceived, so a long one gets 414, not a bare close).
        self.MAX_LENGTH = max(16384, self.limits.max_url_length + 64)
        super().connectionMade()

    # --- the whole-request deadline ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if data and not self._in_request and not self._handling:
            self._start_request()
        super().dataReceived(data)

    def _start_request(self) -> None:
        self._in_request = True
        self._cancel_deadline()
        self._deadline = self.callLater(self.limits.request_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return  # twisted.web already closed it (its own 400)
        if self._in_request and not self._handling:
            self.refuse(408, "request not complete within request_timeout")

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        self._in_request = False
        self._handling = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._handling = False
        self._at_request_line = True
        if self.on_progress is not None:
            self.on_progress()
        # Pipelined bytes that requestDone replays come back through dataReceived, so
        # a next request already begun gets its deadline there.
        super().requestDone(request)

    # --- sizes --------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._at_request_line and line:
            self._at_request_line = False
            parts = line.split(b" ")
            if len(parts) == 3 and len(parts[1]) > self.limits.max_url_length:
                self.refuse(414, f"request target of {len(parts[1])} bytes")
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._at_request_line:
            self.refuse(414, f"request line over {self.MAX_LENGTH} bytes")
        else:
            self.refuse(431, f"header line over {self.MAX_LENGTH} bytes")

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.limits.max_request_size:
            self.refuse(413, f"declared body of {self.length} bytes")
            return
        super().allHeadersReceived()

    def body_too_large(self, seen: int) -> None:
        """A chunked body passed the limit (called by :class:`LimitedRequest`)."""
        self.refuse(413, f"chunked body over {self.limits.max_request_size} bytes")

    def refuse(self, code: int, why: str) -> None:
        """Answer ``code`` and close; nothing more is read from this connection."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)  # the idle timer too: this connection is done
        problems = getattr(self.site, "problems", None)
        if problems is not None:
            problems.report(str(code), why, self.transport.getPeer() if self.transport else None)
        if self.transport is not None:
            self.transport.write(plain_response(code, REFUSALS.get(code, b"")))
            self.loseConnection()

    def timeoutConnection(self) -> None:
        # The idle timer (idle_timeout) fired between requests: close quietly.
        self._cancel_deadline()
        if not self._refused:
            super().timeoutConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._cancel_deadline()
        super().connectionLost(reason)


class LimitedRequest(Request):
    """A ``Request`` whose body stays in memory and within ``max_request_size``."""

    channel: Any

    def gotLength(self, length: int | None) -> None:
        # Never a temporary file: the channel refused anything over the limit already.
        self.content = io.BytesIO()
        self._body_size = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_size += len(data)
        limit = self.channel.limits.max_request_size
        if self._body_size > limit:
            self.channel.body_too_large(self._body_size)
            return
        content = self.content
        if content is not None:
            content.write(data)

    def process(self) -> None:
        try:
            unquote_to_bytes(self.path).decode("utf-8")  # what Klein routes on
        except UnicodeDecodeError:
            # Klein would log a traceback for this and answer 400 itself.
            self.site = self.channel.site
            self.channel.site.app.undecodable_path(self)
            return
        super().process()
