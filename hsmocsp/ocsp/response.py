"""Build OCSP responses (RFC 6960 section 4.2) by direct DER concatenation.

The responder builds ``tbsResponseData`` with :func:`build_response_data`, has a
signer sign exactly those bytes, then wraps them with :func:`build_ocsp_response`.
Both steps are plain byte concatenation: a few microseconds, byte-exact, and the
signed bytes are embedded unchanged.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from hsmocsp.ocsp import der
from hsmocsp.ocsp.types import NONCE_OID, CertID
from hsmocsp.status import CertStatus, Status


class ResponseStatus(enum.IntEnum):
    """OCSPResponseStatus (value 4 is unused)."""

    successful = 0
    malformedRequest = 1
    internalError = 2
    tryLater = 3
    sigRequired = 5
    unauthorized = 6


# OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, ... } without responseBytes.
_ERROR_RESPONSES: dict[ResponseStatus, bytes] = {
    status: der.sequence(der.enumerated(status)) for status in ResponseStatus
}


def error_response(status: ResponseStatus) -> bytes:
    """The OCSPResponse for a non-successful status (no responseBytes, unsigned)."""
    if status is ResponseStatus.successful:
        raise ValueError("a successful response needs responseBytes")
    return _ERROR_RESPONSES[status]


_ID_PKIX_OCSP_BASIC = der.oid("1.3.6.1.5.5.7.48.1.1")
_NONCE_OID_DER = der.oid(NONCE_OID)
_INVALIDITY_DATE_OID_DER = der.oid("2.5.29.24")
_SUCCESSFUL = der.enumerated(ResponseStatus.successful)

_GOOD = bytes((der.context(0, constructed=False), 0))  # [0] IMPLICIT NULL
_UNKNOWN = bytes((der.context(2, constructed=False), 0))  # [2] IMPLICIT NULL
_REVOKED_TAG = der.context(1)  # [1] IMPLICIT RevokedInfo (a SEQUENCE, so constructed)


def _spki_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING value (without the unused-bits octet) of a SPKI."""
    tag, start, end = der.read_tlv(spki)
    if tag != der.SEQUENCE:
        raise ValueError("SubjectPublicKeyInfo is not a SEQUENCE")
    parts = der.children(spki, start, end)
    if len(parts) != 2 or parts[1][0] != der.BIT_STRING:
        raise ValueError("SubjectPublicKeyInfo has no subjectPublicKey")
    _, _, content, bit_end = parts[1]
    if content >= bit_end or spki[content] != 0:
        raise ValueError("subjectPublicKey has unused bits")
    return spki[content + 1 : bit_end]


def _subject_and_spki(certificate: x509.Certificate) -> tuple[bytes, bytes]:
    """The subject Name and SubjectPublicKeyInfo DER exactly as encoded in the certificate.

    Re-serialising a parsed Name could differ from the issuer's bytes (odd string
    types, unsorted SETs); hashing the original octets is what clients do.
    """
    tbs = certificate.tbs_certificate_bytes
    tag, start, end = der.read_tlv(tbs)
    if tag != der.SEQUENCE:
        raise ValueError("TBSCertificate is not a SEQUENCE")
    fields = der.children(tbs, start, end)
    if fields and fields[0][0] == der.context(0):  # [0] EXPLICIT version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ...
    if len(fields) < 6:
        raise ValueError("TBSCertificate too short")
    _, subject_start, _, subject_end = fields[4]
    _, spki_start, _, spki_end = fields[5]
    return tbs[subject_start:subject_end], tbs[spki_start:spki_end]


