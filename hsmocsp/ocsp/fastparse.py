"""A direct DER walk for the common OCSPRequest shape, in front of pyasn1.

pyasn1 costs ~150-300 µs per request, a third of the reactor's time on the
cache-miss path. Nearly every real request has one shape: one or a few CertIDs
with SHA-1/256/384/512, NULL or absent hash parameters, an optional nonce
extension, no version, no requestorName, no signature, no per-CertID extensions.
:func:`parse_common` reads exactly that shape, strictly (minimal DER lengths and
integers, primitive OCTET STRINGs, byte-exact AlgorithmIdentifiers), and returns
None for anything else, including every malformed request: then the pyasn1 path
in :func:`hsmocsp.ocsp.request.parse_request` decides, and produces the error
message. So this module never accepts what pyasn1 rejects, and when it accepts,
its result equals pyasn1's (tests/unit/test_ocsp_fastparse.py checks both with
hypothesis).
"""

from __future__ import annotations

from hsmocsp.ocsp import der as _der
from hsmocsp.ocsp import request as _request  # circular: read at call time only

_SEQUENCE = _der.SEQUENCE
_OCTET_STRING = _der.OCTET_STRING
_INTEGER = _der.INTEGER
_REQUEST_EXTENSIONS = _der.context(2)  # [2] EXPLICIT Extensions


def _tlv(data: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    """``(tag, content_start, end)`` of the element at ``pos``, which must end by ``limit``.

    Single-byte tags, definite minimal lengths of at most 3 length octets; a
    ValueError (caught by the caller) on anything else.
    """
    if pos + 2 > limit:
        raise ValueError("truncated")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        end = pos + first
    elif first == 0x81:
        length = data[pos]
        if length < 0x80:
            raise ValueError("non-minimal length")
        pos += 1
        end = pos + length
    elif first == 0x82:
        if pos + 2 > limit or data[pos] == 0:
            raise ValueError("non-minimal length")
        length = (data[pos] << 8) | data[pos + 1]
        pos += 2
        end = pos + length
    else:
        raise ValueError("unsupported length form")
    if end > limit:
        raise ValueError("overrun")
    return tag, pos, end


def parse_common(der: bytes) -> _request.OCSPRequestInfo | None:
    """The OCSPRequestInfo of a request of the common shape, or None (ask pyasn1)."""
    try:
        return _parse(der)
    except (ValueError, IndexError):
        return None


def _parse(der: bytes) -> _request.OCSPRequestInfo | None:
    algorithms = _request._ALGORITHM_BY_DER
    nonce_oid = _request._NONCE_OID_DER
    cert_id_type = _request.CertID
    size = len(der)
    # OCSPRequest ::= SEQUENCE { tbsRequest, optionalSignature [0] EXPLICIT OPTIONAL }
    tag, pos, end = _tlv(der, 0, size)
    if tag != _SEQUENCE or end != size:
        return None
    # TBSRequest ::= SEQUENCE { version [0] DEFAULT v1, requestorName [1] OPTIONAL,
    #                           requestList, requestExtensions [2] OPTIONAL }
    tag, pos, tbs_end = _tlv(der, pos, end)
    if tag != _SEQUENCE or tbs_end != end:  # no optionalSignature
        return None
    tag, pos, list_end = _tlv(der, pos, tbs_end)
    if tag != _SEQUENCE:  # version, requestorName: pyasn1's job
        return None
    cert_ids = []
    while pos < list_end:
        # Request ::= SEQUENCE { reqCert CertID, singleRequestExtensions [0] OPTIONAL }
        tag, cid_start, single_end = _tlv(der, pos, list_end)
        if tag != _SEQUENCE:
            return None
        tag, content, cid_end = _tlv(der, cid_start, single_end)
        if tag != _SEQUENCE or cid_end != single_end:
            return None
        # CertID ::= SEQUENCE { hashAlgorithm, issuerNameHash, issuerKeyHash, serialNumber }
        tag, _, alg_end = _tlv(der, content, cid_end)
        known = algorithms.get(der[content:alg_end]) if tag == _SEQUENCE else None
        if known is None:
            return None
        name, length = known
        tag, name_start, name_end = _tlv(der, alg_end, cid_end)
        if tag != _OCTET_STRING or name_end - name_start != length:
            return None
        tag, key_start, key_end = _tlv(der, name_end, cid_end)
        if tag != _OCTET_STRING or key_end - key_start != length:
            return None
        tag, serial_start, serial_end = _tlv(der, key_end, cid_end)
        if tag != _INTEGER or serial_end != cid_end or serial_end == serial_start:
            return None
        if serial_end - serial_start > 1:
            lead, second = der[serial_start], der[serial_start + 1]
            if (lead == 0 and second < 0x80) or (lead == 0xFF and second >= 0x80):
                return None  # non-minimal INTEGER
        cid_der = der[cid_start:cid_end]
        cert_ids.append(cert_id_type(
            name, der[name_start:name_end], der[key_start:key_end],
            int.from_bytes(der[serial_start:serial_end], "big", signed=True), cid_der,
        ))
        pos = single_end
    if not cert_ids or len(cert_ids) > _request.MAX_CERT_IDS:
        return None
    nonce = None
    if list_end != tbs_end:
        # requestExtensions [2] EXPLICIT Extensions holding exactly one, non-critical
        # (DEFAULT FALSE absent) nonce extension: anything else goes to pyasn1.
        tag, pos, ext_end = _tlv(der, list_end, tbs_end)
        if tag != _REQUEST_EXTENSIONS or ext_end != tbs_end:
            return None
        tag, pos, seq_end = _tlv(der, pos, ext_end)
        if tag != _SEQUENCE or seq_end != ext_end:
            return None
        tag, pos, one_end = _tlv(der, pos, seq_end)
        if tag != _SEQUENCE or one_end != seq_end:
            return None
        oid_end = pos + len(nonce_oid)
        if der[pos:oid_end] != nonce_oid:
            return None
        tag, value_start, value_end = _tlv(der, oid_end, one_end)
        if tag != _OCTET_STRING or value_end != one_end:
            return None
        # RFC 8954: extnValue is an OCTET STRING of 1..32 octets, nothing after it.
        n = value_end - value_start
        if not 3 <= n <= _request.MAX_NONCE_LENGTH + 2:
            return None
        if der[value_start] != _OCTET_STRING or der[value_start + 1] != n - 2:
            return None
        nonce = der[value_start:value_end]
    return _request.OCSPRequestInfo(tuple(cert_ids), nonce)
