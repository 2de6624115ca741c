"""The HTTP face of the responder: OCSP per handle, published CA/CRL files, probes.

Routes live on an :class:`OCSPApp` instance (``self.router``), built from the
handles it is given; nothing is global. GET requests are decoded from the RAW
request URI, because Twisted unquotes ``request.path`` and a ``%2F`` inside the
base64 would otherwise turn into a path separator; the router is told not to
merge ``//`` or redirect on trailing slashes (OCSP clients follow no redirects).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from hsmocsp.errors import HsmOcspError, MalformedRequest, UpstreamFailed
from hsmocsp.handle import Handle, SignedResponse, ocsp_status_for
from hsmocsp.hotcache import max_age_for
from hsmocsp.ocsp.request import decode_get_path, parse_request
from hsmocsp.ocsp.response import ResponseStatus, error_response
from hsmocsp.web.accesslog import AccessLog, AccessRecord, client_text
from hsmocsp.web.endpoint import OcspEndpoint
from hsmocsp.web.headers import (
    NO_CACHE,
    OCSP_REQUEST,
    cache_control,
    content_headers,
    http_date,
    validators,
)
from hsmocsp.web.metrics import Metrics
from hsmocsp.web.probes import Probes
from hsmocsp.web.problems import Problems

log = Logger()

#: What a request comes to: signed bytes, or an OCSP error status.
Outcome = SignedResponse | ResponseStatus

__all__ = ["NO_CACHE", "OCSPApp", "Outcome", "http_date"]


class OCSPApp:
    """Klein routes for a set of handles."""

    def __init__(
        self,
        handles: Sequence[OcspEndpoint],
        *,
        now: Callable[[], float],
        max_request_size: int = 10_000,
        metrics: Metrics | None = None,
        problems: Problems | None = None,
    ) -> None:
        self.handles = list(handles)
        self._now = now
        self.max_request_size = max_request_size
        self.metrics = metrics or Metrics([h for h in self.handles if isinstance(h, Handle)])
        self.probes = Probes(self.handles)
        self.access = AccessLog()  # off; the service sets the configured one
        self.problems = problems or Problems()
        if self.problems.on_count is None:
            self.problems.on_count = self.metrics.bad_request
        self.router = Klein()
        self.router.url_map.merge_slashes = False
        self.router.url_map.strict_slashes = False
        route = self.router.route
        route("/healthz", methods=["GET", "HEAD"])(self.healthz)
        route("/readyz", methods=["GET", "HEAD"])(self.readyz)
        route("/readyz/<name>", methods=["GET", "HEAD"])(self.readyz_handle)
        route("/metrics", methods=["GET"])(self.metrics_page)
        for handle in self.handles:
            self._add_handle(handle)
        # The router does not match "/ocsp//MEIw..." (an AIA URL with a trailing slash) to
        # the handle's GET rule, so anything unmatched is dispatched here on the raw URI.
        route("/", branch=True, methods=["GET", "HEAD"], endpoint="fallback")(self.fallback)

    def resource(self) -> Any:
        return self.router.resource()

    # --- OCSP ----------------------------------------------------------------------

    def _add_handle(self, handle: OcspEndpoint) -> None:
        prefix = handle.path.rstrip("/")

        def post(request: IRequest) -> Any:
            return self.ocsp_post(handle, request)

        def get(request: IRequest, **_: Any) -> Any:
            return self.ocsp_get(handle, prefix, request)

        def other(request: IRequest, **_: Any) -> bytes:
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, POST")
            return b"method not allowed\n"

        endpoint = f"ocsp:{handle.name}"
        self.router.route(prefix or "/", methods=["POST"], endpoint=endpoint + ":post")(post)
        self.router.route(
            (prefix or "") + "/", branch=True, methods=["GET", "HEAD"], endpoint=endpoint + ":get"
        )(get)
        self.router.route(
            prefix or "/", branch=True, methods=["PUT", "DELETE", "PATCH"], endpoint=endpoint + ":x"
        )(other)
        if not isinstance(handle, Handle):
            return  # a server replica forwards its published files (hsmocsp.server.forward)
        for url, content_type, body in (
            (handle.publish_ca, b"application/pkix-cert", handle_ca_der),
            (handle.publish_crl, b"application/pkix-crl", handle_crl_der),
        ):
            if url is not None:
                self.router.route(url, methods=["GET", "HEAD"], endpoint=f"pub:{url}")(
                    self._publisher(handle, content_type, body)
                )

    def fallback(self, request: IRequest, **_: Any) -> Any:
        raw = request.uri.split(b"?", 1)[0].decode("latin-1")
        for handle in sorted(self.handles, key=lambda h: -len(h.path)):
            prefix = handle.path.rstrip("/")
            if raw.startswith(prefix + "/"):
                return self.ocsp_get(handle, prefix, request)
        request.setResponseCode(404)
        return b"not found\n"

    def undecodable_path(self, request: IRequest) -> None:
        """Answer a request whose path is not UTF-8 (Klein cannot route it, and would
        log a traceback): malformedRequest under a handle's path, else 400."""
        raw = request.uri.split(b"?", 1)[0].decode("latin-1")
        body = b"bad request path\n"
        for handle in sorted(self.handles, key=lambda h: -len(h.path)):
            prefix = handle.path.rstrip("/")
            if request.method in (b"GET", b"HEAD") and raw.startswith(prefix + "/"):
                body = self._error(handle, request, ResponseStatus.malformedRequest,
                                   "GET path is not UTF-8", "GET", request.getClientAddress())
                break
        else:
            self.problems.report("400", "request path is not UTF-8", request.getClientAddress())
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"text/plain")
            request.setHeader(b"Cache-Control", NO_CACHE)
        request.write(body)
        request.finish()

    def ocsp_post(self, handle: OcspEndpoint, request: IRequest) -> Any:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != OCSP_REQUEST:
            request.setResponseCode(415)
            request.setHeader(b"Cache-Control", NO_CACHE)
            return b"Content-Type must be application/ocsp-request\n"
        body = request.content.read(self.max_request_size + 1)
        if len(body) > self.max_request_size:
            request.setResponseCode(413)
            request.setHeader(b"Cache-Control", NO_CACHE)
            return b"request too large\n"
        return self._answer(handle, request, body, "POST")

    def ocsp_get(self, handle: OcspEndpoint, prefix: str, request: IRequest) -> Any:
        raw = request.uri.split(b"?", 1)[0].decode("latin-1")
        tail = raw[len(prefix) :] if raw.startswith(prefix) else raw
        try:
            if len(tail) > self.max_request_size * 2:
                raise MalformedRequest("request too large")
            der = decode_get_path(tail)
        except MalformedRequest as err:
            return self._error(handle, request, ResponseStatus.malformedRequest, str(err), "GET",
                               request.getClientAddress())
        return self._answer(handle, request, der, "GET")

    def outcome(self, handle: OcspEndpoint, der: bytes) -> Outcome | Deferred[Outcome]:
        """What to answer to request bytes: a signed response or an OCSP error status.

        The one place (with :func:`ocsp_status_for`) where failures become statuses; the
        twisted.web route and the fast path both render what it returns. The Deferred it
        may return is a new one: a client that goes away cancels it, never the shared
        signing behind it.
        """
        try:
            result = handle.respond_der(der)
        except HsmOcspError as err:
            if isinstance(err, MalformedRequest):
                self.problems.report("malformedRequest", str(err))
            return ocsp_status_for(Failure(err))
        if isinstance(result, SignedResponse):
            return result
        d: Deferred[Outcome] = Deferred()

        def ok(response: SignedResponse) -> None:
            if not d.called:
                d.callback(response)

        def failed(failure: Failure) -> None:
            status = ocsp_status_for(failure)
            if status == ResponseStatus.internalError and not failure.check(UpstreamFailed):
                log.failure("handle {handle}: internal error", failure, handle=handle.name)
            if not d.called:
                d.callback(status)

        result.addCallbacks(ok, failed)
        return d

    def render(
        self,
        handle: OcspEndpoint,
        outcome: Outcome,
        method: str,
        if_none_match: bytes | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """HTTP status, headers and body for an outcome (RFC 5019 headers when cacheable)."""
        if isinstance(outcome, ResponseStatus):
            self.metrics.response(handle.name, outcome.name, method)
            body = error_response(outcome)
            headers = [(b"Cache-Control", NO_CACHE)]
        else:
            self.metrics.response(handle.name, "successful", method)
            body = outcome.der
            if outcome.cacheable:
                max_age = max_age_for(outcome, handle.now(), handle.max_age)
                headers = [(b"Cache-Control", cache_control(max_age))]
                headers += validators(outcome)
                if if_none_match == outcome.etag.encode("ascii"):
                    return 304, headers, b""
            else:
                headers = [(b"Cache-Control", NO_CACHE)]
        return 200, headers + content_headers(len(body)), body

    def _answer(self, handle: OcspEndpoint, request: IRequest, der: bytes, method: str) -> Any:
        started = perf_counter()
        result = self.outcome(handle, der)

        def write(outcome: Outcome, waited: bool) -> bytes:
            self.observe(handle, outcome, started, waited)
            body = self._write(handle, request, outcome, method)
            self._access(handle, request, outcome, method, der, started, waited)
            return body

        if isinstance(result, Deferred):
            return result.addCallback(write, True)
        return write(result, False)

    def observe(self, handle: OcspEndpoint, outcome: Outcome, started: float, waited: bool) -> None:
        """The request's latency, by result: ``cached`` (answered at once), ``signed``
        (a signature was made or awaited) or the OCSP error status."""
        if isinstance(outcome, ResponseStatus):
            result = outcome.name
        else:
            result = "signed" if waited else "cached"
        self.metrics.latency(handle.name, result, perf_counter() - started)

    def _access(
        self, handle: OcspEndpoint, request: IRequest, outcome: Outcome, method: str, der: bytes,
        started: float, waited: bool,
    ) -> None:  # fmt: skip
        """One access-log line for an answer of the twisted.web path (if the log is on)."""
        if not self.access.enabled:
            return
        status = outcome.name if isinstance(outcome, ResponseStatus) else "successful"
        try:
            serials = tuple(c.serial for c in parse_request(der).cert_ids)
        except HsmOcspError:
            serials = ()
        channel = getattr(request, "channel", None)
        peer = getattr(channel, "client_address", None) or request.getClientAddress()
        source = "-" if status != "successful" else ("signed" if waited else "hit")
        self.access.write(AccessRecord(
            self._now(), client_text(peer), handle.name, method, serials, status, source,
            (perf_counter() - started) * 1000, getattr(request, "code", 200),
        ))  # fmt: skip

    def _write(
        self, handle: OcspEndpoint, request: IRequest, outcome: Outcome, method: str
    ) -> bytes:
        code, headers, body = self.render(
            handle, outcome, method, request.getHeader(b"if-none-match")
        )
        request.setResponseCode(code)
        for name, value in headers:
            request.setHeader(name, value)
        return body

    def _error(
        self, handle: OcspEndpoint, request: IRequest, status: ResponseStatus, why: str,
        method: str, peer: Any = None,
    ) -> bytes:  # fmt: skip
        self.problems.report(status.name, f"handle {handle.name}: {why}", peer)
        return self._write(handle, request, status, method)

    # --- published files -----------------------------------------------------------

    def _publisher(
        self, handle: Handle, content_type: bytes, body: Callable[[Handle], bytes | None]
    ) -> Callable[[IRequest], bytes]:
        def serve(request: IRequest) -> bytes:
            data = body(handle)
            if data is None:
                request.setResponseCode(404)
                return b"not available\n"
            request.setHeader(b"Content-Type", content_type)
            request.setHeader(b"Cache-Control", b"max-age=300, public")
            return data

        return serve

    # --- probes --------------------------------------------------------------------

    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok\n"

    def readyz(self, request: IRequest) -> bytes:
        """503 only while starting or when every handle is failed (see web/probes.py)."""
        code, body = self.probes.readyz()
        return _json(request, code, body)

    def readyz_handle(self, request: IRequest, name: str) -> bytes:
        """One handle, strict: 200 only when it is ready."""
        found = self.probes.readyz_handle(name)
        if found is None:
            request.setResponseCode(404)
            return b"no such handle\n"
        return _json(request, *found)

    def metrics_page(self, request: IRequest) -> bytes:
        content_type, body = self.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode())
        return body


def _json(request: IRequest, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", NO_CACHE)
    return json.dumps(body, indent=1).encode() + b"\n"


def handle_ca_der(handle: Handle) -> bytes | None:
    issuers = handle.source.issuers()
    return issuers[0].public_bytes(Encoding.DER) if issuers else None


def handle_crl_der(handle: Handle) -> bytes | None:
    issuers = handle.source.issuers()
    return handle.source.crl_der(issuers[0]) if issuers else None
