"""load_crl: PEM/DER, signature and issuer checks, entry reasons and dates.

Also home of :func:`make_ca` and :func:`make_crl`, small cryptography-based
builders the OpenSSL source tests reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmocsp.errors import SourceError
from hsmocsp.sources.crl import load_crl
from hsmocsp.status import CertStatus, CRLReason

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)

Entry = tuple[int, datetime, x509.ReasonFlags | None, datetime | None]


def make_ca(name: str = "Test CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_crl(
    ca: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    entries: list[Entry],
    *,
    number: int | None = 1,
    next_update: datetime | None = NOW + timedelta(days=7),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    issuer_name: x509.Name | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_name or ca.subject)
        .last_update(NOW)
        .next_update(next_update or NOW)
    )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial, when, reason, invalidity in entries:
        rb = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        if reason is not None:
            rb = rb.add_extension(x509.CRLReason(reason), critical=False)
        if invalidity is not None:
            rb = rb.add_extension(x509.InvalidityDate(invalidity.replace(tzinfo=None)), False)
        builder = builder.add_revoked_certificate(rb.build())
    return builder.sign(key, hashes.SHA256())


REVOKED_AT = NOW - timedelta(hours=2)
INVALID_SINCE = NOW - timedelta(days=3)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return make_ca()


@pytest.mark.parametrize("encoding", [Encoding.PEM, Encoding.DER])
def test_load_pem_and_der(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], encoding: Encoding
) -> None:
    cert, key = ca
    crl = make_crl(
        cert,
        key,
        [
            (0x10, REVOKED_AT, x509.ReasonFlags.key_compromise, INVALID_SINCE),
            (0x11, REVOKED_AT, None, None),
            (0x12, REVOKED_AT, x509.ReasonFlags.remove_from_crl, None),
        ],
        number=42,
    )
    info = load_crl(crl.public_bytes(encoding), cert)
    assert info.der == crl.public_bytes(Encoding.DER)
    assert info.this_update == NOW
    assert info.next_update == NOW + timedelta(days=7)
    assert info.crl_number == 42
    assert info.revoked == {
        0x10: CertStatus.revoked(REVOKED_AT, CRLReason.keyCompromise, INVALID_SINCE),
        0x11: CertStatus.revoked(REVOKED_AT, None),  # no reason extension: None, not unspecified
    }
    assert info.warnings == ()


@pytest.mark.parametrize("flag", [f for f in x509.ReasonFlags if f.name != "remove_from_crl"])
def test_every_reason(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], flag: x509.ReasonFlags
) -> None:
    cert, key = ca
    info = load_crl(
        make_crl(cert, key, [(7, REVOKED_AT, flag, None)]).public_bytes(Encoding.DER), cert
    )
    assert info.revoked[7].reason == CRLReason[flag.value]


def test_no_crl_number_and_no_entries(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    cert, key = ca
    info = load_crl(make_crl(cert, key, [], number=None).public_bytes(Encoding.PEM), cert)
    assert info.crl_number is None
    assert info.revoked == {}


def test_bad_signature_rejected(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, _key = ca
    _other_cert, other_key = make_ca()
    forged = make_crl(cert, other_key, [(1, REVOKED_AT, None, None)])  # right name, wrong key
    with pytest.raises(SourceError, match="signature does not verify"):
        load_crl(forged.public_bytes(Encoding.DER), cert)


def test_tampered_crl_rejected(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = ca
    der = bytearray(
        make_crl(cert, key, [(0x51, REVOKED_AT, None, None)]).public_bytes(Encoding.DER)
    )
    pos = der.index(bytes([0x02, 0x01, 0x51]))  # the entry's serial INTEGER
    der[pos + 2] = 0x52
    with pytest.raises(SourceError, match="signature does not verify"):
        load_crl(bytes(der), cert)


def test_other_issuer_rejected(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, _key = ca
    other_cert, other_key = make_ca("Other CA")
    crl = make_crl(other_cert, other_key, [])
    with pytest.raises(SourceError, match="is not the CA"):
        load_crl(crl.public_bytes(Encoding.DER), cert)


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"]
)
def test_garbage_rejected(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], data: bytes
) -> None:
    with pytest.raises(SourceError, match="not a CRL"):
        load_crl(data, ca[0])


def test_truncated_crl_rejected(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = ca
    der = make_crl(cert, key, [(1, REVOKED_AT, None, None)]).public_bytes(Encoding.DER)
    with pytest.raises(SourceError):
        load_crl(der[: len(der) // 2], cert)


def test_delta_crl_rejected(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = ca
    crl = make_crl(cert, key, [], extensions=[(x509.DeltaCRLIndicator(1), True)])
    with pytest.raises(SourceError, match="delta CRLs"):
        load_crl(crl.public_bytes(Encoding.DER), cert)
