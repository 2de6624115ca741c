"""What a parsed OCSP request is made of: CertIDs, the request summary, the hash tables.

Shared by the parser (:mod:`.fastparse`), the request front door (:mod:`.request`),
and the response builder (:mod:`.response`); it imports only :mod:`.der`, so none
of them has to import another to get these types.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsmocsp.errors import UnsupportedHashAlgorithm
from hsmocsp.ocsp import der

#: More CertIDs than this in one request is refused (each costs a lookup and a
#: SingleResponse); counted while walking the bytes, so the 65th ends the walk.
MAX_CERT_IDS = 64
#: RFC 9654 (obsoletes RFC 8954's 1..32): a nonce is 1..128 octets; longer is refused.
MAX_NONCE_LENGTH = 128
#: Extensions in one Extensions list (request or single request). Real clients send
#: one or two; the cap bounds the work a request can ask for before it is refused.
MAX_EXTENSIONS = 16

NONCE_OID = "1.3.6.1.5.5.7.48.1.2"
ACCEPTABLE_RESPONSES_OID = "1.3.6.1.5.5.7.48.1.4"
SERVICE_LOCATOR_OID = "1.3.6.1.5.5.7.48.1.7"
PREFERRED_SIG_ALGS_OID = "1.3.6.1.5.5.7.48.1.8"

#: hash algorithm OID -> (our name, digest length)
HASHES: dict[str, tuple[str, int]] = {
    "1.3.14.3.2.26": ("sha1", 20),
    "2.16.840.1.101.3.4.2.1": ("sha256", 32),
    "2.16.840.1.101.3.4.2.2": ("sha384", 48),
    "2.16.840.1.101.3.4.2.3": ("sha512", 64),
}


def algorithm_identifier(dotted: str, null_params: bool) -> bytes:
    """AlgorithmIdentifier DER: the OID with NULL or absent parameters."""
    return der.sequence(der.oid(dotted), b"\x05\x00" if null_params else b"")


# AlgorithmIdentifier DER per (hash name, NULL parameters present): the echo must keep
# the client's choice, since some clients compare the CertID byte for byte.
HASH_ALGORITHM_DER: dict[tuple[str, bool], bytes] = {
    (name, with_null): algorithm_identifier(dotted, with_null)
    for dotted, (name, _) in HASHES.items()
    for with_null in (False, True)
}
#: The same, the other way round: AlgorithmIdentifier DER -> (name, digest length).
HASH_BY_ALGORITHM_DER: dict[bytes, tuple[str, int]] = {
    algorithm: (name, dict(HASHES.values())[name])
    for (name, _), algorithm in HASH_ALGORITHM_DER.items()
}


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
        algorithm = HASH_ALGORITHM_DER[(hash_algorithm, null_params)]
    except KeyError:
        raise UnsupportedHashAlgorithm(f"unsupported hash algorithm {hash_algorithm!r}") from None
    return der.sequence(
        algorithm, der.octet_string(name_hash), der.octet_string(key_hash), der.integer(serial)
    )


def make_cert_id(hash_algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
                 *, null_params: bool = True) -> CertID:
    """A :class:`CertID` built from its parts, with its DER (see :func:`cert_id_der`)."""
    return CertID(
        hash_algorithm, name_hash, key_hash, serial,
        cert_id_der(hash_algorithm, name_hash, key_hash, serial, null_params=null_params),
    )
