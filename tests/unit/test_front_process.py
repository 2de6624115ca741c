"""Front processes (``--workers``): the replica, the frames, the answer or the relay."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hsmocsp.errors import ConfigError
from hsmocsp.service.listen import tcp_listen_address
from hsmocsp.web.app import OCSPApp
from hsmocsp.web.fastpath import FastSite
from hsmocsp.web.front_process import (
    SERVICE_UNAVAILABLE,
    FrameDecoder,
    FrameError,
    FrontSite,
    Replica,
    encode_frame,
    encode_report,
)
from hsmocsp.web.limits import HttpLimits
from tests.unit.test_fastpath import ADDR, post, split, warm
from tests.unit.test_responder import make, request_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Backend:
    """Stands in for the main process's Unix socket."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.protocols: list[Protocol] = []
        self.transports: list[StringTransport] = []

    def connect(self, protocol: Protocol) -> Deferred[Any]:
        if not self.up:
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError("no main process"))
            return d
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return succeed(protocol)


def setup(
    nonce: str = "echo", backend: Backend | None = None
) -> tuple[FastSite, FrontSite, Replica, Clock, Backend]:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)
    handle.nonce_policy = nonce  # type: ignore[assignment]
    main = FastSite(OCSPApp([handle], now=clock.seconds), clock.seconds, clock=clock)
    replica = Replica(handle.name, handle.path, handle.max_age, nonce, clock.seconds)
    backend = backend or Backend()
    front = FrontSite([replica], clock.seconds, backend.connect, HttpLimits(), clock)
    feed = _Feed(replica)
    handle.cache.observers.append(feed)  # type: ignore[arg-type]
    return main, front, replica, clock, backend


