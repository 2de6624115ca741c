"""Per-connection limits (#9.3, #9.5, #9.10) on the fast path and the twisted.web path
behind it, driven in memory with a Clock: deadlines, the connection cap, 413/414, and
bad input that is counted and logged once, never as a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.limits import ConnectionTable, HttpLimits, connection_cap
from hsmocsp.web.problems import Problems
from tests.unit.test_fastpath import post
from tests.unit.test_responder import make, request_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


def site(**limits: Any) -> tuple[FastSite, Clock]:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)
    app = OCSPApp([handle], now=clock.seconds, problems=Problems(clock))
    return FastSite(app, clock.seconds, limits=HttpLimits(**limits), clock=clock), clock


def connect(s: FastSite) -> tuple[Any, StringTransport]:
    proto = s.buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def closed(t: StringTransport) -> bool:
    return bool(t.disconnecting or t.disconnected)


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# --- deadlines -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "start",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # the fast path's own head
        # handed over to twisted.web at once (chunked), then trickled
        b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/ocsp-request\r\n\r\n1\r\n",
    ],
)
def test_a_slow_request_gets_408_after_request_timeout(start: bytes) -> None:
    """One byte every 5 s used to hold a connection for ever (each byte reset the timer)."""
    s, clock = site(request_timeout=10.0, idle_timeout=60.0)
    proto, transport = connect(s)
    proto.dataReceived(start)
    for _ in range(3):  # 15 s, a byte every 5 s: never idle, never complete
        clock.advance(5)
        if closed(transport):
            break
        proto.dataReceived(b"a")
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert s.problems.totals == {"408": 1}


def test_idle_keep_alive_connection_is_closed_quietly() -> None:
    s, clock = site(request_timeout=10.0, idle_timeout=30.0)
    proto, transport = connect(s)
    proto.dataReceived(post(request_for(1)))
    answered = transport.value()
    assert answered.startswith(b"HTTP/1.1 200") and not closed(transport)
    clock.advance(29)
    assert not closed(transport)
    clock.advance(2)
    assert closed(transport) and transport.value() == answered  # no 408 for an idle one


def test_requests_complete_within_the_deadline_keep_the_connection() -> None:
    s, clock = site(request_timeout=10.0, idle_timeout=60.0)
    proto, transport = connect(s)
    raw = post(request_for(1))
    for _ in range(5):  # each request arrives in two parts, 4 s apart
        proto.dataReceived(raw[:20])
        clock.advance(4)
        proto.dataReceived(raw[20:])
        clock.advance(4)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 5 and not closed(transport)


# --- the connection cap --------------------------------------------------------------------

def test_connection_cap_closes_the_idlest_first() -> None:
    s, _ = site(max_connections=3)
    conns = [connect(s) for _ in range(3)]
    for proto, _ in conns:
        proto.dataReceived(b"G")  # slow clients, none completes a request
    # The oldest one completes a request: it is no longer the idlest.
    conns[0][0].dataReceived(b"ET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" in conns[0][1].value()
    newcomer = connect(s)
    assert [closed(t) for _, t in conns] == [False, True, False]
    assert not closed(newcomer[1]) and len(s.table) == 3 and s.table.evicted == 1


def test_connection_cap_spares_connections_waiting_for_a_signature() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    signer.hold = True  # type: ignore[attr-defined]
    app = OCSPApp([handle], now=clock.seconds, problems=Problems(clock))
    s = FastSite(app, clock.seconds, limits=HttpLimits(max_connections=2), clock=clock)
    busy = connect(s)
    busy[0].dataReceived(post(request_for(7)))  # a miss: waits for the signer
    idle = connect(s)
    connect(s)
    assert not closed(busy[1]) and closed(idle[1])
    signer.release()  # type: ignore[attr-defined]
    assert busy[1].value().startswith(b"HTTP/1.1 200")


def test_connection_cap_stays_below_the_descriptor_limit() -> None:
    assert connection_cap(0, 1024) == 896
    assert connection_cap(0, 65536) == 57344
    assert connection_cap(100, 1024) == 100
    assert connection_cap(5000, 1024) == 896  # never above what the descriptors allow
    assert 0 < connection_cap(0) < 1 << 20


def test_table_order() -> None:
    class Conn:
        def __init__(self) -> None:
            self.gone = False

        def busy(self) -> bool:
            return False

        def evict(self) -> None:
            self.gone = True

    table = ConnectionTable(2)
    a, b, c = Conn(), Conn(), Conn()
    table.opened(a)
    table.opened(b)
    table.progressed(a)
    table.opened(c)
    assert (a.gone, b.gone, c.gone) == (False, True, False)
    table.closed(a)
    assert len(table) == 1


# --- sizes: 413 before the body, 414 -----------------------------------------------------

@pytest.mark.parametrize("path", [b"/ocsp", b"/metrics", b"/nowhere"])
def test_declared_body_over_the_limit_is_refused_before_reading_it(path: bytes) -> None:
    s, _ = site(max_request_size=10_000)
    proto, transport = connect(s)
    proto.dataReceived(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/ocsp-request\r\n"
                       b"Content-Length: 1500000000\r\n\r\n")  # fmt: skip
    assert transport.value().startswith(b"HTTP/1.1 413 ") and closed(transport)
    proto.dataReceived(b"x" * 100_000)  # the body that follows is not read
    assert s.problems.totals == {"413": 1}


def test_declared_body_over_the_limit_on_a_handed_over_connection() -> None:
    """After a hand-over (here: a probe first) twisted.web reads the connection; it too
    answers 413 from the headers, before a byte of the body (it used to stream it to a
    temporary file)."""
    s, _ = site(max_request_size=10_000)
    proto, transport = connect(s)
    proto.dataReceived(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200") and s.handed_over == 1
    proto.dataReceived(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 1500000000\r\n"
                       b"Content-Type: application/ocsp-request\r\n\r\n")  # fmt: skip
    assert b"HTTP/1.1 413 " in transport.value() and closed(transport)


def test_chunked_body_is_cut_off_at_the_limit() -> None:
    s, _ = site(max_request_size=10_000)
    proto, transport = connect(s)
    proto.dataReceived(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Content-Type: application/ocsp-request\r\n\r\n")  # fmt: skip
    requests = []
    for _ in range(30):  # 30 chunks of 1,000 bytes: the 11th passes the limit
        if closed(transport):
            break
        proto.dataReceived(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
        channel = proto._delegate
        requests.extend(r for r in channel.requests if r not in requests)
    assert transport.value().startswith(b"HTTP/1.1 413 ") and closed(transport)
    (request,) = requests
    assert len(request.content.getvalue()) <= 10_000  # never more than the limit held


def test_chunked_body_within_the_limit_is_answered() -> None:
    s, _ = site(max_request_size=10_000)
    proto, transport = connect(s)
    body = request_for(1)
    proto.dataReceived(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Content-Type: application/ocsp-request\r\n\r\n"
                       b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))  # fmt: skip
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert b"application/ocsp-response" in transport.value()


def test_over_long_url_gets_414() -> None:
    s, _ = site(max_url_length=8192)
    proto, transport = connect(s)
    proto.dataReceived(b"GET /ocsp/" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 414 ") and closed(transport)
    proto, transport = connect(s)
    proto.dataReceived(b"GET /ocsp/" + b"A" * 20_000)  # no end of line in sight
    assert transport.value().startswith(b"HTTP/1.1 414 ") and closed(transport)
    # and behind a hand-over (HEAD goes to twisted.web)
    proto, transport = connect(s)
    proto.dataReceived(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    proto.dataReceived(b"HEAD /" + b"B" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"HTTP/1.1 414 " in transport.value() and closed(transport)
    assert s.problems.totals == {"414": 3}


# --- bad input: no traceback, one line then a summary --------------------------------------

@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /ocsp/%ff HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),  # 35 bytes, #9.10
        (b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    ],
)
def test_non_utf8_path_logs_no_traceback(
    raw: bytes, status: bytes, logged: list[dict[str, Any]]
) -> None:
    s, clock = site()
    for _ in range(50):
        proto, transport = connect(s)
        proto.dataReceived(raw)
        assert transport.value().startswith(b"HTTP/1.1 " + status)
    assert not [e for e in logged if "log_failure" in e]
    refused = [e for e in logged if e.get("log_namespace") == "hsmocsp.web.problems"]
    assert len(refused) == 1  # one line for fifty
    clock.advance(61)
    summary = [e for e in logged if e.get("log_namespace") == "hsmocsp.web.problems"]
    assert len(summary) == 2 and summary[1]["n"] == 49
    if status == b"200":
        from cryptography.x509 import ocsp

        body = transport.value().partition(b"\r\n\r\n")[2]
        status_ = ocsp.load_der_ocsp_response(body).response_status
        assert status_ == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_bad_requests_are_counted_in_a_metric() -> None:
    s, _ = site()
    for _ in range(3):
        proto, _ = connect(s)
        proto.dataReceived(post(b"junk"))
    text = s.app.metrics.render()[1].decode()
    assert 'hsmocsp_bad_requests_total{kind="malformedRequest"} 3.0' in text


def test_front_refusals_reach_the_main_metric() -> None:
    from hsmocsp.web.front_pool import FrontPool
    from hsmocsp.web.front_process import FrontSite, Replica

    s, clock = site()
    handle = s.app.handles[0]
    replica = Replica(handle.name, handle.path, handle.max_age, "echo", clock.seconds)
    front = FrontSite([replica], clock.seconds, lambda p: None, HttpLimits(), clock)  # type: ignore[arg-type,return-value]
    for _ in range(2):
        proto, transport = connect(front)  # type: ignore[arg-type]
        proto.dataReceived(b"GET /ocsp/" + b"A" * 9000 + b" HTTP/1.1\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 414 ")
    refused = front.take_refused()
    assert refused == {"414": 2} and front.take_refused() == {}
    pool = FrontPool(clock, [handle], s.app.metrics, count=0, host="127.0.0.1", port=1,
                     backend="/x", limits=HttpLimits())  # fmt: skip
    pool.refused({**refused, "999": 5, "408": -1, "413": "x"})
    text = s.app.metrics.render()[1].decode()
    assert 'hsmocsp_bad_requests_total{kind="414"} 2.0' in text and 'kind="999"' not in text
