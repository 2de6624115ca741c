"""The main process and a front talking over their pipe, both in this process.

:class:`FrontPool` (main side) spawns a "process" whose stdin is a real front's
:class:`~hsmocsp.web.front_process._Control` and whose stdout comes back to the pool: every
frame goes through the real encoders and decoders, so what a front holds is what the
pipe gave it. Issue #11: a front must not hold a copy of the main cache (memory per
front grew with the number of entries); it holds what its clients ask for, up to
``hot_cache_entries``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hsmocsp.handle import Handle
from hsmocsp.ocsp.request import parse_request
from hsmocsp.web.front_pool import FrontPool
from hsmocsp.web.front_process import _Control
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.metrics import Metrics
from tests.unit.test_fastpath import ADDR, post, split
from tests.unit.test_responder import make, request_for, resolve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _FrontReactor(Clock):
    """The front's reactor: its port is adopted here (nothing listens), it runs."""

    running = True

    def adoptStreamPort(self, fd: int, family: Any, factory: Any) -> None:
        self.factory = factory

    def stop(self) -> None:
        self.running = False


class _ToMain:
    """The front's stdout: what it writes reaches the pool's Child at once."""

    def __init__(self, child: Any) -> None:
        self.child = child

    def write(self, data: bytes) -> None:
        self.child.childDataReceived(1, data)


class _FrontProcess:
    """What the pool holds as the process transport: writes go to the front's stdin."""

    def __init__(self, control: _Control) -> None:
        self.control = control
        self.pid = 4242
        self.pipes: dict[int, Any] = {}
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.control.dataReceived(data)

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, signal: str) -> None:
        pass


class _MainReactor(Clock):
    def __init__(self, front_clock: _FrontReactor) -> None:
        super().__init__()
        self.front_clock = front_clock
        self.controls: list[_Control] = []
        self.processes: list[_FrontProcess] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> _FrontProcess:
        control = _Control(self.front_clock)
        control.transport = _ToMain(protocol)  # type: ignore[assignment]
        self.controls.append(control)
        self.processes.append(_FrontProcess(control))
        return self.processes[-1]


def start(hot: int | None = None, entries_before: int = 0) -> tuple[Handle, FrontPool, _Control,
                                                                    _MainReactor]:  # fmt: skip
    front_clock = _FrontReactor()
    reactor = _MainReactor(front_clock)
    for c in (reactor, front_clock):
        c.advance(1_750_000_000)
    handle, _, _ = make(reactor)
    fill(handle, range(100, 100 + entries_before))
    extra = {} if hot is None else {"hot_cache_entries": hot}
    pool = FrontPool(reactor, [handle], Metrics([handle]), count=1, host="127.0.0.1", port=0,
                     backend="/nowhere", limits=HttpLimits(), **extra)  # fmt: skip
    pool.startService()
    (control,) = reactor.controls
    assert pool.starting() is None  # it said "ready"
    return handle, pool, control, reactor


def fill(handle: Handle, serials: range) -> None:
    """Cache entries for ``serials`` as signing would (one real response, new keys)."""
    if not serials:
        return
    template = resolve(handle.respond_der(request_for(1)))
    for serial in serials:
        key = parse_request(request_for(serial)).cert_ids[0].der
        handle.cache.put(key, serial, dataclasses.replace(template, der=b"%d" % serial))


def held(control: _Control) -> int:
    return sum(len(replica) for replica in control._replicas)


def ask(control: _Control, der: bytes) -> bytes:
    assert control.site is not None
    proto: Protocol = control.site.buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(post(der))
    return transport.value()


def test_a_front_holds_no_copy_of_the_main_cache() -> None:
    handle, pool, control, _ = start(entries_before=200)
    fill(handle, range(1000, 1300))
    assert len(handle.cache) == 501  # the 200, the 300, and request_for(1)'s
    # Nobody asked this front anything: it holds nothing (it held all 501 before #11).
    assert held(control) == 0
    pool.stopService()


