"""Fuzz targets: the request parser and the HTTP layer, for a fixed budget.

``make test`` runs each for ``HSMOCSP_FUZZ_EXAMPLES`` examples (default 150: ~10 s);
``make fuzz`` runs them for 5,000 each (minutes). Hypothesis generates and shrinks:
structured requests (real vectors mutated, hand-built TLV trees) for the parser,
and streams of HTTP requests, garbage and clock jumps, cut at random points, for
the fast path and the twisted.web channel behind it.

Properties: the parser either returns a request whose CertIDs are the bytes it was
given, or raises MalformedRequest (nothing else, ever); the HTTP layer raises
nothing, logs no failure, writes only well-formed HTTP responses, and closes every
connection it holds once the deadlines pass.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from hsmocsp.errors import MalformedRequest
from hsmocsp.ocsp import der
from hsmocsp.ocsp.request import decode_get_path, parse_request
from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.problems import Problems
from tests.unit.test_responder import make, request_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXAMPLES = int(os.environ.get("HSMOCSP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DATA = Path(__file__).resolve().parent.parent / "testdata" / "ocsp"
SEEDS = [p.read_bytes() for p in sorted(DATA.glob("req_*.der"))]


# --- the parser ----------------------------------------------------------------------------

@st.composite
def tlv_trees(draw: st.DrawFn, depth: int = 0) -> bytes:
    """DER-ish TLV trees: plausible tags, sometimes wrong lengths, nesting up to 6."""
    tag = draw(st.sampled_from([0x30, 0x30, 0x04, 0x02, 0x06, 0x05, 0x01, 0xA0, 0xA1, 0xA2,
                                0x80, 0x82, 0x03, 0x1F, 0x00]))  # fmt: skip
    if tag in (0x30, 0xA0, 0xA1, 0xA2) and depth < 6:
        content = b"".join(draw(st.lists(tlv_trees(depth + 1), max_size=4)))
    else:
        content = draw(st.binary(max_size=40))
    encoded = der.tlv(tag, content)
    if draw(st.integers(0, 15)) == 0:  # a lying length
        cut = draw(st.integers(0, len(encoded)))
        encoded = encoded[:cut] + draw(st.binary(max_size=3))
    return encoded


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        op = draw(st.sampled_from(["set", "insert", "delete", "splice", "repeat"]))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "splice":
            data[pos:pos] = draw(tlv_trees())
        elif op == "repeat" and data:
            end = min(len(data), pos + draw(st.integers(1, 80)))
            data[pos:pos] = data[pos:end] * draw(st.integers(1, 80))
    return bytes(data)


@FUZZ
@given(st.one_of(mutated_seeds(), tlv_trees(), st.binary(max_size=600)))
def test_fuzz_parser(raw: bytes) -> None:
    try:
        info = parse_request(raw)
    except MalformedRequest:
        return
    assert 1 <= len(info.cert_ids) <= 64
    for cid in info.cert_ids:
        assert cid.der in raw
        assert der.integer(cid.serial) in cid.der
    if info.nonce is not None:
        assert info.nonce in raw and 3 <= len(info.nonce) <= 131


@FUZZ
@given(st.one_of(st.text(max_size=300), st.from_regex(r"[A-Za-z0-9+/=%_ -]{0,300}")))
def test_fuzz_get_path(path: str) -> None:
    try:
        raw = decode_get_path(path)
    except MalformedRequest:
        return
    try:
        parse_request(raw)
    except MalformedRequest:
        pass


# --- the HTTP layer -------------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"get", b"", b"CONNECT"]
PATHS = [b"/ocsp", b"/ocsp/", b"/healthz", b"/readyz", b"/metrics", b"/", b"/nowhere",
         b"/ocsp/%ff", b"//ocsp", b"/ocsp/MEIwQDA%2B"]  # fmt: skip
HEADERS = [
    b"Host: x", b"Content-Type: application/ocsp-request", b"Connection: close",
    b"Connection: keep-alive", b"Transfer-Encoding: chunked", b"Content-Length: 5",
    b"Content-Length: 99999999999", b"Content-Length: -1", b"Expect: 100-continue",
    b'If-None-Match: "x"', b"X: " + b"y" * 300, b"Bad header", b" folded",
]


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS))
    if draw(st.booleans()):
        path += b"/" + draw(st.binary(max_size=60)).replace(b" ", b"").replace(b"\r\n", b"")
    if draw(st.integers(0, 20)) == 0:
        path += b"A" * draw(st.integers(8000, 20000))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b""]))
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=4))
    body = b""
    if method == b"POST":
        body = draw(st.sampled_from([request_for(1), request_for(2), request_for(99),
                                     request_for(1, nonce=True), b"junk", b""]))  # fmt: skip
        if not any(h.startswith((b"Content-Length", b"Transfer")) for h in headers):
            headers.append(b"Content-Length: %d" % len(body))
        if b"Transfer-Encoding: chunked" in headers:
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return b"%s %s %s\r\n%s\r\n\r\n%s" % (method, path, version, b"\r\n".join(headers), body)


class TcpLikeTransport(StringTransport):
    """StringTransport, but as lenient as a real TCP transport (``FileDescriptor``) about
    unregistering a producer twice, which twisted.web does when it closes a connection
    it has already closed."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


STATUS_LINE = re.compile(rb"^HTTP/1\.[01] [1-5]\d\d [^\r\n]*\r\n")
_CLOCK = Clock()
_CLOCK.advance(1_750_000_000)
_HANDLE = make(_CLOCK)[0]  # one handle (a key load) for every example; its cache carries over


@FUZZ
@given(
    st.lists(http_requests(), min_size=1, max_size=4),
    st.lists(st.integers(1, 400), max_size=6),
    st.lists(st.sampled_from([0.0, 0.5, 4.0, 11.0]), max_size=4),
)
def test_fuzz_http_layer(requests: list[bytes], cuts: list[int], waits: list[float]) -> None:
    clock = _CLOCK
    app = OCSPApp([_HANDLE], now=clock.seconds, problems=Problems(clock))
    site = FastSite(app, clock.seconds, clock=clock,
                    limits=HttpLimits(max_connections=4, max_request_size=4000))  # fmt: skip
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = TcpLikeTransport()
        proto.makeConnection(transport)
        stream = b"".join(requests)
        pieces, last = [], 0
        for cut in sorted(c % (len(stream) + 1) for c in cuts):
            pieces.append(stream[last:cut])
            last = cut
        pieces.append(stream[last:])
        for n, piece in enumerate(pieces):
            if transport.disconnecting or transport.disconnected:
                break
            proto.dataReceived(piece)
            if n < len(waits):
                clock.advance(waits[n])
        clock.advance(100)  # past every deadline: nothing is held for ever
        assert transport.disconnecting or transport.disconnected
        out = transport.value()
        if out:
            assert STATUS_LINE.match(out), out[:200]
        proto.connectionLost(None)
        assert len(site.table) == 0
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, failures[0]
