"""The server role's handle: hot cache -> store -> signer, against a real signing app.

The "signer" here is a real :class:`~hsmocsp.handle.Handle` (file key) behind the real
Klein app, reached through treq's ``StubTreq``; the shared store is an in-memory fake
(the Redis-backed tests are in tests/integration/test_replica_server.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.x509 import ocsp
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from hsmocsp.errors import MalformedRequest, StoreUnavailable, UpstreamFailed
from hsmocsp.handle import Handle, SignedResponse, ocsp_status_for
from hsmocsp.health import READY, Health, State
from hsmocsp.ocsp.request import parse_request
from hsmocsp.ocsp.response import ResponseStatus
from hsmocsp.server.forward import SignerLink
from hsmocsp.server.handle import ServerHandle
from hsmocsp.server.watch import InvalidationWatch
from hsmocsp.status import CertStatus
from hsmocsp.web.app import OCSPApp
from tests.factories import server_handle
from tests.unit.fakes import CountingSigner, DictSource
from tests.unit.test_responder import make, request_for

NOW = 1_750_000_000.0


class FakeStore:
    """A SharedStore in memory: ``held`` makes fetches wait, ``down`` makes them fail."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, bytes], SignedResponse] = {}
        self.fetches = 0
        self.down = False
        self.hold = False
        self.held: list[tuple[Deferred[SignedResponse | None], SignedResponse | None]] = []
        self.listeners: list[Any] = []

    def fetch(self, handle: str, key: bytes, serial: int) -> Deferred[SignedResponse | None]:
        self.fetches += 1
        if self.down:
            return fail(StoreUnavailable("fake store down"))
        value = self.rows.get((handle, key))
        if self.hold:
            d: Deferred[SignedResponse | None] = Deferred()
            self.held.append((d, value))
            return d
        return succeed(value)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, value in held:
            d.callback(value)

    def subscribe(self, on_invalidate: Any, on_subscription: Any = None) -> None:
        self.listeners.append((on_invalidate, on_subscription))
        if on_subscription is not None:
            on_subscription(True)  # subscribed at once, as a reachable Redis does

    def health(self) -> Health:
        return Health(State.FAILED, "fake store down") if self.down else READY


