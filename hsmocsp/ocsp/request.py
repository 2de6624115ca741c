"""Parse OCSP requests (RFC 6960 section 4.1, RFC 5019 GET encoding, RFC 9654 nonce).

Everything that is wrong with a request ends as :class:`~hsmocsp.errors.MalformedRequest`
(or its subclass :class:`~hsmocsp.errors.UnsupportedHashAlgorithm`) with a short
message; no other exception type escapes, whatever the bytes.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote_to_bytes

from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc6960

from hsmocsp.errors import MalformedRequest, UnsupportedHashAlgorithm
from hsmocsp.ocsp import der as _der
from hsmocsp.ocsp import fastparse as _fastparse
from hsmocsp.ocsp.types import (
    ACCEPTABLE_RESPONSES_OID,
    HASHES,
    MAX_CERT_IDS,
    MAX_EXTENSIONS,
    MAX_NONCE_LENGTH,
    NONCE_OID,
    PREFERRED_SIG_ALGS_OID,
    SERVICE_LOCATOR_OID,
    CertID,
    OCSPRequestInfo,
    cert_id_der,
    make_cert_id,
)

__all__ = [
    "MAX_CERT_IDS",
    "MAX_EXTENSIONS",
    "MAX_NONCE_LENGTH",
    "NONCE_OID",
    "CertID",
    "OCSPRequestInfo",
    "cert_id_der",
    "decode_get_path",
    "make_cert_id",
    "parse_request",
    "parse_request_pyasn1",
]

# Extensions we understand well enough that a client may mark them critical.
_KNOWN_REQUEST_EXTENSIONS = frozenset(
    {NONCE_OID, ACCEPTABLE_RESPONSES_OID, PREFERRED_SIG_ALGS_OID}
)
_KNOWN_SINGLE_REQUEST_EXTENSIONS = frozenset({SERVICE_LOCATOR_OID})

# pyasn1 only reads its asn1Spec (a schema); one shared instance saves ~25% per decode.
_REQUEST_SPEC = rfc6960.OCSPRequest()


def parse_request(der: bytes) -> OCSPRequestInfo:
    """Decode and check a DER OCSPRequest (one strict walk, :mod:`.fastparse`).

    Refuses trailing bytes, a version other than v1, an empty or over-long
    requestList, unknown critical extensions, hash algorithms other than
    SHA-1/256/384/512 (:class:`UnsupportedHashAlgorithm`), hashes of the wrong
    length and nonces outside 1..128 octets (RFC 9654). The optional request
    signature is not checked (RFC 6960 lets a responder ignore it).
    """
    return _fastparse.parse(der)


def parse_request_pyasn1(der: bytes) -> OCSPRequestInfo:
    """:func:`parse_request` written with pyasn1: the reference the walk is tested against.

    Not used to answer requests: a full pyasn1 decode costs 150 µs to 30 ms of CPU
    and would run before the limits it checks (#9.4).
    """
    if not der:
        raise MalformedRequest("empty request")
    try:
        request, rest = der_decoder.decode(der, asn1Spec=_REQUEST_SPEC)
    except Exception as err:  # pyasn1 raises PyAsn1Error, but also others on odd input
        raise MalformedRequest("request is not a DER OCSPRequest") from err
    if rest:
        raise MalformedRequest("trailing bytes after the OCSPRequest")
    try:
        return _extract(request)
    except MalformedRequest:
        raise
    except Exception as err:  # a structure pyasn1 accepted but we cannot read
        raise MalformedRequest("unreadable OCSPRequest") from err


def _extract(request: Any) -> OCSPRequestInfo:
    tbs = request["tbsRequest"]
    version = tbs["version"]
    if version.isValue and int(version) != 0:
        raise MalformedRequest(f"unsupported request version {int(version)}")
    request_list = tbs["requestList"]
    count = len(request_list)
    if count == 0:
        raise MalformedRequest("empty requestList")
    if count > MAX_CERT_IDS:
        raise MalformedRequest(f"too many CertIDs (more than {MAX_CERT_IDS})")
    cert_ids = []
    for single in request_list:
        cert_ids.append(_cert_id(single["reqCert"]))
        single_extensions = single["singleRequestExtensions"]
        if single_extensions.isValue:
            _check_extensions(single_extensions, _KNOWN_SINGLE_REQUEST_EXTENSIONS)
    nonce = None
    extensions = tbs["requestExtensions"]
    if extensions.isValue:
        seen = _check_extensions(extensions, _KNOWN_REQUEST_EXTENSIONS)
        nonce = seen.get(NONCE_OID)
        if nonce is not None:
            _check_nonce(nonce)
    return OCSPRequestInfo(tuple(cert_ids), nonce)


def _cert_id(cert_id: Any) -> CertID:
    algorithm = cert_id["hashAlgorithm"]
    dotted = str(algorithm["algorithm"])
    known = HASHES.get(dotted)
    if known is None:
        raise UnsupportedHashAlgorithm(f"unsupported CertID hash algorithm {dotted}")
    name, length = known
    parameters = algorithm["parameters"]
    with_null = parameters.isValue
    if with_null and bytes(parameters) != b"\x05\x00":
        raise MalformedRequest("CertID hash algorithm parameters must be NULL or absent")
    name_hash = bytes(cert_id["issuerNameHash"])
    key_hash = bytes(cert_id["issuerKeyHash"])
    if len(name_hash) != length or len(key_hash) != length:
        raise MalformedRequest(f"CertID hash length does not match {name}")
    serial = int(cert_id["serialNumber"])
    return CertID(
        name, name_hash, key_hash, serial,
        cert_id_der(name, name_hash, key_hash, serial, null_params=with_null),
    )


def _check_extensions(extensions: Any, known: frozenset[str]) -> dict[str, bytes]:
    """Refuse duplicates and unknown critical extensions; return ``{oid: extnValue}``."""
    seen: dict[str, bytes] = {}
    if len(extensions) > MAX_EXTENSIONS:
        raise MalformedRequest(f"too many extensions (more than {MAX_EXTENSIONS})")
    for extension in extensions:
        dotted = str(extension["extnID"])
        if dotted in seen:
            raise MalformedRequest(f"duplicate extension {dotted}")
        critical = extension["critical"]
        if critical.isValue and bool(critical) and dotted not in known:
            raise MalformedRequest(f"unsupported critical extension {dotted}")
        seen[dotted] = bytes(extension["extnValue"])
    return seen


def _check_nonce(value: bytes) -> None:
    """RFC 9654: extnValue is a DER OCTET STRING of 1..128 octets, nothing after it."""
    try:
        tag, start, end = _der.read_tlv(value)
    except ValueError as err:
        raise MalformedRequest("nonce is badly encoded") from err
    if tag != _der.OCTET_STRING:
        raise MalformedRequest("nonce is not an OCTET STRING")
    if end != len(value):
        raise MalformedRequest("nonce: trailing bytes")
    if not 1 <= end - start <= MAX_NONCE_LENGTH:
        raise MalformedRequest(f"nonce length {end - start} outside 1..{MAX_NONCE_LENGTH}")


def decode_get_path(encoded: str) -> bytes:
    """Turn the raw URI tail of a GET request into the DER OCSPRequest.

    ``encoded`` is the part after the handle's path, still percent-escaped (the
    web layer must pass the raw URI, since Twisted's unquoting turns ``%2F`` into
    a path separator). Accepts what real clients send: ``%2F``/``%2B``/``%3D``
    escapes, raw ``/`` inside the base64, extra leading ``/`` (an AIA URL with a
    trailing slash), a space where ``+`` was, missing ``=`` padding and the
    URL-safe alphabet. Anything else is :class:`MalformedRequest`.
    """
    try:
        raw = unquote_to_bytes(encoded.encode("ascii"))
    except (UnicodeError, ValueError) as err:
        raise MalformedRequest("GET request path is not ASCII") from err
    # A DER SEQUENCE base64-encodes to 'M...', never '/...': leading slashes are separators.
    text = raw.lstrip(b"/").replace(b" ", b"+").replace(b"-", b"+").replace(b"_", b"/")
    text = text.rstrip(b"=")
    if not text:
        raise MalformedRequest("empty GET request")
    if len(text) % 4 == 1:
        raise MalformedRequest("GET request is not valid base64 (bad length)")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MalformedRequest("GET request is not valid base64") from err
