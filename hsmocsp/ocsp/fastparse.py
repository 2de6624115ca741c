"""The OCSPRequest parser: one strict walk over the DER bytes, limits checked on the way.

An OCSPRequest (RFC 6960 section 4.1.1) is small and has a fixed shape. Walking
its bytes once costs a few microseconds per CertID; pyasn1's full decode cost
~150-300 µs for one CertID and 28.6 ms for a request of 150 CertIDs, which an
attacker could send without ever needing a signature (#9.4). So this walk is the
parser, and every limit is enforced while walking, before any work the limit is
meant to bound: the 65th CertID ends the walk (:data:`MAX_CERT_IDS`), and so does
the 17th extension of a list (:data:`MAX_EXTENSIONS`); parts the responder
ignores (the content of requestorName, the optional signature, the values of
extensions it does not know) are stepped over by their length, never descended
into, so nesting costs nothing (and a request broken only inside those parts is
answered where pyasn1 refused it: they are not used). pyasn1 is no longer on the
request path: it is the reference the walk is tested against
(tests/unit/test_ocsp_fastparse.py, with hypothesis).

Strict DER only: definite minimal lengths, minimal INTEGERs, single-byte tags,
no trailing bytes. Anything else is :class:`~hsmocsp.errors.MalformedRequest`
(or :class:`~hsmocsp.errors.UnsupportedHashAlgorithm`), whatever the bytes: the
walk raises nothing else.
"""

from __future__ import annotations

from typing import NoReturn

from hsmocsp.errors import MalformedRequest, UnsupportedHashAlgorithm
from hsmocsp.ocsp import der as _der
from hsmocsp.ocsp.types import (
    ACCEPTABLE_RESPONSES_OID,
    HASH_BY_ALGORITHM_DER,
    HASHES,
    MAX_CERT_IDS,
    MAX_EXTENSIONS,
    MAX_NONCE_LENGTH,
    NONCE_OID,
    PREFERRED_SIG_ALGS_OID,
    SERVICE_LOCATOR_OID,
    CertID,
    OCSPRequestInfo,
)

_SEQUENCE = _der.SEQUENCE
_OCTET_STRING = _der.OCTET_STRING
_INTEGER = _der.INTEGER
_BOOLEAN = _der.BOOLEAN
_OID = _der.OID
_NULL_PARAMS = b"\x05\x00"
_NONCE_OID_DER = _der.oid(NONCE_OID)

# GeneralName CHOICE tags: otherName [0], x400Address [3], directoryName [4] and
# ediPartyName [5] are constructed; rfc822Name [1], dNSName [2], URI [6], iPAddress [7]
# and registeredID [8] primitive.
_GENERAL_NAME_TAGS = frozenset(
    [_der.context(n) for n in (0, 3, 4, 5)]
    + [_der.context(n, constructed=False) for n in (1, 2, 6, 7, 8)]
)

# Extensions we understand well enough that a client may mark them critical.
_KNOWN_REQUEST_EXTENSIONS = frozenset(
    _der.oid(o) for o in (NONCE_OID, ACCEPTABLE_RESPONSES_OID, PREFERRED_SIG_ALGS_OID)
)
_KNOWN_SINGLE_REQUEST_EXTENSIONS = frozenset({_der.oid(SERVICE_LOCATOR_OID)})


def parse(der: bytes) -> OCSPRequestInfo:
    """Parse a DER OCSPRequest; :class:`MalformedRequest` for anything wrong with it."""
    if not der:
        raise MalformedRequest("empty request")
    try:
        return _parse(der)
    except (ValueError, IndexError) as err:
        raise MalformedRequest(f"request is not a DER OCSPRequest ({err})") from None