def issuer_hashes(issuer: x509.Certificate, hash_algorithm: str) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of ``issuer`` for CertIDs using ``hash_algorithm``.

    The name hash covers the DER subject, the key hash the subjectPublicKey BIT
    STRING value (RFC 6960 section 4.1.1).
    """
    if hash_algorithm not in ("sha1", "sha256", "sha384", "sha512"):
        raise ValueError(f"unsupported hash algorithm {hash_algorithm!r}")
    subject, spki = _subject_and_spki(issuer)
    key = _spki_key_bits(spki)
    return (
        hashlib.new(hash_algorithm, subject).digest(),
        hashlib.new(hash_algorithm, key).digest(),
    )


def responder_key_hash(public_key: PublicKeyTypes) -> bytes:
    """SHA-1 of the responder key's subjectPublicKey BIT STRING value (ResponderID byKey)."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha1(_spki_key_bits(spki)).digest()


@dataclass(frozen=True, slots=True)
class SingleResponseData:
    """One SingleResponse to put in a ResponseData."""

    cert_id: CertID
    status: CertStatus
    this_update: datetime
    next_update: datetime | None


def _extension(oid_der: bytes, value: bytes) -> bytes:
    """A non-critical Extension (critical DEFAULT FALSE is omitted in DER)."""
    return der.sequence(oid_der, der.octet_string(value))


def _cert_status(status: CertStatus) -> bytes:
    if status.status is Status.good:
        return _GOOD
    if status.status is Status.unknown:
        return _UNKNOWN
    if status.revocation_time is None:
        raise ValueError("a revoked CertStatus needs a revocation_time")
    body = der.generalized_time(status.revocation_time)
    if status.reason is not None:
        body += der.tlv(der.context(0), der.enumerated(int(status.reason)))
    return der.tlv(_REVOKED_TAG, body)


def _single_response(single: SingleResponseData) -> bytes:
    parts = [
        single.cert_id.der,
        _cert_status(single.status),
        der.generalized_time(single.this_update),
    ]
    if single.next_update is not None:
        parts.append(der.tlv(der.context(0), der.generalized_time(single.next_update)))
    status = single.status
    if status.status is Status.revoked and status.invalidity_date is not None:
        extension = _extension(
            _INVALIDITY_DATE_OID_DER, der.generalized_time(status.invalidity_date)
        )
        parts.append(der.tlv(der.context(1), der.sequence(extension)))
    return der.sequence(*parts)


def build_response_data(
    responder_key_hash: bytes,
    produced_at: datetime,
    singles: Sequence[SingleResponseData],
    nonce: bytes | None,
) -> bytes:
    """DER of ResponseData (the tbsResponseData a signer signs).

    Version v1 is the DEFAULT and so omitted; responderID is byKey; times are
    GeneralizedTime in whole seconds. ``nonce`` is the request's nonce extnValue,
    echoed as a non-critical responseExtension.
    """
    if len(responder_key_hash) != 20:
        raise ValueError("responder key hash must be a 20-byte SHA-1")
    if not singles:
        raise ValueError("a ResponseData needs at least one SingleResponse")
    parts = [
        der.tlv(der.context(2), der.octet_string(responder_key_hash)),
        der.generalized_time(produced_at),
        der.sequence(*(_single_response(single) for single in singles)),
    ]
    if nonce is not None:
        parts.append(der.tlv(der.context(1), der.sequence(_extension(_NONCE_OID_DER, nonce))))
    return der.sequence(*parts)


def build_ocsp_response(
    tbs_response_data: bytes,
    signature_algorithm_der: bytes,
    signature: bytes,
    certs_der: Sequence[bytes],
) -> bytes:
    """DER of a successful OCSPResponse carrying a BasicOCSPResponse.

    ``tbs_response_data`` is embedded unchanged (it is what was signed); ``certs``
    is present only when ``certs_der`` is non-empty (a delegated responder cert,
    once).
    """
    parts = [tbs_response_data, signature_algorithm_der, der.bit_string(signature)]
    if certs_der:
        parts.append(der.tlv(der.context(0), der.sequence(*certs_der)))
    basic = der.sequence(*parts)
    response_bytes = der.sequence(_ID_PKIX_OCSP_BASIC, der.octet_string(basic))
    return der.sequence(_SUCCESSFUL, der.tlv(der.context(0), response_bytes))