class _Feed:
    """Every stored response straight into the replica, through the frame codec (the real
    pool sends only what a front asks for: tests/unit/test_front_feed.py)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.decoder = FrameDecoder(trusted=True)

    def _through_pipe(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        (decoded,) = self.decoder.feed(encode_frame(message))
        return decoded

    def stored(self, key: bytes, serial: int, value: Any) -> None:
        _, k, s, v = self._through_pipe(("put", key, serial, value))
        self.replica.put(k, s, v)

    def dropped(self, key: bytes) -> None:
        pass  # not sent to fronts: they stop at the refresh point, before any drop

    def invalidated(self, serials: frozenset[int] | None) -> None:
        self.replica.invalidate(self._through_pipe(("inv", serials))[1])


def ask(site: FrontSite | FastSite, raw: bytes) -> tuple[Protocol, StringTransport]:
    proto = site.buildProtocol(ADDR)
    transport = StringTransport()
    assert proto is not None
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    return proto, transport


def test_front_answers_with_the_main_process_bytes() -> None:
    main, front, _, _, backend = setup()
    req = request_for(1)
    warm(main, req)
    _, from_main = ask(main, post(req))
    _, from_front = ask(front, post(req))
    assert from_front.value() == from_main.value()  # headers and body, byte for byte
    assert backend.protocols == []
    assert front.take_counts() == {main.app.handles[0].name: {"POST": 1}}
    assert front.take_counts() == {}


def test_unknown_request_is_relayed_from_that_request_on() -> None:
    main, front, _, _, backend = setup()
    known, other = request_for(1), request_for(2)
    warm(main, known)
    proto, client = ask(front, post(known) + post(other) + post(known))
    head, _ = split(client.value())
    assert head.startswith(b"HTTP/1.1 200")  # the first answered here
    assert len(backend.transports) == 1
    # Everything from the request the front could not answer goes to the main process,
    # after a first line naming the client (for the access log).
    preamble = b"HSMOCSP-CLIENT 127.0.0.1 40000\r\n"
    assert backend.transports[0].value() == preamble + post(other) + post(known)
    backend.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\n\r\nfrom main")
    assert client.value().endswith(b"from main")
    proto.dataReceived(b"more")
    assert backend.transports[0].value().endswith(b"more")


def test_invalidation_reaches_the_replica() -> None:
    main, front, replica, _, backend = setup()
    req = request_for(1)
    warm(main, req)
    assert replica.lookup(req) is not None
    main.app.handles[0].cache.invalidate([1])
    assert replica.lookup(req) is None
    ask(front, post(req))
    assert len(backend.transports) == 1  # relayed, not answered from a stale entry


def test_past_refresh_point_is_left_to_the_main_process() -> None:
    main, _, replica, clock, _ = setup()
    req = request_for(1)
    warm(main, req)
    value = replica.lookup(req)
    assert value is not None
    clock.advance(value.refresh_at - clock.seconds())
    assert replica.lookup(req) is None


@pytest.mark.parametrize("policy, served", [("echo", False), ("ignore", True)])
def test_nonce_policy(policy: str, served: bool) -> None:
    main, _, replica, _, _ = setup(nonce=policy)
    warm(main, request_for(1))
    assert (replica.lookup(request_for(1, nonce=True)) is not None) is served


def test_malformed_request_is_relayed() -> None:
    _, front, replica, _, backend = setup()
    assert replica.lookup(b"\x30\x03abc") is None
    ask(front, post(b"\x30\x03abc"))
    assert len(backend.transports) == 1


def test_main_process_unreachable_gives_503() -> None:
    _, front, _, _, _ = setup(backend=Backend(up=False))
    _, client = ask(front, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.value() == SERVICE_UNAVAILABLE


def test_frames_split_anywhere() -> None:
    frames = encode_frame(("a", 1)) + encode_frame(("b", b"x" * 1000))
    decoder = FrameDecoder(trusted=True)
    got = [m for i in range(len(frames)) for m in decoder.feed(frames[i : i + 1])]
    assert got == [("a", 1), ("b", b"x" * 1000)]


def test_main_process_reads_fronts_as_json_only() -> None:
    decoder = FrameDecoder(trusted=False)
    report = encode_report(("stats", {"root": {"POST": 3}}))
    assert list(decoder.feed(report)) == [("stats", {"root": {"POST": 3}})]
    with pytest.raises(FrameError, match="unreadable frame"):
        list(decoder.feed(encode_frame(("stats", {}))))  # a pickle is refused, not loaded


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8080:interface=127.0.0.1", ("127.0.0.1", 8080, 1024)),
        ("tcp:port=0:interface=127.0.0.1:backlog=50", ("127.0.0.1", 0, 50)),
        ("8080", ("0.0.0.0", 8080, 1024)),
        ("tcp6:8443:interface=\\:\\:1", ("::1", 8443, 1024)),
    ],
)
def test_tcp_listen_address(description: str, expected: tuple[str, int, int]) -> None:
    assert tcp_listen_address(description, "/etc/hsmocsp.yaml", "listen") == expected


@pytest.mark.parametrize("description", ["unix:/run/x.sock", "ssl:443", "tcp:http"])
def test_listen_that_cannot_be_shared(description: str) -> None:
    with pytest.raises(ConfigError, match=r"hsmocsp.yaml: listen:"):
        tcp_listen_address(description, "/etc/hsmocsp.yaml", "listen")


class _SpawningClock(Clock):
    """A Clock that records spawnProcess calls instead of starting anything."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        self.spawned.append(protocol)


def test_failing_front_is_restarted_with_growing_pauses() -> None:
    from twisted.internet.error import ProcessDone
    from twisted.python.failure import Failure

    from hsmocsp.web.front_pool import MAX_RESPAWN_DELAY, RESPAWN_DELAY, FrontPool
    from hsmocsp.web.metrics import Metrics

    clock = _SpawningClock()
    pool = FrontPool(clock, [], Metrics([]), count=1, host="127.0.0.1", port=1,
                     backend="/nowhere", limits=HttpLimits())  # fmt: skip
    pool.startService()
    delays = []
    for _ in range(7):  # each front dies at once
        front = clock.spawned[-1]
        front.processEnded(Failure(ProcessDone(0)))
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert delays[0] == RESPAWN_DELAY and delays[-1] == MAX_RESPAWN_DELAY
    clock.advance(60)  # this one runs a while, then dies: back to the short pause
    clock.spawned[-1].processEnded(Failure(ProcessDone(0)))
    (call,) = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == RESPAWN_DELAY
    pool.stopService()
