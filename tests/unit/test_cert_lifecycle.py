"""Responder certificate over time: nextUpdate cap, expiry, renewal, restore; handle health.

Certificates are made here with cryptography (the test CA's key signs a responder
certificate for the test responder key, with the validity each test needs); time is a
``task.Clock`` set to the present.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hsmocsp.errors import ResponderCertError
from hsmocsp.handle import Handle, SignedResponse, ocsp_status_for
from hsmocsp.health import Health, State
from hsmocsp.ocsp.response import ResponseStatus
from hsmocsp.presign import Presigner
from hsmocsp.status import CertStatus
from tests.factories import handle as make_handle
from tests.unit.fakes import VECTORS, CountingSigner, DictSource, der, load_cert
from tests.unit.test_responder import request_for, resolve

NOW = float(int(time.time()))


def _key(name: str) -> object:
    return serialization.load_pem_private_key((VECTORS / name).read_bytes(), None)


def responder_cert(
    not_after: float, not_before: float = NOW - 86400, key: str = "responder_rsa.key",
    eku: bool = True,
) -> x509.Certificate:
    """A delegated OCSP signer certificate from the test CA for ``key``."""
    ca = load_cert("ca.pem")
    public = _key(key).public_key()  # type: ignore[attr-defined]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test responder")]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.fromtimestamp(not_before, UTC))
        .not_valid_after(datetime.fromtimestamp(not_after, UTC))
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return builder.sign(_key("ca.key"), hashes.SHA256())  # type: ignore[arg-type]


def make(
    clock: Clock, cert: x509.Certificate, validity: float = 3600
) -> tuple[Handle, DictSource, CountingSigner]:
    source = DictSource(load_cert("ca.pem"), {n: CertStatus.good() for n in range(1, 6)})
    signer = CountingSigner()
    handle: Handle = make_handle(
        source=source, signer=signer, responder_cert=cert, validity=validity, clock=clock
    )
    handle.prepare()
    return handle, source, signer


def clock_at(when: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def embedded(resp: SignedResponse) -> x509.Certificate:
    certs = ocsp.load_der_ocsp_response(resp.der).certificates
    assert len(certs) == 1
    return certs[0]


def failure_of(value: Deferred[SignedResponse] | SignedResponse) -> Failure:
    assert isinstance(value, Deferred)
    out: list[Failure] = []
    value.addErrback(out.append)
    assert out, "no failure"
    return out[0]


def test_next_update_never_later_than_the_certificate() -> None:
    clock = clock_at()
    handle, _, _ = make(clock, responder_cert(NOW + 600), validity=3600)
    resp = resolve(handle.respond_der(request_for(1)))
    parsed = ocsp.load_der_ocsp_response(resp.der)
    assert parsed.next_update_utc is not None
    assert parsed.next_update_utc.timestamp() == NOW + 600
    assert resp.next_update == NOW + 600 and resp.refresh_at <= NOW + 600
    # A long-lived certificate leaves the configured validity alone.
    handle2, _, _ = make(clock, responder_cert(NOW + 86400 * 30), validity=3600)
    assert resolve(handle2.respond_der(request_for(1))).next_update == NOW + 3600


def test_expired_certificate_is_never_served_and_the_handle_fails() -> None:
    clock = clock_at()
    cert = responder_cert(NOW + 600)
    handle, source, signer = make(clock, cert, validity=3600)
    req = request_for(1)
    resolve(handle.respond_der(req))
    assert handle.cached_response(req) is not None
    assert handle.health() == Health(State.READY)
    clock.advance(600)
    # Not from the cache, not from the fast path, and nothing new is signed with it.
    assert handle.cached_response(req) is None
    failure = failure_of(handle.respond_der(req))
    assert ocsp_status_for(failure) == ResponseStatus.tryLater
    assert signer.calls == 1
    health = handle.health()
    assert health.state is State.FAILED and "expired" in health.reason
    # The source's issuers change under it (a Vault refresh): still tryLater, not an
    # internalError from re-checking the expired certificate against them.
    clock.advance(1)
    source.issuer = x509.load_der_x509_certificate(der(source.issuer))
    failure = failure_of(handle.respond_der(request_for(2)))
    assert ocsp_status_for(failure) == ResponseStatus.tryLater


def test_renewal_serves_old_while_valid_resigns_it_first_then_new() -> None:
    clock = clock_at()
    old = responder_cert(NOW + 86400 * 10)
    handle, source, signer = make(clock, old)
    presigner = Presigner(handle, clock=clock, rate=1000, concurrency=1)
    presigner.start()
    clock.advance(0.1)
    for _ in range(20):
        clock.advance(0.1)
    keys = {key for key, _, _ in handle.cache.items()}
    assert len(keys) == 5 and all(embedded(v) == old for _, _, v in handle.cache.items())
    # Live requests with another hash: cached too, made with the old certificate.
    live = request_for(2, "sha256")
    assert embedded(resolve(handle.respond_der(live))) == old

    new = responder_cert(NOW + 86400 * 365)
    signer.hold = True  # see the order in which the pre-signer asks
    assert handle.replace_responder_cert(new) is True
    assert len(handle.stale_by_certificate()) == 6
    # Still served meanwhile (the old certificate is valid)...
    assert handle.cached_response(request_for(3)) is not None
    source.set(5, CertStatus.good())  # a source change queues serial 5 for the sweep
    clock.advance(0.1)
    while signer.held:
        signer.release()
        clock.advance(0.1)
    # ...and every response is re-signed with the new certificate, the live one included.
    assert {embedded(v) for _, _, v in handle.cache.items()} == {new}
    assert embedded(resolve(handle.respond_der(live))) == new
    assert handle.stale_by_certificate() == []
    # Unchanged certificate: nothing to do.
    assert handle.replace_responder_cert(new) is False
    presigner.stop()


def test_stale_entries_are_resigned_before_the_sweep() -> None:
    clock = clock_at()
    handle, _, signer = make(clock, responder_cert(NOW + 86400 * 10))
    # The sweep walks serials 1..5 in order; the stale entries are the last two.
    for serial, alg in ((4, "sha256"), (5, "sha1")):
        resolve(handle.respond_der(request_for(serial, alg)))
    handle.replace_responder_cert(responder_cert(NOW + 86400 * 365))
    stale = {key for key, _ in handle.stale_by_certificate()}
    signer.hold = True
    presigner = Presigner(handle, clock=clock, rate=1000, concurrency=1)
    presigner.start()
    clock.advance(0.1)
    # The first signatures started are the two stale entries, not the sweep's serials 1..3.
    first: list[bytes] = []
    while len(first) < 2:
        assert signer.held
        before = {k for k, _, v in handle.cache.items() if v.cert_fp != handle.cert_fp}
        signer.release()
        after = {k for k, _, v in handle.cache.items() if v.cert_fp != handle.cert_fp}
        first += list(before - after)
        clock.advance(0.1)
    assert set(first) == stale
    presigner.stop()


def test_replacement_must_pass_the_start_up_checks() -> None:
    clock = clock_at()
    current = responder_cert(NOW + 86400)
    handle, _, _ = make(clock, current)
    for bad, why in (
        (responder_cert(NOW + 86400, key="responder_ec.key"), "does not match the signer"),
        (responder_cert(NOW - 10, not_before=NOW - 1000), "not valid now"),
        (responder_cert(NOW + 86400, eku=False), "lacks extendedKeyUsage"),
    ):
        with pytest.raises(ResponderCertError, match=why):
            handle.replace_responder_cert(bad)
        assert handle.responder_cert == current
    resp = resolve(handle.respond_der(request_for(1)))
    assert embedded(resp) == current


def _stored(resp: SignedResponse, **changes: float) -> SignedResponse:
    """What the store hands back: no certificate labels, maybe other times."""
    return dataclasses.replace(resp, cert_fp=b"", cert_not_after=float("inf"), **changes)


def test_restore_drops_expired_certificates_and_resigns_renewed_ones() -> None:
    clock = clock_at()
    short = responder_cert(NOW + 600)
    long_old = responder_cert(NOW + 86400 * 10)
    made: dict[str, SignedResponse] = {}
    for name, cert in (("short", short), ("long", long_old)):
        handle, _, _ = make(clock, cert)
        made[name] = resolve(handle.respond_der(request_for(1 if name == "short" else 2)))
    # As rows written by a version without the cap: nextUpdate well past the short cert.
    rows = [
        (b"k1", 1, "good", _stored(made["short"], next_update=NOW + 3000)),
        (b"k2", 2, "good", _stored(made["long"])),
    ]
    later = clock_at(NOW + 700)  # the short certificate has expired, the other has not
    renewed = responder_cert(NOW + 86400 * 365)
    handle, _, _ = make(later, renewed)
    kept: list[int] = []
    handle.restore(rows).addCallback(kept.append)
    assert kept == [1]
    assert handle.cache.current(b"k1") is None  # expired certificate: never back
    back = handle.cache.current(b"k2")
    assert back is not None and back.cert_not_after == long_old.not_valid_after_utc.timestamp()
    assert back.refresh_at <= later.seconds()  # due now: re-signed first
    assert handle.stale_by_certificate() == [(b"k2", 2)]
    # Rows made with the current certificate come back as they were.
    same, _, _ = make(later, renewed)
    current = resolve(same.respond_der(request_for(3)))
    handle2, _, _ = make(later, renewed)
    handle2.restore([(b"k3", 3, "good", _stored(current))]).addCallback(kept.append)
    assert kept[-1] == 1 and handle2.stale_by_certificate() == []
    assert handle2.cache.current(b"k3") == current


def test_restored_row_of_the_current_certificate_ends_with_it() -> None:
    """A row written before nextUpdate was capped, by the certificate still in use."""
    clock = clock_at()
    cert = responder_cert(NOW + 600)
    handle, _, _ = make(clock, cert, validity=3600)
    req = request_for(1)
    made = resolve(handle.respond_der(req))
    cid_key = next(k for k, _, _ in handle.cache.items())
    row = _stored(made, next_update=NOW + 3600, refresh_at=NOW + 1800)
    fresh, _, fresh_signer = make(clock, cert, validity=3600)
    fresh.restore([(cid_key, 1, "good", row)])
    assert fresh.cached_response(req) is not None
    assert fresh_signer.calls == 0
    clock.advance(601)
    assert fresh.cached_response(req) is None
    assert ocsp_status_for(failure_of(fresh.respond_der(req))) == ResponseStatus.tryLater


class _Part:
    def __init__(self, health: Health) -> None:
        self.value = health

    def health(self) -> Health:
        return self.value


def test_health_is_the_worst_part_and_logs_changes_once(caplog: object) -> None:
    clock = clock_at()
    handle, source, signer = make(clock, responder_cert(NOW + 86400))
    assert handle.health() == Health(State.READY)
    source.is_ready = False  # a source without health(): not ready = degraded
    assert handle.health().state is State.DEGRADED
    source.is_ready = True
    pool = _Part(Health(State.FAILED, "token gone"))
    handle.signer.health = pool.health  # type: ignore[attr-defined]
    health = handle.health()
    assert health == Health(State.FAILED, "signer: token gone")
    source.health = _Part(Health(State.DEGRADED, "Vault unreachable")).health  # type: ignore[attr-defined]
    assert handle.health() == Health(State.FAILED, "signer: token gone")
    pool.value = Health(State.READY)
    assert handle.health() == Health(State.DEGRADED, "source: Vault unreachable")
    del signer  # unused


def _crl(next_update: datetime) -> bytes:
    ca = load_cert("ca.pem")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(next_update - timedelta(days=1))
        .next_update(next_update)
    )
    crl = builder.sign(_key("ca.key"), hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)


def test_crl_past_its_next_update_degrades_the_handle() -> None:
    clock = clock_at()
    handle, source, _ = make(clock, responder_cert(NOW + 86400 * 30))
    crl = _crl(datetime.fromtimestamp(NOW + 3600, UTC))
    source.crl_der = lambda issuer: crl  # type: ignore[method-assign]
    assert handle.crl_next_update() == NOW + 3600
    assert handle.health().ready
    clock.advance(3601)
    health = handle.health()
    assert health.state is State.DEGRADED and "CRL past its nextUpdate" in health.reason
    # Still answers (the index is authoritative), degraded is not failed.
    assert resolve(handle.respond_der(request_for(1))).der
