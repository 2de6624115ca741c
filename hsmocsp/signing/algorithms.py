"""Signature algorithms: which PKCS#11 mechanism, which AlgorithmIdentifier, which digest.

The AlgorithmIdentifier DERs are written out as constants rather than built with
pyasn1 at run time: they are tiny, fixed, and a byte-exact constant is easy to
check against RFC 4055 (RSA: parameters MUST be an explicit NULL) and RFC 5758
(ECDSA: parameters MUST be absent). Unit tests decode them back to their OIDs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsmocsp.errors import SignerError

# sha256WithRSAEncryption: 1.2.840.113549.1.1.11, parameters NULL. RSA keys sign with
# SHA-256 only: no configuration key ever chose another digest (an ``rsa_hash`` signer
# option did, reached only from tests; removed), and every OCSP client verifies it.
SHA256_WITH_RSA_DER = bytes.fromhex("300d06092a864886f70d01010b0500")

# ecdsa-with-SHA{256,384,512}: 1.2.840.10045.4.3.{2,3,4}, parameters absent.
ECDSA_WITH_SHA256_DER = bytes.fromhex("300a06082a8648ce3d040302")
ECDSA_WITH_SHA384_DER = bytes.fromhex("300a06082a8648ce3d040303")
ECDSA_WITH_SHA512_DER = bytes.fromhex("300a06082a8648ce3d040304")

# Curve -> (AlgorithmIdentifier, digest). The digest follows the curve size so the
# hash is never weaker than the key (FIPS 186-4 / CA/B practice).
_EC: dict[str, tuple[bytes, hashes.HashAlgorithm]] = {
    "secp256r1": (ECDSA_WITH_SHA256_DER, hashes.SHA256()),
    "secp384r1": (ECDSA_WITH_SHA384_DER, hashes.SHA384()),
    "secp521r1": (ECDSA_WITH_SHA512_DER, hashes.SHA512()),
}


@dataclass(frozen=True)
class SignatureAlgorithm:
    """How to sign with one key.

    ``mechanism`` is the PKCS#11 mechanism name. ``prehash`` says whether the
    caller digests ``data`` with ``digest`` before handing it to the mechanism
    (CKM_ECDSA signs a digest; CKM_SHA256_RSA_PKCS hashes inside the token).
    """

    mechanism: str
    algorithm_identifier_der: bytes
    digest: hashes.HashAlgorithm
    prehash: bool

    @property
    def is_ecdsa(self) -> bool:
        return self.mechanism == "CKM_ECDSA"


def choose_algorithm(public_key: PublicKeyTypes) -> SignatureAlgorithm:
    """Pick (mechanism, AlgorithmIdentifier DER, digest) for ``public_key``.

    RSA -> PKCS#1 v1.5 with SHA-256; P-256/P-384/P-521 ->
    ECDSA with SHA-256/384/512. Anything else is a :class:`SignerError`: an OCSP
    client would not verify it, so we refuse at start-up rather than per request.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise SignerError(f"RSA key of {public_key.key_size} bits is too small (< 2048)")
        return SignatureAlgorithm(
            "CKM_SHA256_RSA_PKCS", SHA256_WITH_RSA_DER, hashes.SHA256(), prehash=False
        )
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        try:
            der, digest = _EC[public_key.curve.name]
        except KeyError:
            raise SignerError(
                f"unsupported EC curve {public_key.curve.name}; use P-256, P-384 or P-521"
            ) from None
        return SignatureAlgorithm("CKM_ECDSA", der, digest, prehash=True)
    raise SignerError(f"unsupported key type {type(public_key).__name__}; use RSA or EC")


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """Re-encode a PKCS#11 ECDSA signature (r || s, fixed width) as DER Ecdsa-Sig-Value.

    PKCS#11 returns the two integers concatenated, each padded to the curve's
    byte length; X.509/OCSP wants ``SEQUENCE { r INTEGER, s INTEGER }``.
    """
    if not raw or len(raw) % 2:
        raise SignerError(f"malformed ECDSA signature from the token ({len(raw)} bytes)")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    if r == 0 or s == 0:
        raise SignerError("malformed ECDSA signature from the token (zero r or s)")
    return encode_dss_signature(r, s)