def _expect(der: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """``(content_start, element_end)`` of the element at ``pos``, which must have ``tag``."""
    found, start, stop = _der.read_tlv(der, pos, end)
    if found != tag:
        raise MalformedRequest(f"{what}: expected tag 0x{tag:02x}, found 0x{found:02x}")
    return start, stop


def _parse(der: bytes) -> OCSPRequestInfo:
    size = len(der)
    # OCSPRequest ::= SEQUENCE { tbsRequest, optionalSignature [0] EXPLICIT Signature OPTIONAL }
    pos, end = _expect(der, 0, size, _SEQUENCE, "OCSPRequest")
    if end != size:
        raise MalformedRequest("trailing bytes after the OCSPRequest")
    # TBSRequest ::= SEQUENCE { version [0] EXPLICIT DEFAULT v1, requestorName [1] EXPLICIT
    #                           OPTIONAL, requestList SEQUENCE OF Request,
    #                           requestExtensions [2] EXPLICIT Extensions OPTIONAL }
    pos, tbs_end = _expect(der, pos, end, _SEQUENCE, "tbsRequest")
    if tbs_end != end:
        # The optional signature: one [0] element, stepped over unread (RFC 6960 lets a
        # responder ignore it, and we do).
        tag, _, sig_end = _der.read_tlv(der, tbs_end, end)
        if tag != _der.context(0) or sig_end != end:
            raise MalformedRequest("unexpected data after tbsRequest")
    tag, start, stop = _der.read_tlv(der, pos, tbs_end)
    if tag == _der.context(0):
        version_start, version_end = _expect(der, start, stop, _INTEGER, "version")
        if version_end != stop:
            raise MalformedRequest("version: trailing bytes")
        version = _integer(der, version_start, version_end)
        if version != 0:
            raise MalformedRequest(f"unsupported request version {version}")
        pos = stop
        tag, start, stop = _der.read_tlv(der, pos, tbs_end)
    if tag == _der.context(1):  # requestorName: not used; its shape is checked, not its content
        name_tag, _, name_end = _der.read_tlv(der, start, stop)
        if name_tag not in _GENERAL_NAME_TAGS or name_end != stop:
            raise MalformedRequest("requestorName is not a GeneralName")
        pos = stop
        tag, start, stop = _der.read_tlv(der, pos, tbs_end)
    if tag != _SEQUENCE:
        raise MalformedRequest("tbsRequest has no requestList")
    cert_ids = _request_list(der, start, stop)
    nonce = None
    if stop != tbs_end:
        ext_start, ext_end = _expect(der, stop, tbs_end, _der.context(2), "requestExtensions")
        if ext_end != tbs_end:
            raise MalformedRequest("unexpected data after requestExtensions")
        seen = _extensions(der, ext_start, ext_end, _KNOWN_REQUEST_EXTENSIONS)
        value = seen.get(_NONCE_OID_DER)
        if value is not None:
            nonce = _nonce(der, *value)
    return OCSPRequestInfo(tuple(cert_ids), nonce)


def _request_list(der: bytes, pos: int, end: int) -> list[CertID]:
    cert_ids: list[CertID] = []
    while pos < end:
        if len(cert_ids) == MAX_CERT_IDS:
            raise MalformedRequest(f"too many CertIDs (more than {MAX_CERT_IDS})")
        # Request ::= SEQUENCE { reqCert CertID, singleRequestExtensions [0] EXPLICIT OPTIONAL }
        start, single_end = _expect(der, pos, end, _SEQUENCE, "Request")
        cert_ids.append(_cert_id(der, start, single_end))
        pos = single_end
    if not cert_ids:
        raise MalformedRequest("empty requestList")
    return cert_ids


def _cert_id(der: bytes, pos: int, single_end: int) -> CertID:
    cid_start = pos
    content, cid_end = _expect(der, pos, single_end, _SEQUENCE, "CertID")
    if cid_end != single_end:
        ext_start, ext_end = _expect(
            der, cid_end, single_end, _der.context(0), "singleRequestExtensions"
        )
        if ext_end != single_end:
            raise MalformedRequest("unexpected data after singleRequestExtensions")
        _extensions(der, ext_start, ext_end, _KNOWN_SINGLE_REQUEST_EXTENSIONS)
    # CertID ::= SEQUENCE { hashAlgorithm, issuerNameHash, issuerKeyHash, serialNumber }
    alg_start, alg_end = _expect(der, content, cid_end, _SEQUENCE, "hashAlgorithm")
    known = HASH_BY_ALGORITHM_DER.get(der[content:alg_end])
    if known is None:
        _unknown_algorithm(der, alg_start, alg_end)
    name, length = known
    name_start, name_end = _expect(der, alg_end, cid_end, _OCTET_STRING, "issuerNameHash")
    key_start, key_end = _expect(der, name_end, cid_end, _OCTET_STRING, "issuerKeyHash")
    if name_end - name_start != length or key_end - key_start != length:
        raise MalformedRequest(f"CertID hash length does not match {name}")
    serial_start, serial_end = _expect(der, key_end, cid_end, _INTEGER, "serialNumber")
    if serial_end != cid_end:
        raise MalformedRequest("CertID: trailing fields")
    return CertID(
        name, der[name_start:name_end], der[key_start:key_end],
        _integer(der, serial_start, serial_end), der[cid_start:cid_end],
    )


def _unknown_algorithm(der: bytes, start: int, end: int) -> NoReturn:
    """Say what is wrong with a hashAlgorithm that is not one of ours (always raises)."""
    oid_start, oid_end = _expect(der, start, end, _OID, "hashAlgorithm")
    dotted = _der.oid_text(der[oid_start:oid_end])
    if dotted not in HASHES:
        raise UnsupportedHashAlgorithm(f"unsupported CertID hash algorithm {dotted}")
    raise MalformedRequest("CertID hash algorithm parameters must be NULL or absent")


def _integer(der: bytes, start: int, end: int) -> int:
    """A minimal two's-complement INTEGER."""
    if end == start:
        raise MalformedRequest("empty INTEGER")
    if end - start > 1:
        lead, second = der[start], der[start + 1]
        if (lead == 0 and second < 0x80) or (lead == 0xFF and second >= 0x80):
            raise MalformedRequest("INTEGER is not minimally encoded")
    return int.from_bytes(der[start:end], "big", signed=True)


def _extensions(
    der: bytes, pos: int, end: int, known: frozenset[bytes]
) -> dict[bytes, tuple[int, int]]:
    """Check an ``[n] EXPLICIT Extensions`` body; ``{extnID DER: (value start, end)}``.

    Refuses an empty list, more than :data:`MAX_EXTENSIONS`, duplicates and
    unknown critical extensions. The extnValue of an extension is not read here.
    """
    start, list_end = _expect(der, pos, end, _SEQUENCE, "Extensions")
    if list_end != end:
        raise MalformedRequest("unexpected data after Extensions")
    seen: dict[bytes, tuple[int, int]] = {}
    pos = start
    while pos < list_end:
        if len(seen) == MAX_EXTENSIONS:
            raise MalformedRequest(f"too many extensions (more than {MAX_EXTENSIONS})")
        # Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue }
        content, ext_end = _expect(der, pos, list_end, _SEQUENCE, "Extension")
        oid_start, oid_end = _expect(der, content, ext_end, _OID, "extnID")
        oid = der[content:oid_end]
        dotted = _der.oid_text(der[oid_start:oid_end])  # validates the encoding
        if oid in seen:
            raise MalformedRequest(f"duplicate extension {dotted}")
        tag, value_start, value_end = _der.read_tlv(der, oid_end, ext_end)
        critical = False
        if tag == _BOOLEAN:
            if value_end - value_start != 1 or der[value_start] not in (0x00, 0xFF):
                raise MalformedRequest("critical is not a DER BOOLEAN")
            critical = der[value_start] == 0xFF
            tag, value_start, value_end = _der.read_tlv(der, value_end, ext_end)
        if tag != _OCTET_STRING or value_end != ext_end:
            raise MalformedRequest(f"extension {dotted}: extnValue is not an OCTET STRING")
        if critical and oid not in known:
            raise MalformedRequest(f"unsupported critical extension {dotted}")
        seen[oid] = (value_start, value_end)
        pos = ext_end
    if not seen:
        raise MalformedRequest("empty Extensions")
    return seen


def _nonce(der: bytes, start: int, end: int) -> bytes:
    """RFC 9654: extnValue is a DER OCTET STRING of 1..128 octets, nothing after it.

    Returns the extnValue (the inner OCTET STRING's DER), which the response echoes.
    """
    try:
        tag, inner_start, inner_end = _der.read_tlv(der, start, end)
    except ValueError as err:
        raise MalformedRequest(f"nonce is badly encoded ({err})") from None
    if tag != _OCTET_STRING:
        raise MalformedRequest("nonce is not an OCTET STRING")
    if inner_end != end:
        raise MalformedRequest("nonce: trailing bytes")
    length = inner_end - inner_start
    if not 1 <= length <= MAX_NONCE_LENGTH:
        raise MalformedRequest(f"nonce length {length} outside 1..{MAX_NONCE_LENGTH}")
    return der[start:end]
