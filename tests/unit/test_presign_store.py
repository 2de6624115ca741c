"""Pre-signing through the cache, and the SQLite store across a 'restart'."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from hsmocsp.presign import Presigner
from hsmocsp.status import CertStatus, CRLReason
from hsmocsp.stores.sqlite import ResponseStore
from tests.unit.test_responder import REVOKED_AT, make, parsed, request_for, resolve


def test_presign_fills_cache_then_requests_hit_without_signing() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    for serial in range(10, 40):
        source.statuses[serial] = CertStatus.good()
    presigner = Presigner(handle, clock=clock, rate=100, concurrency=1)
    presigner.start()
    for _ in range(50):
        clock.advance(0.1)
    assert presigner.signed == 32 and signer.calls == 32  # serials 1, 2 and 10..39
    assert not presigner.pending()
    before = signer.calls
    for serial in (1, 2, 25):
        resolve(handle.respond_der(request_for(serial)))
    assert signer.calls == before
    presigner.stop()


def test_presign_yields_to_live_backlog_and_resigns_changes() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    backlog = [5]
    presigner = Presigner(handle, clock=clock, rate=100, signer_backlog=lambda: backlog[0])
    presigner.start()
    clock.advance(1)
    assert signer.calls == 0  # the HSM is busy with live requests: pre-signing waits
    backlog[0] = 0
    clock.advance(1)
    assert signer.calls == 2
    source.set(1, CertStatus.revoked(REVOKED_AT, CRLReason.superseded))
    clock.advance(0.2)
    assert signer.calls == 3  # only the changed serial was signed again
    assert parsed(resolve(handle.respond_der(request_for(1)))).revocation_reason is not None
    presigner.stop()


def test_store_round_trip_and_stale_status_dropped(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)
    store = ResponseStore(tmp_path / "r.sqlite", clock)
    handle.cache.on_store = store.recorder(handle.name, handle.key_hash)
    good = resolve(handle.respond_der(request_for(1)))
    resolve(handle.respond_der(request_for(2)))
    done: list[object] = []
    store.flush().addBoth(done.append)
    _wait(done)

    # "Restart": a new handle, same key; serial 1 was revoked while we were down.
    handle2, source2, signer2 = make(clock)
    source2.statuses[1] = CertStatus.revoked(REVOKED_AT, CRLReason.keyCompromise)
    kept: list[int] = []
    handle2.restore(store.load(handle2.name, handle2.key_hash)).addCallback(kept.append)
    assert kept == [1]  # serial 2 restored, serial 1 dropped
    resolve(handle2.respond_der(request_for(2)))
    assert signer2.calls == 0
    fresh = resolve(handle2.respond_der(request_for(1)))
    assert parsed(fresh).revocation_reason is not None and signer2.calls == 1
    assert good.der != fresh.der
    # Rows of another responder key are not loaded.
    assert list(store.load(handle2.name, b"\x00" * 20)) == []
    stopped: list[object] = []
    store.stop().addBoth(stopped.append)
    _wait(stopped)


def _wait(box: list[object]) -> None:
    """Spin the global reactor's thread pool results in (deferToThread)."""
    import time

    from twisted.internet import reactor

    deadline = time.monotonic() + 10
    while not box and time.monotonic() < deadline:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    assert box and not hasattr(box[0], "getTraceback"), box


def test_presign_keeps_workers_busy_beyond_one_per_tick() -> None:
    """A finished signature starts the next one at once (the rate, not the tick, limits)."""
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    for serial in range(10, 210):
        source.statuses[serial] = CertStatus.good()
    signer.hold = True
    presigner = Presigner(handle, clock=clock, rate=10_000, concurrency=2)
    presigner.start()
    clock.advance(0.1)
    assert signer.calls == 2  # concurrency 2: two in flight
    for _ in range(10):  # within one tick, each completion starts the next signature
        signer.release()
    assert presigner.signed >= 19 and signer.calls >= 21
    presigner.stop()


def test_presigned_response_is_served_by_the_fast_path_on_first_request() -> None:
    from hsmocsp.web.app import OCSPApp
    from hsmocsp.web.fastpath import FastSite

    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    presigner = Presigner(handle, clock=clock, rate=100)
    presigner.start()
    clock.advance(1)
    assert signer.calls == 2
    site = FastSite(OCSPApp([handle], now=clock.seconds), clock.seconds, clock=clock)
    answer = site.answer(
        b"POST", b"/ocsp", b"HTTP/1.1", {b"content-type": b"application/ocsp-request"},
        request_for(2),
    )  # fmt: skip
    assert answer is not None and site.fast_answers == 1 and signer.calls == 2
    presigner.stop()


def test_known_serials_are_signed_again_before_they_expire_unasked() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    start = clock.seconds()
    handle, source, signer = make(clock, validity=100)
    for serial in range(10, 15):
        source.statuses[serial] = CertStatus.good()
    presigner = Presigner(handle, clock=clock, rate=100)
    presigner.start()
    clock.advance(1)
    assert signer.calls == 7  # serials 1, 2 and 10..14
    refresh_at = start + 100 * handle.refresh_fraction
    while clock.seconds() < refresh_at:
        clock.advance(0.5)
    assert signer.calls == 7  # sweeps before the refresh point sign nothing
    while clock.seconds() < start + 99:
        clock.advance(0.5)
    assert signer.calls == 14  # every entry signed again, unasked, before nextUpdate
    clock.advance(30)  # past the first responses' nextUpdate
    calls = signer.calls
    for serial in (1, 2, 12):
        response = resolve(handle.respond_der(request_for(serial)))
        assert response.this_update >= refresh_at
    assert signer.calls == calls  # served from the refreshed entries
    presigner.stop()


def test_a_resweep_of_stale_entries_keeps_to_the_concurrency() -> None:
    """Entries past their refresh point are re-signed a few at a time, not all at once."""
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock, validity=100)
    for serial in range(10, 60):
        source.statuses[serial] = CertStatus.good()
    presigner = Presigner(handle, clock=clock, rate=10_000, concurrency=2)
    presigner.start()
    clock.advance(1)
    assert signer.calls == 52
    signer.hold = True
    while clock.seconds() < 1_750_000_000 + 80:  # past refresh (50), before expiry (100)
        clock.advance(0.5)
        assert len(signer.held) <= 2  # never more than `concurrency` waiting on the HSM
        signer.release()
    assert signer.calls == 104  # and every entry was refreshed
    presigner.stop()
