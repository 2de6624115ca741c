"""The cached fast path: same bytes as the full path, and a clean hand-over for the rest."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from tests.unit.test_responder import make, request_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


def site() -> FastSite:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)
    return FastSite(OCSPApp([handle], now=clock.seconds), clock.seconds, clock=clock)


def connect(s: FastSite) -> tuple[object, StringTransport]:
    proto = s.buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def post(body: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST /ocsp " + version + b"\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
        b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def split(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def warm(s: FastSite, req: bytes) -> bytes:
    """First request: a miss, signed through the app's outcome() and written by the channel."""
    proto, transport = connect(s)
    proto.dataReceived(post(req))  # type: ignore[attr-defined]
    head, body = split(transport.value())
    assert head.startswith(b"HTTP/1.1 200") and s.full_answers == 1 and s.fast_answers == 0
    assert s.handed_over == 0
    return body


def test_cached_post_is_answered_fast_with_the_same_bytes() -> None:
    s = site()
    req = request_for(1)
    full = warm(s, req)
    proto, transport = connect(s)
    proto.dataReceived(post(req))  # type: ignore[attr-defined]
    head, body = split(transport.value())
    assert s.fast_answers == 1 and body == full
    assert b"HTTP/1.1 200 OK" in head
    assert b"Content-Type: application/ocsp-response" in head
    assert b"Content-Length: %d" % len(full) in head
    assert b"max-age=3600, public, no-transform, must-revalidate" in head
    assert b"ETag: " in head and b"Last-Modified: " in head and b"Expires: " in head
    assert not transport.disconnecting  # HTTP/1.1 keeps the connection


def test_pipelined_chunked_and_http10() -> None:
    s = site()
    req = request_for(1)
    full = warm(s, req)
    proto, transport = connect(s)
    for byte in post(req) + post(req):  # one byte at a time, two pipelined requests
        proto.dataReceived(bytes([byte]))  # type: ignore[attr-defined]
    assert transport.value().count(full) == 2 and s.fast_answers == 2
    proto, transport = connect(s)
    proto.dataReceived(post(req, b"HTTP/1.0"))  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.0 200 OK")
    assert b"Connection: close" in transport.value() and transport.disconnecting


def test_get_variants_fast() -> None:
    s = site()
    req = request_for(1)
    full = warm(s, req)
    b64 = base64.b64encode(req).decode()
    for tail in (quote(b64, safe=""), b64, "/" + b64.rstrip("=")):
        proto, transport = connect(s)
        proto.dataReceived(b"GET /ocsp/%s HTTP/1.1\r\nHost: x\r\n\r\n" % tail.encode())  # type: ignore[attr-defined]
        assert split(transport.value())[1] == full, tail
    assert s.fast_answers == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        post(request_for(1), extra=b"Content-Length: 5\r\n"),  # duplicate Content-Length
        post(request_for(1), extra=b'If-None-Match: "x"\r\n'),
        b"PUT /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_everything_else_is_handed_to_twisted_web(raw: bytes) -> None:
    s = site()
    warm(s, request_for(1))
    proto, transport = connect(s)
    proto.dataReceived(raw)  # type: ignore[attr-defined]
    assert s.fast_answers == 0 and s.handed_over == 1
    assert transport.value().startswith(b"HTTP/1.1 ")


def test_hand_over_after_fast_answers_on_one_connection() -> None:
    s = site()
    req = request_for(1)
    full = warm(s, req)
    proto, transport = connect(s)
    proto.dataReceived(post(req) + b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK") and full in out
    assert b"HTTP/1.1 404" in out
    assert s.fast_answers == 1 and s.handed_over == 1


def site_with_signer() -> tuple[FastSite, object]:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    return FastSite(OCSPApp([handle], now=clock.seconds), clock.seconds, clock=clock), signer


def test_misses_are_answered_in_order_when_signed() -> None:
    s, signer = site_with_signer()
    signer.hold = True  # type: ignore[attr-defined]
    proto, transport = connect(s)
    # Two pipelined misses and a malformed request: answers must come back in that order.
    proto.dataReceived(post(request_for(7)) + post(request_for(8)) + post(b"junk"))  # type: ignore[attr-defined]
    assert transport.value() == b""  # the first is being signed; nothing else answered yet
    signer.release()  # type: ignore[attr-defined]
    signer.release()  # type: ignore[attr-defined]
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK") == 3 and s.handed_over == 0
    bodies = [ocsp.load_der_ocsp_response(part) for part in _bodies(out)]
    assert [b.response_status for b in bodies] == [
        ocsp.OCSPResponseStatus.SUCCESSFUL,
        ocsp.OCSPResponseStatus.SUCCESSFUL,
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
    ]
    assert [bodies[0].serial_number, bodies[1].serial_number] == [7, 8]
    assert b"no-cache" in out.split(b"\r\n\r\n")[-2]  # the error is not cacheable
    s.problems.stop()  # its summary timer (on the real reactor) ends with the test


def test_nonce_request_is_signed_live_by_the_channel() -> None:
    s, _ = site_with_signer()
    proto, transport = connect(s)
    proto.dataReceived(post(request_for(1, nonce=True)))  # type: ignore[attr-defined]
    head, body = split(transport.value())
    assert b"no-cache" in head and s.full_answers == 1 and s.handed_over == 0
    resp = ocsp.load_der_ocsp_response(body)
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce


def test_disconnect_while_signing_writes_nothing() -> None:
    s, signer = site_with_signer()
    signer.hold = True  # type: ignore[attr-defined]
    proto, transport = connect(s)
    proto.dataReceived(post(request_for(9)))  # type: ignore[attr-defined]
    proto.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    signer.release()  # type: ignore[attr-defined]
    assert transport.value() == b""


def _bodies(out: bytes) -> list[bytes]:
    """Split concatenated HTTP/1.1 responses (each has Content-Length)."""
    bodies = []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        bodies.append(rest[:length])
        out = rest[length:]
    return bodies
