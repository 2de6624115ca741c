"""The server role's link to its signer: requests it cannot answer, over HTTP.

A server replica forwards what neither its hot cache nor the shared store holds (a
new serial, a nonce, a response past its refresh point the signer has not re-signed
yet) to ``signer_url`` + the handle's path, exactly as a client would send it
(``POST``, ``Content-Type: application/ocsp-request``), and reads the answer back.

Bounded on purpose, so that a slow or dead signer cannot pile work up on a server:

* at most ``max_connections`` requests at once (a bounded treq connection pool), at
  most ``max_queue`` more waiting; beyond that, ``tryLater`` at once;
* every request, waiting included, ends within ``timeout`` seconds;
* a signer that does not answer (refused, reset, timed out, 5xx) is
  :class:`~hsmocsp.errors.SignerUnavailable` (-> ``tryLater``); one that answers
  something that is not an OCSP response is :class:`~hsmocsp.errors.UpstreamFailed`
  (-> ``internalError``). Each is logged once when it starts, and once when it ends.

While forwarding fails, and every ``probe_interval`` seconds anyway, ``/healthz`` of
the signer is asked, so that readiness tells whether the signer is there without
waiting for a client to find out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError, TimeoutError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseFailed, ResponseNeverReceived

from hsmocsp.errors import SignerUnavailable, UpstreamFailed
from hsmocsp.health import READY, Health, State
from hsmocsp.httppool import QuietPool

log = Logger()

__all__ = ["SignerAnswer", "SignerLink"]

OCSP_REQUEST = b"application/ocsp-request"
OCSP_RESPONSE = b"application/ocsp-response"


@dataclass(frozen=True, slots=True)
class SignerAnswer:
    """What the signer sent back: HTTP status, a few headers, the body."""

    code: int
    body: bytes
    content_type: bytes = b""
    cache_control: bytes = b""


class SignerLink:
    """HTTP client for one signer (``signer_url``), shared by every handle of a server.

    ``http_client`` (a ``treq.client.HTTPClient``) is injected by tests (treq's
    ``StubTreq``); otherwise one over its own persistent connection pool is made.
    """

    def __init__(
        self,
        base_url: str,
        reactor: Any,
        *,
        timeout: float = 5.0,
        max_connections: int = 16,
        max_queue: int = 1000,
        probe_interval: float = 2.0,
        http_client: Any = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._reactor = reactor
        self.timeout = timeout
        self.max_queue = max_queue
        self.probe_interval = probe_interval
        self._slots = DeferredSemaphore(max_connections)
        self._pool: QuietPool | None = None
        if http_client is None:
            import treq.client

            self._pool = QuietPool(reactor, max_per_host=max_connections, cached_timeout=60)
            agent = Agent(reactor, pool=self._pool, connectTimeout=timeout)  # type: ignore[no-untyped-call]
            http_client = treq.client.HTTPClient(agent)
        self._http = http_client
        self._probe: LoopingCall | None = None
        self._probing = False
        #: Why the signer is out of reach now (None: it answered last time).
        self.down_reason: str | None = None
        self._garbage_logged = False
        self.forwarded = 0
        self.unavailable = 0
        self.invalid = 0

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Probe the signer now and every ``probe_interval`` seconds."""
        if self._probe is None:
            self._probe = LoopingCall(self._check)
            self._probe.clock = self._reactor
            self._probe.start(self.probe_interval, now=True)

    def stop(self) -> Deferred[None] | None:
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None
        if self._pool is not None:
            return self._pool.close()  # forwards still in flight fail: we are stopping
        return None

    def health(self) -> Health:
        if self.down_reason is None:
            return READY
        return Health(State.FAILED, f"signer {self.base_url}: {self.down_reason}")

    # --- requests ---------------------------------------------------------------------

    def post_ocsp(self, path: str, der: bytes) -> Deferred[SignerAnswer]:
        """POST OCSP request bytes to the signer's ``path``; the signer's answer (an OCSP
        response of any status), or fails with SignerUnavailable / UpstreamFailed."""
        self.forwarded += 1
        d = self._request("POST", path, der)
        return d.addCallback(self._ocsp_answer, path)

    def get(self, path: str) -> Deferred[SignerAnswer]:
        """GET ``path`` (a published CA certificate or CRL): any HTTP answer, or fails with
        SignerUnavailable."""
        return self._request("GET", path, None)

    def _request(self, method: str, path: str, body: bytes | None) -> Deferred[SignerAnswer]:
        waiting = len(self._slots.waiting)
        if waiting >= self.max_queue:
            self.unavailable += 1
            return _failed(SignerUnavailable(f"{waiting} requests already wait for the signer"))
        d = self._slots.run(lambda: Deferred.fromCoroutine(self._send(method, path, body)))
        d.addTimeout(self.timeout, self._reactor)
        return d.addErrback(self._unreachable, method, path)

    async def _send(self, method: str, path: str, body: bytes | None) -> SignerAnswer:
        headers = {b"Content-Type": [OCSP_REQUEST]} if body is not None else {}
        try:
            response = await self._http.request(
                method, self.base_url + path, data=body, headers=headers, allow_redirects=False
            )
        except ResponseNeverReceived:
            # A kept-alive connection the signer closed (it restarted): asking an OCSP
            # question twice is harmless, so once more on a new connection.
            response = await self._http.request(
                method, self.base_url + path, data=body, headers=headers, allow_redirects=False
            )
        content = await response.content()
        h = response.headers
        return SignerAnswer(
            code=response.code,
            body=content,
            content_type=(h.getRawHeaders(b"content-type") or [b""])[0],
            cache_control=b", ".join(h.getRawHeaders(b"cache-control") or []),
        )

    def _unreachable(self, failure: Failure, method: str, path: str) -> SignerAnswer:
        if isinstance(failure.value, _UNREACHABLE):
            why = _describe(failure)
            self.unavailable += 1
            self._went_down(why)
            raise SignerUnavailable(f"signer {self.base_url} {method} {path}: {why}")
        failure.raiseException()
        raise AssertionError("not reached")

    def _ocsp_answer(self, answer: SignerAnswer, path: str) -> SignerAnswer:
        if answer.code >= 500:
            # A signer that is starting, stopping or overloaded (its proxy's 502/503/504).
            self.unavailable += 1
            self._went_down(f"HTTP {answer.code}")
            raise SignerUnavailable(f"signer {self.base_url}{path}: HTTP {answer.code}")
        self._came_back()
        if answer.code != 200 or answer.content_type.split(b";")[0].strip() != OCSP_RESPONSE:
            raise self.garbage(
                f"HTTP {answer.code}, Content-Type {answer.content_type.decode('latin-1')!r}", path
            )
        return answer

    def garbage(self, what: str, path: str) -> UpstreamFailed:
        """The error for an unusable answer from the signer; logged once per run of them
        (until the signer answers well again, :meth:`answered_well`)."""
        self.invalid += 1
        if not self._garbage_logged:
            self._garbage_logged = True
            log.error(
                "signer {url}{path} answered with something that is not a usable OCSP "
                "response ({what}): internalError to the client (logged once; counted in "
                "hsmocsp_forward_errors_total)",
                url=self.base_url, path=path, what=what,
            )  # fmt: skip
        return UpstreamFailed(f"signer {self.base_url}{path}: {what}")

    def answered_well(self) -> None:
        """A forwarded request got a usable OCSP response: log the next garbage again."""
        if self._garbage_logged:
            self._garbage_logged = False
            log.info("signer {url} answers usable OCSP responses again", url=self.base_url)

    # --- reachability -----------------------------------------------------------------

    def _went_down(self, why: str) -> None:
        if self.down_reason is None:
            log.warn(
                "signer {url} is out of reach ({why}): misses get tryLater until it answers",
                url=self.base_url, why=why,
            )  # fmt: skip
        self.down_reason = why

    def _came_back(self) -> None:
        if self.down_reason is not None:
            log.info("signer {url} answers again", url=self.base_url)
        self.down_reason = None

    def _check(self) -> None:
        """One probe of the signer's ``/healthz`` (never two at once)."""
        if self._probing:
            return
        self._probing = True
        d = self._request("GET", "/healthz", None)

        def seen(answer: SignerAnswer) -> None:
            if answer.code == 200:
                self._came_back()
            else:
                self._went_down(f"/healthz answered HTTP {answer.code}")

        d.addCallbacks(seen, lambda _: None)  # _unreachable recorded why
        d.addBoth(self._probed)

    def _probed(self, _: object) -> None:
        self._probing = False


#: What "the signer is out of reach" looks like from here.
_UNREACHABLE = (
    defer.TimeoutError, ConnectError, DNSLookupError, TimeoutError, CancelledError,
    ResponseNeverReceived, ResponseFailed, ConnectionClosed, OSError,
)  # fmt: skip


def _describe(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, ResponseNeverReceived | ResponseFailed) and value.reasons:
        inner = value.reasons[0].value
        return f"{type(inner).__name__}: {inner}".rstrip(": ")
    if isinstance(value, CancelledError | TimeoutError | defer.TimeoutError):
        return "no answer in time"
    return f"{type(value).__name__}: {value}".rstrip(": ")


def _failed(err: Exception) -> Deferred[SignerAnswer]:
    return fail(err)
