"""Pre-signing that fits a slow token: order by need, capacity, health, progress.

Time is a ``task.Clock``; the token is :class:`SerialSigner`, which signs one
request at a time and takes ``latency`` seconds of that clock per signature, as a
smart card does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from hsmocsp.errors import SignerUnavailable
from hsmocsp.handle import Handle, SignedResponse
from hsmocsp.health import State
from hsmocsp.ocsp.request import make_cert_id
from hsmocsp.ocsp.response import issuer_hashes
from hsmocsp.presign import Presigner
from hsmocsp.status import CertStatus
from hsmocsp.stores.sqlite import ResponseStore
from tests.unit.fakes import CountingSigner
from tests.unit.test_responder import REVOKED_AT, make, request_for, resolve

T0 = 1_750_000_000.0


class SerialSigner(CountingSigner):
    """One signature at a time, ``latency`` seconds of ``clock`` each."""

    def __init__(self, clock: Clock, latency: float) -> None:
        super().__init__()
        self.clock = clock
        self.latency = latency
        self._free_at = 0.0

    def sign(self, data: bytes) -> Deferred[bytes]:
        self.calls += 1
        now = self.clock.seconds()
        start = max(now, self._free_at)
        self._free_at = start + self.latency
        d: Deferred[bytes] = Deferred()
        signature = self.inner.sign(data)
        self.clock.callLater(self._free_at - now, lambda: signature.chainDeferred(d))
        return d


class Stored:
    """Cache observer: the serials in the order their responses were stored."""

    def __init__(self) -> None:
        self.serials: list[int] = []

    def stored(self, key: bytes, serial: int, value: Any) -> None:
        self.serials.append(serial)

    def dropped(self, key: bytes) -> None:
        pass

    def invalidated(self, serials: frozenset[int] | None) -> None:
        pass


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "hsmocsp.presign":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def setup(
    validity: float = 100, serials: range = range(10, 20), latency: float | None = None
) -> tuple[Clock, Handle, Any, Stored]:
    clock = Clock()
    clock.advance(T0)
    handle, source, signer = make(clock, validity=validity)
    if latency is not None:
        signer = SerialSigner(clock, latency)
        handle.signer = signer
    for serial in serials:
        source.statuses[serial] = CertStatus.good()
    stored = Stored()
    handle.cache.observers.append(stored)
    return clock, handle, signer, stored


def key_of(handle: Handle, serial: int) -> bytes:
    issuer = handle.source.issuers()[0]
    return make_cert_id("sha1", *issuer_hashes(issuer, "sha1"), serial).der


def sign_unasked(handle: Handle, serial: int) -> SignedResponse:
    """Put a freshly signed response in the cache as pre-signing would (nobody asked)."""
    issuer = handle.source.issuers()[0]
    cid = make_cert_id("sha1", *issuer_hashes(issuer, "sha1"), serial)
    d = handle.cache.refresh(cid.der, serial, lambda: handle.produce_single(cid, issuer))
    assert d is not None
    return resolve(d)


def run(clock: Clock, seconds: float, step: float = 0.125) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_entries_past_their_refresh_point_are_signed_oldest_first() -> None:
    clock, handle, _signer, stored = setup()
    for serial in reversed(range(10, 20)):  # 19 signed first: its refresh point comes first
        sign_unasked(handle, serial)
        clock.advance(1)
    clock.advance(70 - 10)  # every refresh point (T0 + 50 .. 59) has passed; none expired
    stored.serials.clear()
    presigner = Presigner(handle, clock=clock, rate=1, concurrency=1)
    presigner.start()
    run(clock, 15)
    # Serials never signed (1 and 2: clients miss on them now) first, then the oldest
    # response first: not the source's order.
    assert stored.serials == [1, 2, *reversed(range(10, 20))]
    presigner.stop()


def test_serials_clients_asked_for_are_refreshed_before_the_others() -> None:
    clock, handle, _signer, stored = setup(serials=range(10, 30), latency=0.5)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 12)
    assert len(stored.serials) == 22 and not presigner.pending()
    clock.advance(10)
    for serial in (27, 25):  # cache hits: nothing is signed, but now we know they matter
        assert isinstance(handle.respond_der(request_for(serial)), SignedResponse)
    stored.serials.clear()
    clock.advance(50)  # one jump past every refresh point (T0 + 50 .. 61): all due at once
    run(clock, 15)
    assert stored.serials[:2] == [25, 27]  # asked for: first, in refresh order among them
    assert sorted(stored.serials) == sorted([1, 2, *range(10, 30)])  # then all the others
    presigner.stop()


def test_each_entry_is_re_signed_at_its_own_refresh_point_not_in_bursts() -> None:
    clock, handle, _signer, _stored = setup(validity=100, latency=0.25)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 5)
    serials = (1, 2, *range(10, 20))
    first = {serial: handle.cache.current(key_of(handle, serial)) for serial in serials}
    assert all(v is not None for v in first.values())
    run(clock, 60)
    for serial, old in first.items():
        assert old is not None
        new = handle.cache.current(key_of(handle, serial))
        assert new is not None and new is not old
        # Signed again within a tick or two of its refresh point (the token is free;
        # produced_at is thisUpdate, in whole seconds).
        assert int(old.refresh_at) <= new.produced_at <= old.refresh_at + 1
    presigner.stop()


def test_capacity_line_when_the_token_keeps_up(logged: list[str]) -> None:
    clock, handle, _signer, _stored = setup(validity=1000, serials=range(10, 60), latency=0.5)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 30)
    capacity = [line for line in logged if "capacity" in line]
    assert len(capacity) == 1, logged
    line = capacity[0]
    # 52 responses re-signed every 500 s need 0.104 sig/s; the token gives 2 sig/s.
    assert "52 responses" in line and "0.10 sig/s needed" in line and "2.00 sig/s" in line
    assert "fits" in line and "does not fit" not in line
    assert presigner.measured_rate() == pytest.approx(2.0, rel=0.05)
    assert presigner.needed_rate() == pytest.approx(52 / 500)
    assert presigner.health().state is State.READY
    assert presigner.min_margin() == pytest.approx(1000 - 30 + 0.5, abs=1)
    presigner.stop()


def test_capacity_line_and_degraded_health_when_the_token_cannot_keep_up(
    logged: list[str],
) -> None:
    # 52 responses, validity 100, refresh at half life: 1.04 sig/s needed; 0.5 delivered.
    clock, handle, _signer, _stored = setup(validity=100, serials=range(10, 60), latency=2)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 20)
    capacity = [line for line in logged if "capacity" in line]
    assert len(capacity) == 1, logged
    assert "does not fit" in capacity[0] and "1.04 sig/s needed" in capacity[0]
    assert "0.50 sig/s" in capacity[0]
    # validity that would fit: 52 / (0.5 * 0.5) = 208 s
    assert "validity of 208 s" in capacity[0]
    health = presigner.health()
    assert health.state is State.DEGRADED and "does not fit" in health.reason
    presigner.stop()


def test_when_behind_nothing_expired_is_served_and_the_oldest_are_renewed_first() -> None:
    clock, handle, _signer, stored = setup(validity=100, serials=range(10, 60), latency=2)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    served_expired = 0
    for _ in range(300):
        run(clock, 1)
        now = clock.seconds()
        for serial in (1, 10, 33, 59):
            value = handle.cache.peek(key_of(handle, serial))
            if value is not None and value.expires_at <= now:
                served_expired += 1
    assert served_expired == 0
    assert presigner.expired > 0  # the token could not keep up: some expired unrenewed
    assert presigner.health().state is State.DEGRADED
    # Oldest first: the order of renewals repeats the order of the first signatures.
    first_round = stored.serials[:52]
    assert stored.serials[52:104] == first_round
    presigner.stop()


def test_refresh_first_puts_chosen_entries_ahead_of_everything() -> None:
    clock, handle, _signer, stored = setup(latency=0.5)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 10)
    assert not presigner.pending()
    stored.serials.clear()
    wanted = {key_of(handle, 14), key_of(handle, 12)}
    assert presigner.refresh_first(lambda key, value: key in wanted) == 2
    run(clock, 2)
    assert sorted(stored.serials) == [12, 14]  # fresh, yet signed again at once
    presigner.stop()


def test_progress_is_logged_at_start_every_minute_and_at_the_end(logged: list[str]) -> None:
    clock, handle, _signer, _stored = setup(validity=86400, serials=range(10, 108), latency=1)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 150)
    progress = [line for line in logged if "capacity" not in line]
    assert "100 responses to sign" in progress[0]
    minute = [line for line in progress if "ETA" in line]
    assert len(minute) == 1, progress  # one run of ~100 s: one line at 60 s
    assert re.search(r" (0\.9\d|1\.0\d) sig/s", minute[0]) and "/100 signed" in minute[0]
    assert "done" in progress[-1] and "100 signed" in progress[-1]
    presigner.stop()


def test_a_restart_re_signs_nothing_that_is_still_fresh(tmp_path: Any) -> None:
    clock, handle, signer, _stored = setup(validity=1000)
    store = ResponseStore(tmp_path / "r.sqlite", clock)
    handle.cache.on_store = store.recorder(handle.name, handle.key_hash)
    presigner = Presigner(handle, clock=clock, rate=100)
    presigner.start()
    run(clock, 2)
    presigner.stop()
    assert signer.calls == 12
    done: list[object] = []
    store.flush().addBoth(done.append)
    from tests.unit.test_presign_store import _wait

    _wait(done)
    clock.advance(100)
    handle2, source2, signer2 = make(clock, validity=1000)
    for serial in range(10, 20):
        source2.statuses[serial] = CertStatus.good()
    kept: list[int] = []
    handle2.restore(store.load(handle2.name, handle2.key_hash)).addCallback(kept.append)
    assert kept == [12]
    presigner2 = Presigner(handle2, clock=clock, rate=100)
    presigner2.start()
    run(clock, 10)
    assert signer2.calls == 0
    presigner2.stop()
    stopped: list[object] = []
    store.stop().addBoth(stopped.append)
    _wait(stopped)


def test_a_one_off_request_for_an_unlisted_certid_is_refreshed_only_when_asked_again() -> None:
    clock, handle, _signer, stored = setup(validity=100, latency=0.25)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 5)
    handle.respond_der(request_for(10, alg="sha256"))  # a listed serial, another hash
    handle.respond_der(request_for(77))  # never issued: answered, kept apart (transient)
    run(clock, 1)
    assert stored.serials[-1:] == [10]
    signatures = handle.signatures
    stored.serials.clear()
    run(clock, 55)  # past every refresh point
    assert stored.serials.count(10) == 1  # the sha1 entry only
    assert handle.signatures - signatures == 12  # the listed ones; not 77, not sha256
    sha256 = handle.respond_der(request_for(10, alg="sha256"))
    assert isinstance(sha256, SignedResponse)  # stale, served, its refresh claimed
    run(clock, 1)
    assert stored.serials.count(10) == 2  # asked again past its refresh point: renewed
    run(clock, 60)
    assert stored.serials.count(10) == 3  # the sha1 entry again; sha256 not, unasked
    presigner.stop()


def test_a_failing_token_pauses_pre_signing_once_with_back_off_and_it_recovers(
    logged: list[str],
) -> None:
    clock, handle, signer, stored = setup(validity=1000)
    signer.fail_with = SignerUnavailable("no signing worker up")
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 30)
    assert stored.serials == [] and signer.calls <= 8  # backed off: 1, 2, 4, 8, 16 s
    paused = [line for line in logged if "paused" in line]
    assert len(paused) == 1 and "no signing worker up" in paused[0]  # said once
    health = presigner.health()
    assert health.state is State.DEGRADED and "no signing worker up" in health.reason
    signer.fail_with = None
    run(clock, 40)
    assert sorted(stored.serials) == [1, 2, *range(10, 20)]  # recovered by itself
    assert any("signing again" in line for line in logged)
    assert presigner.health().state is State.READY
    presigner.stop()


def test_a_source_reload_logs_the_capacity_line_again_and_signs_the_change_first(
    logged: list[str],
) -> None:
    clock, handle, _signer, stored = setup(validity=1000, latency=0.5)
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    run(clock, 10)
    assert len([line for line in logged if "capacity" in line]) == 1
    stored.serials.clear()
    for serial in range(20, 30):  # ten new certificates, then one revocation
        handle.source.statuses[serial] = CertStatus.good()  # type: ignore[attr-defined]
    handle.source.set(15, CertStatus.revoked(REVOKED_AT))  # type: ignore[attr-defined]
    run(clock, 10)
    assert stored.serials[0] == 15  # the changed status first
    assert sorted(stored.serials[1:]) == list(range(20, 30))  # then what the rescan found
    capacity = [line for line in logged if "capacity" in line]
    assert len(capacity) == 2 and "22 responses" in capacity[1]
    presigner.stop()


def test_a_token_that_cannot_keep_up_makes_the_handle_degraded_through_the_service(
    logged: list[str],
) -> None:
    # The same numbers as above, started the way the service starts it: the handle's
    # health (and so /readyz) must say so, not only the pre-signer's own metric.
    from hsmocsp.service.service import PresignService

    clock, handle, _signer, _stored = setup(validity=100, serials=range(10, 60), latency=2)
    assert handle.health().state is State.READY
    service = PresignService(handle, clock, rate=100, concurrency=1)
    service.startService()
    run(clock, 20)
    health = handle.health()
    assert health.state is State.DEGRADED
    assert health.reason.startswith("pre-signing: ") and "does not fit" in health.reason
    service.stopService()