class Signer:
    """The real signing side: a Handle behind the Klein app, as a StubTreq client."""

    def __init__(self, clock: Clock) -> None:
        self.handle, self.source, self.signer = make(clock)
        self.app = OCSPApp([self.handle], now=clock.seconds)
        self.down = False
        self.garbage = False
        self.posts = 0
        outer = self

        class Front(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                outer.posts += request.method == b"POST"
                if outer.garbage:
                    request.setHeader(b"content-type", b"application/ocsp-response")
                    return b"\x30\x03not an OCSP response"
                return outer.app.resource().render(request)

        self.stub = StubTreq(Front())

    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        if self.down:
            return fail(ConnectionRefusedError("signer stopped"))
        return self.stub.request(method, url, **kw)


def server(
    clock: Clock, store: FakeStore | None = None, live: bool = True
) -> tuple[ServerHandle, Signer, FakeStore, InvalidationWatch]:
    signer = Signer(clock)
    store = store or FakeStore()
    watch = InvalidationWatch(clock.seconds, bound=1.0)
    link = SignerLink("http://signer", clock, http_client=signer)
    handle: ServerHandle = server_handle(
        store=store, signer=link, watch=watch, clock=clock, hot_entries=100
    )
    watch.watch([handle])
    if live:
        watch.on_subscription(True)
    return handle, signer, store, watch


def clock_at(t: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


def answer(value: Deferred[SignedResponse] | SignedResponse) -> SignedResponse | ResponseStatus:
    if isinstance(value, SignedResponse):
        return value
    out: list[Any] = []
    value.addCallbacks(out.append, lambda f: out.append(ocsp_status_for(f)))
    assert out, "no answer yet"
    result: SignedResponse | ResponseStatus = out[0]
    return result


def cert_status(value: SignedResponse | ResponseStatus) -> ocsp.OCSPCertStatus:
    assert isinstance(value, SignedResponse), value
    return ocsp.load_der_ocsp_response(value.der).certificate_status


def test_miss_is_forwarded_then_served_from_the_hot_cache() -> None:
    clock = clock_at()
    handle, signer, store, _ = server(clock)
    der = request_for(1)
    assert handle.cached_response(der) is None
    first = answer(handle.respond_der(der))
    assert cert_status(first) is ocsp.OCSPCertStatus.GOOD
    assert signer.posts == 1 and store.fetches == 1
    again = handle.cached_response(der)
    assert again is not None and again.der == first.der  # type: ignore[union-attr]
    assert answer(handle.respond_der(der)) == again
    assert signer.posts == 1 and store.fetches == 1
    assert handle.stats.forwarded == 1 and handle.hot.stats.hits >= 1


def test_revoked_and_unknown_forwarded_as_the_signer_answers() -> None:
    clock = clock_at()
    handle, signer, _, _ = server(clock)
    assert cert_status(answer(handle.respond_der(request_for(2)))) is ocsp.OCSPCertStatus.REVOKED
    assert cert_status(answer(handle.respond_der(request_for(99)))) is ocsp.OCSPCertStatus.UNKNOWN
    # Unknown answers are not kept: asked again, the signer answers (a new certificate
    # must not stay unknown here; a flood of random serials must not fill the hot cache).
    assert handle.cached_response(request_for(99)) is None and len(handle.hot) == 1
    answer(handle.respond_der(request_for(99)))
    assert signer.posts == 3


def test_store_hit_is_served_and_kept_without_asking_the_signer() -> None:
    clock = clock_at()
    handle, signer, store, _ = server(clock)
    der = request_for(1)
    stored = answer(signer.handle.respond_der(der))
    assert isinstance(stored, SignedResponse)
    store.rows[("t", parse_request(der).cert_ids[0].der)] = stored
    got = answer(handle.respond_der(der))
    assert got == stored and signer.posts == 0
    assert handle.cached_response(der) == stored and store.fetches == 1
    assert handle.stats.store_hits == 1


def test_nonce_requests_are_always_forwarded_echoed_and_never_kept() -> None:
    clock = clock_at()
    handle, signer, _, _ = server(clock)
    der = request_for(1, nonce=True)
    for n in (1, 2):
        got = answer(handle.respond_der(der))
        assert isinstance(got, SignedResponse) and not got.cacheable
        ext = ocsp.load_der_ocsp_response(got.der).extensions
        assert ext.get_extension_for_class(__import__("cryptography").x509.OCSPNonce)
        assert signer.posts == n
    assert handle.cached_response(der) is None and len(handle.hot) == 0


def test_malformed_request_is_answered_here_and_never_forwarded() -> None:
    clock = clock_at()
    handle, signer, store, _ = server(clock)
    with pytest.raises(MalformedRequest):
        handle.respond_der(b"\x30\x03\x02\x01\x01")
    assert signer.posts == 0 and store.fetches == 0


def test_signer_down_store_answers_misses_get_try_later_and_it_recovers() -> None:
    clock = clock_at()
    handle, signer, store, _ = server(clock)
    held = request_for(1)
    stored = answer(signer.handle.respond_der(held))
    assert isinstance(stored, SignedResponse)
    store.rows[("t", parse_request(held).cert_ids[0].der)] = stored
    signer.down = True
    assert answer(handle.respond_der(held)) == stored
    assert answer(handle.respond_der(request_for(3))) is ResponseStatus.tryLater
    assert handle.health().state is State.DEGRADED
    assert "signer" in handle.health().reason
    signer.down = False
    assert cert_status(answer(handle.respond_der(request_for(3)))) is ocsp.OCSPCertStatus.UNKNOWN
    assert handle.health() == READY


def test_store_and_signer_down_is_failed_and_try_later() -> None:
    clock = clock_at()
    handle, signer, store, _ = server(clock)
    store.down = True
    signer.down = True
    assert answer(handle.respond_der(request_for(1))) is ResponseStatus.tryLater
    assert handle.health().state is State.FAILED
    assert handle.stats.store_errors == 1 and handle.stats.forward_errors == 1


def test_store_down_forwards_to_the_signer() -> None:
    clock = clock_at()
    handle, signer, store, _ = server(clock)
    store.down = True
    assert cert_status(answer(handle.respond_der(request_for(1)))) is ocsp.OCSPCertStatus.GOOD
    assert signer.posts == 1 and handle.stats.store_errors == 1
    assert handle.health().state is State.DEGRADED


def test_garbage_from_the_signer_is_internal_error_logged_once(logged_errors: Any) -> None:
    clock = clock_at()
    handle, signer, _, _ = server(clock)
    signer.garbage = True
    app = OCSPApp([handle], now=clock.seconds)
    seen: list[Any] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(seen.append)
    try:
        for serial in (1, 3, 4):
            outcome = app.outcome(handle, request_for(serial))
            assert answer(outcome) is ResponseStatus.internalError  # type: ignore[arg-type]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if "not a usable OCSP" in e.get("log_format", "")]
    assert len(lines) == 1
    assert handle.signer.invalid == 3
    signer.garbage = False
    assert cert_status(answer(handle.respond_der(request_for(1)))) is ocsp.OCSPCertStatus.GOOD
    assert not logged_errors.events


def test_garbage_is_an_upstream_failure() -> None:
    clock = clock_at()
    handle, signer, _, _ = server(clock)
    signer.garbage = True
    d = handle.respond_der(request_for(1))
    assert isinstance(d, Deferred)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(UpstreamFailed)


def test_concurrent_misses_share_one_lookup() -> None:
    clock = clock_at()
    store = FakeStore()
    store.hold = True
    handle, signer, _, _ = server(clock, store)
    der = request_for(1)
    waiting = [handle.respond_der(der) for _ in range(5)]
    assert store.fetches == 1
    store.release()
    results = [answer(w) for w in waiting]
    assert signer.posts == 1
    assert all(r == results[0] for r in results)


def test_invalidation_drops_the_serial_and_the_next_request_asks_again() -> None:
    clock = clock_at()
    handle, signer, _, watch = server(clock)
    der = request_for(1)
    assert cert_status(answer(handle.respond_der(der))) is ocsp.OCSPCertStatus.GOOD
    # The signer loads a revocation, and publishes it.
    signer.source.set(1, CertStatus.revoked(__import__("datetime").datetime.now()))
    watch.on_invalidate("t", frozenset({1}))
    assert handle.cached_response(der) is None
    assert cert_status(answer(handle.respond_der(der))) is ocsp.OCSPCertStatus.REVOKED
    assert handle.stats.invalidated == 1


def test_invalidation_during_a_lookup_is_not_cached_but_looked_up_again() -> None:
    clock = clock_at()
    store = FakeStore()
    handle, signer, _, watch = server(clock, store)
    der = request_for(1)
    key = parse_request(der).cert_ids[0].der
    good = answer(signer.handle.respond_der(der))
    assert isinstance(good, SignedResponse)
    store.rows[("t", key)] = good
    store.hold = True
    pending = handle.respond_der(der)
    # Meanwhile the signer revokes: deletes the stored row, publishes the serial.
    signer.source.set(1, CertStatus.revoked(__import__("datetime").datetime.now()))
    del store.rows[("t", key)]
    watch.on_invalidate("t", frozenset({1}))
    store.hold = False
    store.release()  # the first fetch read the old (good) row
    assert cert_status(answer(pending)) is ocsp.OCSPCertStatus.REVOKED
    assert store.fetches == 2
    cached = handle.cached_response(der)
    assert cached is not None and cert_status(cached) is ocsp.OCSPCertStatus.REVOKED


def test_subscription_down_hot_cache_trusted_only_within_the_bound() -> None:
    clock = clock_at()
    handle, signer, _store, watch = server(clock)
    der = request_for(1)
    answer(handle.respond_der(der))
    watch.on_subscription(False)
    assert handle.cached_response(der) is None  # could have missed a revocation
    posts = signer.posts
    assert cert_status(answer(handle.respond_der(der))) is ocsp.OCSPCertStatus.GOOD
    assert signer.posts == posts + 1  # re-checked (the store has nothing here)
    assert handle.cached_response(der) is not None  # re-checked just now
    clock.advance(1.5)
    assert handle.cached_response(der) is None
    # A revocation nobody told us about is seen by the next re-check.
    signer.source.set(1, CertStatus.revoked(__import__("datetime").datetime.now()))
    assert cert_status(answer(handle.respond_der(der))) is ocsp.OCSPCertStatus.REVOKED
    assert handle.health().state is State.DEGRADED


def test_subscription_back_empties_the_hot_cache() -> None:
    clock = clock_at()
    handle, _, _, watch = server(clock)
    der = request_for(1)
    answer(handle.respond_der(der))
    watch.on_subscription(False)
    watch.on_subscription(True)
    assert len(handle.hot) == 0 and handle.cached_response(der) is None


def test_before_the_first_subscription_nothing_is_trusted_beyond_the_bound() -> None:
    clock = clock_at()
    handle, _signer, _, _ = server(clock, live=False)
    der = request_for(1)
    answer(handle.respond_der(der))
    assert handle.cached_response(der) is not None
    clock.advance(1.1)
    assert handle.cached_response(der) is None


def test_request_timeout_to_a_silent_signer_is_try_later() -> None:
    clock = clock_at()
    handle, _signer, _store, _ = server(clock)

    class Silent:
        def request(self, *a: Any, **kw: Any) -> Deferred[Any]:
            return Deferred()

    handle.signer._http = Silent()
    d = handle.respond_der(request_for(1))
    assert isinstance(d, Deferred) and not d.called
    clock.advance(handle.signer.timeout + 0.1)
    assert answer(d) is ResponseStatus.tryLater


def test_queue_bound_gives_try_later_at_once() -> None:
    clock = clock_at()
    handle, _, _, _ = server(clock)

    class Silent:
        def request(self, *a: Any, **kw: Any) -> Deferred[Any]:
            return Deferred()

    link = SignerLink("http://signer", clock, http_client=Silent(), max_connections=1, max_queue=2)
    handle.signer = link
    waiting = [handle.respond_der(request_for(100 + n)) for n in range(4)]
    statuses = [w.called for w in waiting]  # type: ignore[union-attr]
    assert statuses == [False, False, False, True]
    assert answer(waiting[3]) is ResponseStatus.tryLater
    clock.advance(10)  # the others time out: tryLater too
    assert [answer(w) for w in waiting[:3]] == [ResponseStatus.tryLater] * 3


def test_cached_answers_cost_the_signer_nothing() -> None:
    # The fake signer counts signatures: a cached answer on the server costs none.
    clock = clock_at()
    handle, signer, _, _ = server(clock)
    der = request_for(1)
    answer(handle.respond_der(der))
    before = signer.signer.calls
    for _ in range(10):
        assert handle.cached_response(der) is not None
    assert signer.signer.calls == before
    assert isinstance(signer.handle, Handle)
    assert isinstance(signer.source, DictSource) and isinstance(signer.signer, CountingSigner)


def test_a_connection_the_restarted_signer_closed_is_retried_once() -> None:
    from twisted.web._newclient import ResponseNeverReceived

    clock = clock_at()
    handle, signer, _, _ = server(clock)
    real = handle.signer._http
    calls: list[str] = []

    class Stale:
        def request(self, *a: Any, **kw: Any) -> Deferred[Any]:
            calls.append(a[1])
            if len(calls) == 1:
                return fail(ResponseNeverReceived([]))
            return real.request(*a, **kw)  # type: ignore[no-any-return]

    handle.signer._http = Stale()
    assert cert_status(answer(handle.respond_der(request_for(1)))) is ocsp.OCSPCertStatus.GOOD
    assert len(calls) == 2 and signer.posts == 1


def test_the_signers_error_statuses_are_relayed_and_never_kept() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    clock = clock_at()
    handle, signer, _, _ = server(clock)
    foreign = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        b"\x01" * 20, b"\x02" * 20, 7, hashes.SHA1()
    ).build().public_bytes(Encoding.DER)
    for n in (1, 2):
        assert answer(handle.respond_der(foreign)) is ResponseStatus.unauthorized
        assert signer.posts == n
    assert len(handle.hot) == 0
