"""Handle + cache with a fake source and a counting signer (time from task.Clock)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.x509.oid import OCSPExtensionOID
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from hsmocsp.errors import ResponderCertError, SignerUnavailable, UnknownIssuer
from hsmocsp.handle import Handle, SignedResponse, ocsp_status_for
from hsmocsp.ocsp.request import make_cert_id, parse_request
from hsmocsp.ocsp.response import ResponseStatus, issuer_hashes
from hsmocsp.status import CertStatus, CRLReason
from tests.factories import handle as make_handle
from tests.unit.fakes import CountingSigner, DictSource, load_cert

REVOKED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make(
    clock: Clock,
    validity: float = 3600,
    responder: str = "responder_rsa.pem",
    key: str = "responder_rsa.key",
) -> tuple[Handle, DictSource, CountingSigner]:
    ca = load_cert("ca.pem")
    source = DictSource(
        ca,
        {
            1: CertStatus.good(),
            2: CertStatus.revoked(REVOKED_AT, CRLReason.keyCompromise),
        },
    )
    signer = CountingSigner(key)
    handle: Handle = make_handle(
        source=source, signer=signer, responder_cert=load_cert(responder), validity=validity,
        clock=clock,
    )  # fmt: skip
    handle.prepare()
    return handle, source, signer


def request_for(serial: int, alg: str = "sha1", nonce: bool = False) -> bytes:
    ca = load_cert("ca.pem")
    builder = ocsp.OCSPRequestBuilder()
    name_hash, key_hash = issuer_hashes(ca, alg)
    from cryptography.hazmat.primitives import hashes

    h = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[alg]
    builder = builder.add_certificate_by_hash(name_hash, key_hash, serial, h)
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
    from cryptography.hazmat.primitives.serialization import Encoding

    return builder.build().public_bytes(Encoding.DER)


def resolve(value: Deferred[SignedResponse] | SignedResponse) -> SignedResponse:
    if isinstance(value, SignedResponse):
        return value
    out: list[SignedResponse] = []
    value.addCallback(out.append)
    assert out, "response not produced synchronously"
    return out[0]


def parsed(resp: SignedResponse) -> ocsp.OCSPResponse:
    return ocsp.load_der_ocsp_response(resp.der)


def test_good_revoked_unknown_and_signature() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    for serial, want in (
        (1, ocsp.OCSPCertStatus.GOOD),
        (2, ocsp.OCSPCertStatus.REVOKED),
        (99, ocsp.OCSPCertStatus.UNKNOWN),
    ):
        resp = parsed(resolve(handle.respond_der(request_for(serial))))
        assert resp.certificate_status == want
        assert resp.serial_number == serial
        assert resp.next_update_utc is not None
        assert (resp.next_update_utc - resp.this_update_utc).total_seconds() == 3600
        signer.public_key().verify(  # type: ignore[union-attr,call-arg]
            resp.signature,
            resp.tbs_response_bytes,
            *_verify_args(resp),
        )
    revoked = parsed(resolve(handle.respond_der(request_for(2))))
    assert revoked.revocation_reason == x509.ReasonFlags.key_compromise
    assert revoked.revocation_time_utc == REVOKED_AT


def _verify_args(resp: ocsp.OCSPResponse) -> tuple[object, ...]:
    from cryptography.hazmat.primitives.asymmetric import padding

    return (padding.PKCS1v15(), resp.signature_hash_algorithm)


def test_cache_hit_signs_once_and_hash_variants_get_own_bytes() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    first = resolve(handle.respond_der(request_for(1)))
    again = resolve(handle.respond_der(request_for(1)))
    assert again is first
    assert signer.calls == 1 and source.lookups == 1
    sha256 = resolve(handle.respond_der(request_for(1, "sha256")))
    assert sha256.der != first.der
    assert signer.calls == 2
    assert parsed(sha256).hash_algorithm.name == "sha256"


def test_revocation_replaces_cached_good_at_once() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, _ = make(clock)
    good = parsed(resolve(handle.respond_der(request_for(1))))
    assert good.certificate_status == ocsp.OCSPCertStatus.GOOD
    source.set(1, CertStatus.revoked(REVOKED_AT, CRLReason.superseded))
    now = parsed(resolve(handle.respond_der(request_for(1))))
    assert now.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert now.revocation_reason == x509.ReasonFlags.superseded


def test_revocation_during_signing_is_not_cached_or_served() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    signer.hold = True
    pending = handle.respond_der(request_for(1))
    assert isinstance(pending, Deferred)
    source.set(1, CertStatus.revoked(REVOKED_AT, CRLReason.keyCompromise))
    signer.release()  # the stale "good" signature is thrown away, a new one is started
    assert not pending.called
    signer.release()
    result = parsed(resolve(pending))
    assert result.certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_coalescing_many_misses_one_signature() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    signer.hold = True
    waiters = [handle.respond_der(request_for(1)) for _ in range(25)]
    assert signer.calls == 1
    signer.release()
    results = {resolve(w).der for w in waiters}
    assert len(results) == 1 and signer.calls == 1


def test_cancelled_waiter_does_not_cancel_shared_signing() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    signer.hold = True
    a = handle.respond_der(request_for(1))
    b = handle.respond_der(request_for(1))
    assert isinstance(a, Deferred) and isinstance(b, Deferred)
    a.cancel()
    a.addErrback(lambda f: None)
    signer.release()
    assert parsed(resolve(b)).certificate_status == ocsp.OCSPCertStatus.GOOD


def test_refresh_ahead_of_expiry_and_expiry() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock, validity=1000)
    first = resolve(handle.respond_der(request_for(1)))
    clock.advance(499)
    assert resolve(handle.respond_der(request_for(1))) is first and signer.calls == 1
    clock.advance(2)  # past refresh_at (half-way): old bytes served, refresh started
    served = resolve(handle.respond_der(request_for(1)))
    assert served is first and signer.calls == 2
    fresh = resolve(handle.respond_der(request_for(1)))
    assert fresh is not first and fresh.this_update == first.this_update + 501
    clock.advance(2000)  # everything expired: a miss signs again
    resolve(handle.respond_der(request_for(1)))
    assert signer.calls == 3


def test_nonce_echo_signs_live_and_is_not_cacheable() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    r1 = resolve(handle.respond_der(request_for(1, nonce=True)))
    r2 = resolve(handle.respond_der(request_for(1, nonce=True)))
    assert signer.calls == 2 and not r1.cacheable
    assert parsed(r2).extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == (
        b"0123456789abcdef"
    )


def test_nonce_ignore_serves_cached_without_nonce() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    handle.nonce_policy = "ignore"
    r1 = resolve(handle.respond_der(request_for(1, nonce=True)))
    r2 = resolve(handle.respond_der(request_for(1, nonce=False)))
    assert r1 is r2 and signer.calls == 1
    assert not any(e.oid == OCSPExtensionOID.NONCE for e in parsed(r1).extensions)


def test_unknown_issuer_and_error_mapping() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    cid = make_cert_id("sha1", b"\x01" * 20, b"\x02" * 20, 5)
    with pytest.raises(UnknownIssuer):
        handle.issuer_for(cid)
    signer.fail_with = SignerUnavailable("hsm gone")
    d = handle.respond_der(request_for(7))
    assert isinstance(d, Deferred)
    failures: list[ResponseStatus] = []
    d.addErrback(lambda f: failures.append(ocsp_status_for(f)))
    assert failures == [ResponseStatus.tryLater]
    # The failure is not cached: when the signer is back, the same request succeeds.
    signer.fail_with = None
    assert parsed(resolve(handle.respond_der(request_for(7)))).certificate_status == (
        ocsp.OCSPCertStatus.UNKNOWN
    )
    assert parse_request(request_for(7)).cert_ids[0].serial == 7


def test_responder_cert_checks() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    with pytest.raises(ResponderCertError, match="public key"):
        make(clock, responder="responder_rsa.pem", key="responder_ec.key")
    clock.advance(100 * 365 * 86400)  # year 2125: the responder certificate has expired
    with pytest.raises(ResponderCertError, match="not valid now"):
        make(clock)


def test_ca_signing_directly_omits_certs() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock, responder="ca.pem", key="ca.key")
    resp = parsed(resolve(handle.respond_der(request_for(1))))
    assert resp.certificates == []
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD


def test_nonce_request_under_signer_saturation_gets_cached_response() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, signer = make(clock)
    cached = resolve(handle.respond_der(request_for(1)))
    backlog = [0]
    handle.queue_depth = lambda: backlog[0]
    live = resolve(handle.respond_der(request_for(1, nonce=True)))
    assert live is not cached and signer.calls == 2  # HSM idle: signed live, nonce echoed
    backlog[0] = 3  # signatures are queueing: answer from the cache, without the nonce
    assert resolve(handle.respond_der(request_for(1, nonce=True))) is cached
    assert signer.calls == 2


def test_signature_listeners_are_told_each_signature() -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)
    told: list[tuple[str, float]] = []
    handle.on_signature(lambda name, seconds: told.append((name, seconds)))
    resolve(handle.respond_der(request_for(1)))
    resolve(handle.respond_der(request_for(1)))  # a cache hit: no signature
    assert told == [("t", 0.0)]
