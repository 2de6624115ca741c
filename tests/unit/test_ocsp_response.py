"""Tests for hsmocsp.ocsp.response: byte-exact vectors, cryptography/pyasn1/openssl oracles."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc6960

from hsmocsp.ocsp.request import CertID, OCSPRequestInfo, make_cert_id, parse_request
from hsmocsp.ocsp.response import (
    ResponseStatus,
    SingleResponseData,
    build_ocsp_response,
    build_response_data,
    error_response,
    issuer_hashes,
    responder_key_hash,
)
from hsmocsp.signing.algorithms import ECDSA_WITH_SHA256_DER as ECDSA_SHA256_DER
from hsmocsp.signing.algorithms import SHA256_WITH_RSA_DER
from hsmocsp.status import CertStatus, CRLReason

DATA = Path(__file__).resolve().parent.parent / "testdata" / "ocsp"
REGEN = os.environ.get("HSMOCSP_REGEN_VECTORS") == "1"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((DATA / f"{name}.pem").read_bytes())


def _key(name: str) -> PrivateKey:
    key = serialization.load_pem_private_key((DATA / f"{name}.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


CA = _cert("ca")
CA_KEY = _key("ca")
RSA_CERT = _cert("responder_rsa")
RSA_KEY = _key("responder_rsa")
EC_CERT = _cert("responder_ec")
EC_KEY = _key("responder_ec")

T0 = datetime(2024, 5, 6, 7, 8, 9, 987654, tzinfo=UTC)  # fraction must be truncated
T0_S = T0.replace(microsecond=0)


def _sign(key: PrivateKey, data: bytes) -> tuple[bytes, bytes]:
    """(signatureAlgorithm DER, signature): RSA PKCS#1 v1.5 and RFC 6979 ECDSA are
    deterministic, so whole responses can be compared byte for byte."""
    if isinstance(key, rsa.RSAPrivateKey):
        return SHA256_WITH_RSA_DER, key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    signature = key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return ECDSA_SHA256_DER, signature


def _verify(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def _cert_id(serial: int, algorithm: str = "sha1", null_params: bool = True) -> CertID:
    name_hash, key_hash = issuer_hashes(CA, algorithm)
    return make_cert_id(algorithm, name_hash, key_hash, serial, null_params=null_params)


def _respond(
    key: PrivateKey,
    singles: Sequence[SingleResponseData],
    nonce: bytes | None = None,
    certs: Sequence[x509.Certificate] = (),
    produced_at: datetime = T0,
) -> tuple[bytes, bytes]:
    """(tbsResponseData, full OCSPResponse) signed by ``key``."""
    tbs = build_response_data(responder_key_hash(key.public_key()), produced_at, singles, nonce)
    algorithm, signature = _sign(key, tbs)
    certs_der = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return tbs, build_ocsp_response(tbs, algorithm, signature, certs_der)


GOOD = CertStatus.good()
UNKNOWN = CertStatus.unknown()
REVOKED_NO_REASON = CertStatus.revoked(T0 - timedelta(days=3))
REVOKED_FULL = CertStatus.revoked(
    T0 - timedelta(days=3, microseconds=5), CRLReason.keyCompromise, T0 - timedelta(days=10)
)


# --- error responses and constants -----------------------------------------------------


@pytest.mark.parametrize("status", [s for s in ResponseStatus if s != ResponseStatus.successful])
def test_error_responses(status: ResponseStatus) -> None:
    raw = error_response(status)
    assert raw == bytes((0x30, 0x03, 0x0A, 0x01, int(status)))
    parsed = ocsp.load_der_ocsp_response(raw)
    assert parsed.response_status.value == int(status)
    decoded, rest = der_decoder.decode(raw, asn1Spec=rfc6960.OCSPResponse())
    assert not rest and int(decoded["responseStatus"]) == int(status)


def test_error_response_refuses_successful() -> None:
    with pytest.raises(ValueError):
        error_response(ResponseStatus.successful)


# The AlgorithmIdentifier constants live in hsmocsp.signing.algorithms (tested there).


def test_algorithm_constants_match_real_certificates() -> None:
    # cryptography signed these test certs: its AlgorithmIdentifiers are in the DER
    assert SHA256_WITH_RSA_DER in CA.public_bytes(serialization.Encoding.DER)


# --- hashes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [("sha1", hashes.SHA1()), ("sha256", hashes.SHA256()),
     ("sha384", hashes.SHA384()), ("sha512", hashes.SHA512())],
)
def test_issuer_hashes_match_cryptography(name: str, algorithm: hashes.HashAlgorithm) -> None:
    request = ocsp.OCSPRequestBuilder().add_certificate(RSA_CERT, CA, algorithm).build()
    assert issuer_hashes(CA, name) == (request.issuer_name_hash, request.issuer_key_hash)
    request = ocsp.OCSPRequestBuilder().add_certificate(EC_CERT, CA, algorithm).build()
    assert issuer_hashes(CA, name) == (request.issuer_name_hash, request.issuer_key_hash)


def test_issuer_hashes_refuse_unknown_algorithm() -> None:
    with pytest.raises(ValueError):
        issuer_hashes(CA, "md5")


@pytest.mark.parametrize("key", [CA_KEY, RSA_KEY, EC_KEY], ids=["ca", "rsa", "ec"])
def test_responder_key_hash(key: PrivateKey) -> None:
    expected = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert responder_key_hash(key.public_key()) == expected


# --- cryptography as an independent oracle (single CertID) ---------------------------


@pytest.mark.parametrize("key_name", ["rsa", "ec"])
@pytest.mark.parametrize(
    ("status", "next_update", "nonce"),
    [
        (GOOD, T0 + timedelta(days=1), None),
        (UNKNOWN, T0 + timedelta(hours=4), b"\x04\x01\x2a"),
        (REVOKED_NO_REASON, None, None),
        (REVOKED_FULL, T0 + timedelta(days=7), b"\x04\x20" + bytes(range(32))),
        (CertStatus.revoked(T0, CRLReason.removeFromCRL), T0 + timedelta(days=1), None),
        (CertStatus.revoked(T0, CRLReason.unspecified), T0 + timedelta(days=1), None),
    ],
)
@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_cryptography_oracle(
    key_name: str,
    status: CertStatus,
    next_update: datetime | None,
    nonce: bytes | None,
    algorithm: str,
) -> None:
    key, cert = (RSA_KEY, RSA_CERT) if key_name == "rsa" else (EC_KEY, EC_CERT)
    cid = _cert_id(0x1001, algorithm)
    single = SingleResponseData(cid, status, T0 - timedelta(minutes=1), next_update)
    tbs, raw = _respond(key, [single], nonce, certs=[cert])
    parsed = ocsp.load_der_ocsp_response(raw)

    assert parsed.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert parsed.tbs_response_bytes == tbs
    _verify(cert, parsed.tbs_response_bytes, parsed.signature)
    assert parsed.certificates == [cert]
    assert parsed.responder_key_hash == responder_key_hash(key.public_key())
    assert parsed.responder_name is None
    assert parsed.produced_at_utc == T0_S
    assert parsed.serial_number == 0x1001
    assert (parsed.issuer_name_hash, parsed.issuer_key_hash) == issuer_hashes(CA, algorithm)
    assert parsed.hash_algorithm.name == algorithm
    assert parsed.this_update_utc == (T0 - timedelta(minutes=1)).replace(microsecond=0)
    assert parsed.next_update_utc == (next_update.replace(microsecond=0) if next_update else None)
    expected_status = {
        "good": ocsp.OCSPCertStatus.GOOD,
        "revoked": ocsp.OCSPCertStatus.REVOKED,
        "unknown": ocsp.OCSPCertStatus.UNKNOWN,
    }[status.status.value]
    assert parsed.certificate_status == expected_status
    if status.revocation_time is not None:
        assert parsed.revocation_time_utc == status.revocation_time.replace(microsecond=0)
        if status.reason is None:
            assert parsed.revocation_reason is None
        else:
            assert parsed.revocation_reason is not None
            assert parsed.revocation_reason.name.replace("_", "").lower() == (
                status.reason.name.lower()
            )
    if status.invalidity_date is not None:
        ext = parsed.single_extensions.get_extension_for_class(x509.InvalidityDate)
        assert not ext.critical
        assert ext.value.invalidity_date_utc == status.invalidity_date.replace(microsecond=0)
    else:
        assert len(parsed.single_extensions) == 0
    if nonce is not None:
        nonce_ext = parsed.extensions.get_extension_for_class(x509.OCSPNonce)
        assert not nonce_ext.critical
        assert nonce_ext.value.nonce == nonce[2:]
    else:
        assert len(parsed.extensions) == 0


def test_certs_omitted_when_empty() -> None:
    _, raw = _respond(CA_KEY, [SingleResponseData(_cert_id(5), GOOD, T0, None)])
    parsed = ocsp.load_der_ocsp_response(raw)
    assert parsed.certificates == []
    _verify(CA, parsed.tbs_response_bytes, parsed.signature)
    decoded, _ = der_decoder.decode(
        bytes(der_decoder.decode(raw, asn1Spec=rfc6960.OCSPResponse())[0]["responseBytes"][
            "response"]),
        asn1Spec=rfc6960.BasicOCSPResponse(),
    )
    assert not decoded["certs"].isValue


def test_times_are_converted_to_utc_and_truncated() -> None:
    tz = timezone(timedelta(hours=2))
    local = datetime(2024, 5, 6, 9, 8, 9, 999999, tzinfo=tz)
    single = SingleResponseData(_cert_id(5), GOOD, local, local + timedelta(hours=1))
    tbs = build_response_data(b"\x00" * 20, local, [single], None)
    assert b"20240506070809Z" in tbs
    assert b"20240506080809Z" in tbs
    assert b"." not in tbs.split(b"\x18\x0f", 1)[1][:15]


# --- multiple CertIDs and exact DER (pyasn1 as the second oracle) ---------------------


def test_many_cert_ids_echoed_exactly() -> None:
    cert_ids = [
        _cert_id(1, "sha1"),
        _cert_id(2, "sha256", null_params=False),
        _cert_id(3, "sha384"),
        _cert_id(-128, "sha512"),
        _cert_id(2**159 + 5, "sha1"),
    ]
    statuses = [GOOD, REVOKED_FULL, UNKNOWN, REVOKED_NO_REASON, GOOD]
    singles = [
        SingleResponseData(cid, status, T0, T0 + timedelta(days=1))
        for cid, status in zip(cert_ids, statuses, strict=True)
    ]
    tbs, raw = _respond(RSA_KEY, singles, b"\x04\x03abc", certs=[RSA_CERT])

    parsed = ocsp.load_der_ocsp_response(raw)
    assert [r.serial_number for r in parsed.responses] == [c.serial for c in cert_ids]
    assert [r.certificate_status.name.lower() for r in parsed.responses] == [
        s.status.value for s in statuses
    ]
    for cid in cert_ids:
        assert cid.der in tbs

    # pyasn1 decodes what we built with the RFC 6960 schema and finds the same values
    response, rest = der_decoder.decode(raw, asn1Spec=rfc6960.OCSPResponse())
    assert not rest
    assert response["responseBytes"]["responseType"] == rfc6960.id_pkix_ocsp_basic
    basic, rest = der_decoder.decode(
        bytes(response["responseBytes"]["response"]), asn1Spec=rfc6960.BasicOCSPResponse()
    )
    assert not rest
    data = basic["tbsResponseData"]
    assert not data["version"].hasValue() or int(data["version"]) == 0
    assert bytes(data["responderID"]["byKey"]) == responder_key_hash(RSA_KEY.public_key())
    assert len(data["responses"]) == len(cert_ids)
    assert bytes(basic["signature"].asOctets()) == parsed.signature
    # and re-encodes it to the very same bytes: our DER is canonical (no negative serials
    # here, pyasn1 mis-encodes -128)
    positive = [s for s in singles if s.cert_id.serial >= 0]
    tbs2 = build_response_data(b"\x11" * 20, T0, positive, None)
    decoded, rest = der_decoder.decode(tbs2, asn1Spec=rfc6960.ResponseData())
    assert not rest and der_encoder.encode(decoded) == tbs2


def test_pyasn1_reencodes_every_shape() -> None:
    for status in (GOOD, UNKNOWN, REVOKED_NO_REASON, REVOKED_FULL):
        for nonce in (None, b"\x04\x10" + b"n" * 16):
            for next_update in (None, T0 + timedelta(days=1)):
                single = SingleResponseData(_cert_id(77), status, T0, next_update)
                tbs = build_response_data(b"\x22" * 20, T0, [single], nonce)
                decoded, rest = der_decoder.decode(tbs, asn1Spec=rfc6960.ResponseData())
                assert not rest
                assert der_encoder.encode(decoded) == tbs


def test_long_lengths() -> None:
    # many CertIDs push lengths past 127 and 255 bytes (long-form lengths)
    singles = [SingleResponseData(_cert_id(i, "sha512"), GOOD, T0, None) for i in range(20)]
    tbs, raw = _respond(RSA_KEY, singles, certs=[RSA_CERT, CA])
    assert len(tbs) > 2000
    parsed = ocsp.load_der_ocsp_response(raw)
    assert len(list(parsed.responses)) == 20
    assert parsed.certificates == [RSA_CERT, CA]


def test_build_rejects_programming_errors() -> None:
    single = SingleResponseData(_cert_id(5), GOOD, T0, None)
    with pytest.raises(ValueError):
        build_response_data(b"short", T0, [single], None)
    with pytest.raises(ValueError):
        build_response_data(b"\x00" * 20, T0, [], None)


# --- byte-exact vectors --------------------------------------------------------------------


def _vector_cases() -> dict[str, bytes]:
    """name -> response, all with fixed times and deterministic signatures."""
    request = parse_request((DATA / "req_openssl_sha1_nonce.der").read_bytes())
    multi = parse_request((DATA / "req_openssl_sha256_multi.der").read_bytes())
    good = SingleResponseData(request.cert_ids[0], GOOD, T0, T0 + timedelta(hours=12))
    long_nonce = parse_request((DATA / "req_crypto_sha256_nonce128.der").read_bytes())
    good_long = SingleResponseData(long_nonce.cert_ids[0], GOOD, T0, T0 + timedelta(hours=12))
    return {
        "resp_rsa_good_nonce.der": _respond(RSA_KEY, [good], request.nonce, [RSA_CERT])[1],
        # RFC 9654's longest nonce (128 octets): a long-form length inside the echo
        "resp_rsa_good_nonce128.der": _respond(
            RSA_KEY, [good_long], long_nonce.nonce, [RSA_CERT]
        )[1],
        "resp_ca_revoked_multi.der": _respond(
            CA_KEY,
            [
                SingleResponseData(multi.cert_ids[0], REVOKED_FULL, T0, T0 + timedelta(days=1)),
                SingleResponseData(multi.cert_ids[1], REVOKED_NO_REASON, T0, None),
                SingleResponseData(multi.cert_ids[2], UNKNOWN, T0, T0 + timedelta(days=1)),
            ],
            multi.nonce,
        )[1],
        "resp_ec_unknown.der": _respond(
            EC_KEY,
            [SingleResponseData(_cert_id(9, "sha256"), UNKNOWN, T0, T0 + timedelta(days=1))],
            None,
            [EC_CERT],
        )[1],
    }


@pytest.mark.parametrize("name", sorted(_vector_cases()))
def test_byte_exact_vectors(name: str) -> None:
    built = _vector_cases()[name]
    path = DATA / name
    if REGEN:
        path.write_bytes(built)
    assert built == path.read_bytes()


# --- openssl accepts what we build ------------------------------------------------------

openssl_needed = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "ocsp", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.integration
@openssl_needed
@pytest.mark.parametrize("responder", ["responder_rsa", "responder_ec", "ca"])
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (GOOD, ["good"]),
        (REVOKED_FULL, ["revoked", "Reason: keyCompromise"]),
        (CertStatus.revoked(T0, CRLReason.superseded), ["revoked", "Reason: superseded"]),
        (REVOKED_NO_REASON, ["revoked"]),
        (UNKNOWN, ["unknown"]),
    ],
)
def test_openssl_accepts(
    tmp_path: Path, responder: str, status: CertStatus, expected: list[str]
) -> None:
    key = {"responder_rsa": RSA_KEY, "responder_ec": EC_KEY, "ca": CA_KEY}[responder]
    certs = [] if responder == "ca" else [_cert(responder)]
    now = datetime.now(UTC)
    single = SingleResponseData(_cert_id(4097), status, now - timedelta(minutes=5),
                                now + timedelta(hours=1))
    _, raw = _respond(key, [single], certs=certs, produced_at=now)
    (tmp_path / "resp.der").write_bytes(raw)
    result = _openssl(
        "-respin", str(tmp_path / "resp.der"),
        "-VAfile", str(DATA / f"{responder}.pem"),
        "-CAfile", str(DATA / "ca.pem"),
        "-issuer", str(DATA / "ca.pem"), "-serial", "4097", "-no_nonce",
    )
    assert result.returncode == 0, result.stderr
    assert "Response verify OK" in result.stderr
    assert f"4097: {expected[0]}" in result.stdout
    for text in expected[1:]:
        assert text in result.stdout
    if status is REVOKED_NO_REASON:
        assert "Reason" not in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


@pytest.mark.integration
@openssl_needed
def test_openssl_checks_our_nonce_and_multi_response(tmp_path: Path) -> None:
    request_path = tmp_path / "req.der"
    made = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(DATA / "ca.pem"), "-serial", "10", "-serial", "11",
         "-reqout", str(request_path)],
        capture_output=True, timeout=30, check=False,
    )
    assert made.returncode == 0
    request: OCSPRequestInfo = parse_request(request_path.read_bytes())
    assert request.nonce is not None
    now = datetime.now(UTC)
    singles = [
        SingleResponseData(cid, GOOD, now, now + timedelta(hours=1)) for cid in request.cert_ids
    ]
    _, raw = _respond(RSA_KEY, singles, request.nonce, [RSA_CERT], produced_at=now)
    (tmp_path / "resp.der").write_bytes(raw)
    result = _openssl(
        "-reqin", str(request_path), "-respin", str(tmp_path / "resp.der"),
        "-VAfile", str(DATA / "responder_rsa.pem"), "-CAfile", str(DATA / "ca.pem"),
    )
    assert result.returncode == 0, result.stderr
    assert "Response verify OK" in result.stderr
    assert "Nonce Verify error" not in result.stdout + result.stderr

    # a different nonce is caught: openssl really compares ours
    _, wrong = _respond(RSA_KEY, singles, b"\x04\x03xyz", [RSA_CERT], produced_at=now)
    (tmp_path / "wrong.der").write_bytes(wrong)
    result = _openssl(
        "-reqin", str(request_path), "-respin", str(tmp_path / "wrong.der"),
        "-VAfile", str(DATA / "responder_rsa.pem"), "-CAfile", str(DATA / "ca.pem"),
    )
    assert "Nonce Verify error" in result.stdout + result.stderr


@pytest.mark.integration
@openssl_needed
@pytest.mark.parametrize("size", [1, 15, 32, 33, 127, 128])
def test_openssl_checks_rfc9654_nonce_lengths(tmp_path: Path, size: int) -> None:
    """RFC 9654: nonces of 1..128 octets are echoed, and openssl finds its nonce in ours."""
    built = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(RSA_CERT, CA, hashes.SHA1())
        .add_extension(x509.OCSPNonce(bytes(range(size))), critical=False)
        .build()
    )
    request_der = built.public_bytes(serialization.Encoding.DER)
    (tmp_path / "req.der").write_bytes(request_der)
    request = parse_request(request_der)
    now = datetime.now(UTC)
    single = SingleResponseData(request.cert_ids[0], GOOD, now, now + timedelta(hours=1))
    _, raw = _respond(RSA_KEY, [single], request.nonce, [RSA_CERT], produced_at=now)
    (tmp_path / "resp.der").write_bytes(raw)
    result = _openssl(
        "-reqin", str(tmp_path / "req.der"), "-respin", str(tmp_path / "resp.der"),
        "-VAfile", str(DATA / "responder_rsa.pem"), "-CAfile", str(DATA / "ca.pem"),
    )
    assert result.returncode == 0, result.stderr
    assert "Response verify OK" in result.stderr
    assert "Nonce Verify error" not in result.stdout + result.stderr
    assert "WARNING: no nonce" not in result.stdout + result.stderr
    parsed = ocsp.load_der_ocsp_response(raw)
    (nonce,) = [e for e in parsed.extensions if isinstance(e.value, x509.OCSPNonce)]
    assert nonce.value.nonce == bytes(range(size))