def test_a_front_holds_what_it_is_asked_for_up_to_its_bound() -> None:
    handle, pool, control, _ = start(hot=50)
    fill(handle, range(1000, 1300))
    for serial in range(1000, 1300):
        req = request_for(serial)
        head, _ = split(ask(control, req))
        assert head.startswith(b"HTTP/1.1 503")  # a miss: relayed (no main socket here)
        head, body = split(ask(control, req))  # the want was answered at once
        assert head.startswith(b"HTTP/1.1 200") and body == b"%d" % serial
        assert held(control) <= 50
    assert held(control) == 50
    (replica,) = control._replicas
    assert replica.cache.cache.stats.evicted == 250
    assert len(replica.cache.keys) <= 300  # only answered requests remembered
    pool.stopService()


def test_a_want_before_signing_is_answered_when_the_response_is_stored() -> None:
    handle, pool, control, _ = start()
    req = request_for(1)
    assert split(ask(control, req))[0].startswith(b"HTTP/1.1 503")
    assert held(control) == 0
    resolve(handle.respond_der(req))  # the main process answers the relayed request
    assert held(control) == 1
    head, body = split(ask(control, req))
    assert head.startswith(b"HTTP/1.1 200")
    assert body == resolve(handle.respond_der(req)).der
    pool.stopService()


def test_revocation_reaches_the_front_and_it_asks_again() -> None:
    handle, pool, control, _ = start()
    req = request_for(1)
    resolve(handle.respond_der(req))
    ask(control, req)
    assert held(control) == 1
    handle.cache.invalidate([1])  # what the source's on_change does on a revocation
    assert held(control) == 0
    assert split(ask(control, req))[0].startswith(b"HTTP/1.1 503")  # relayed, not stale
    pool.stopService()


def test_past_its_refresh_point_a_front_relays_and_gets_the_refreshed_answer() -> None:
    handle, pool, control, reactor = start()
    req = request_for(1)
    first = resolve(handle.respond_der(req))
    ask(control, req)
    assert split(ask(control, req))[1] == first.der
    for c in (reactor, control._reactor):
        c.advance(first.refresh_at - c.seconds())
    assert split(ask(control, req))[0].startswith(b"HTTP/1.1 503")  # relayed: main refreshes
    refreshed = resolve(handle.respond_der(req))  # served stale, refresh signed meanwhile
    assert handle.cache.current(parse_request(req).cert_ids[0].der) is not first
    assert split(ask(control, req))[1] != first.der
    assert refreshed is not None
    pool.stopService()


def test_unknown_serials_are_never_given_to_fronts() -> None:
    handle, pool, control, _ = start()
    req = request_for(77)  # the fake source does not know 77
    resolve(handle.respond_der(req))  # kept apart in the main cache (anyone can ask for any)
    ask(control, req)
    assert held(control) == 0
    assert pool._pending[0] == {}  # and no pending want either (one asked before the main
    pool.stopService()  # process answered stays pending until pushed out: MAX_PENDING)


def test_a_flood_of_wants_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from hsmocsp.web import front_pool as fronts

    monkeypatch.setattr(fronts, "MAX_PENDING", 100)
    _, pool, _, _ = start()
    (front,) = pool.fronts.values()
    for _ in range(1000):
        front.child.childDataReceived(1, _report(("want", 0, _b64(os.urandom(40)))))
    assert len(pool._pending[0]) == 100
    assert not front.child.killed
    pool.stopService()


@pytest.mark.parametrize("message", [
    ("want", 1, "AAAA"),  # no such handle
    ("want", True, "AAAA"),
    ("want", 0, "A" * 2000),  # far longer than any CertID
    ("want", 0, "not base64!"),
    ("want", 0, 12),
    ("held", -1),
])  # fmt: skip
def test_a_bad_report_gets_the_front_killed(message: tuple[Any, ...]) -> None:
    _, pool, _, _ = start()
    (front,) = pool.fronts.values()
    front.child.childDataReceived(1, _report(message))
    assert front.child.killed or message[0] == "held"
    pool.stopService()


def test_counts_from_a_front_go_through_the_handle() -> None:
    handle, pool, control, _ = start()
    req = request_for(1)
    resolve(handle.respond_der(req))
    hits = handle.cache.stats.hits
    ask(control, req)
    ask(control, req)
    ask(control, req)
    control._report()
    assert handle.cache.stats.hits == hits + 2
    assert pool.holding == {1: 1}
    pool.stopService()


def _report(message: tuple[Any, ...]) -> bytes:
    from hsmocsp.web.front_process import encode_report

    return encode_report(message)


def _b64(key: bytes) -> str:
    import base64

    return base64.b64encode(key).decode()
