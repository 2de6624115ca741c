"""Parse OCSP requests (RFC 6960 section 4.1, RFC 5019 GET encoding, RFC 8954 nonce).

Everything that is wrong with a request ends as :class:`~hsmocsp.errors.MalformedRequest`
(or its subclass :class:`~hsmocsp.errors.UnsupportedHashAlgorithm`) with a short
message; no other exception type escapes, whatever the bytes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc6960

from hsmocsp.errors import MalformedRequest, UnsupportedHashAlgorithm
from hsmocsp.ocsp import der as _der
from hsmocsp.ocsp import fastparse as _fastparse

#: More CertIDs than this in one request is refused (each costs a lookup and a SingleResponse).
MAX_CERT_IDS = 64
#: RFC 8954: responders should accept nonces of 1..32 octets; longer ones invite abuse.
MAX_NONCE_LENGTH = 32

NONCE_OID = "1.3.6.1.5.5.7.48.1.2"
_ACCEPTABLE_RESPONSES_OID = "1.3.6.1.5.5.7.48.1.4"
_PREFERRED_SIG_ALGS_OID = "1.3.6.1.5.5.7.48.1.8"
_SERVICE_LOCATOR_OID = "1.3.6.1.5.5.7.48.1.7"

# Extensions we understand well enough that a client may mark them critical.
_KNOWN_REQUEST_EXTENSIONS = frozenset(
    {NONCE_OID, _ACCEPTABLE_RESPONSES_OID, _PREFERRED_SIG_ALGS_OID}
)
_KNOWN_SINGLE_REQUEST_EXTENSIONS = frozenset({_SERVICE_LOCATOR_OID})

#: hash algorithm OID -> (our name, digest length)
_HASHES: dict[str, tuple[str, int]] = {
    "1.3.14.3.2.26": ("sha1", 20),
    "2.16.840.1.101.3.4.2.1": ("sha256", 32),
    "2.16.840.1.101.3.4.2.2": ("sha384", 48),
    "2.16.840.1.101.3.4.2.3": ("sha512", 64),
}

_LENGTHS = dict(_HASHES.values())

# pyasn1 only reads its asn1Spec (a schema); one shared instance saves ~25% per decode.
_REQUEST_SPEC = rfc6960.OCSPRequest()

# AlgorithmIdentifier DER per (hash name, NULL parameters present): the echo must keep
# the client's choice, since some clients compare the CertID byte for byte.
_ALGORITHM_DER: dict[tuple[str, bool], bytes] = {
    (name, with_null): _der.sequence(_der.oid(dotted), b"\x05\x00" if with_null else b"")
    for dotted, (name, _) in _HASHES.items()
    for with_null in (False, True)
}
#: The same, the other way round, for the fast path: AlgorithmIdentifier DER -> (name, length).
_ALGORITHM_BY_DER: dict[bytes, tuple[str, int]] = {
    algorithm: (name, _LENGTHS[name]) for (name, _), algorithm in _ALGORITHM_DER.items()
}
_NONCE_OID_DER = _der.oid(NONCE_OID)


@dataclass(frozen=True, slots=True)
class CertID:
    """One CertID of a request.

    ``der`` is the CertID exactly as it must be echoed in the SingleResponse: the
    DER encoding of what the client sent, including its choice of NULL or absent
    hashAlgorithm parameters.
    """

    hash_algorithm: str  # 'sha1' | 'sha256' | 'sha384' | 'sha512'
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int
    der: bytes


@dataclass(frozen=True, slots=True)
class OCSPRequestInfo:
    """What the responder needs from a request.

    ``nonce`` is the nonce extension's extnValue (a DER OCTET STRING holding the
    nonce octets) to echo verbatim, or None when the request has no nonce.
    """

    cert_ids: tuple[CertID, ...]
    nonce: bytes | None


def cert_id_der(hash_algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
                *, null_params: bool = True) -> bytes:
    """DER of a CertID built from its parts (for pre-signing, when no request exists).

    ``null_params`` chooses NULL (as OpenSSL and cryptography send) or absent
    hashAlgorithm parameters.
    """
    try:
        algorithm = _ALGORITHM_DER[(hash_algorithm, null_params)]
    except KeyError:
        raise UnsupportedHashAlgorithm(f"unsupported hash algorithm {hash_algorithm!r}") from None
    return _der.sequence(
        algorithm, _der.octet_string(name_hash), _der.octet_string(key_hash), _der.integer(serial)
    )


def make_cert_id(hash_algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
                 *, null_params: bool = True) -> CertID:
    """A :class:`CertID` built from its parts, with its DER (see :func:`cert_id_der`)."""
    return CertID(
        hash_algorithm, name_hash, key_hash, serial,
        cert_id_der(hash_algorithm, name_hash, key_hash, serial, null_params=null_params),
    )


def parse_request(der: bytes) -> OCSPRequestInfo:
    """Decode and check a DER OCSPRequest.

    Refuses trailing bytes, a version other than v1, an empty or over-long
    requestList, unknown critical extensions, hash algorithms other than
    SHA-1/256/384/512 (:class:`UnsupportedHashAlgorithm`), hashes of the wrong
    length and nonces outside 1..32 octets. The optional request signature is
    not checked (RFC 6960 lets a responder ignore it).
    """
    if not der:
        raise MalformedRequest("empty request")
    # The common shape, read directly; None means "ask pyasn1" (unusual or invalid).
    info = _fastparse.parse_common(der)
    if info is not None:
        return info
    return parse_request_pyasn1(der)


def parse_request_pyasn1(der: bytes) -> OCSPRequestInfo:
    """:func:`parse_request` without the fast path: pyasn1 decides everything.

    The reference the fast path is tested against; also what answers every
    request the fast path declines.
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
        raise MalformedRequest(f"too many CertIDs ({count} > {MAX_CERT_IDS})")
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
    known = _HASHES.get(dotted)
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
    """RFC 8954: extnValue is a DER OCTET STRING of 1..32 octets, nothing after it."""
    if len(value) < 2 or value[0] != _der.OCTET_STRING:
        raise MalformedRequest("nonce is not an OCTET STRING")
    length = value[1]
    if length >= 0x80 or length != len(value) - 2:
        raise MalformedRequest("nonce is too long or badly encoded")
    if not 1 <= length <= MAX_NONCE_LENGTH:
        raise MalformedRequest(f"nonce length {length} outside 1..{MAX_NONCE_LENGTH}")


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
