"""Algorithm choice, AlgorithmIdentifier constants, ECDSA r||s -> DER."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ
from pyasn1_modules import rfc5280

from hsmocsp.errors import SignerError
from hsmocsp.signing import algorithms as alg


@pytest.mark.parametrize(
    ("der", "oid", "null_params"),
    [
        (alg.SHA256_WITH_RSA_DER, "1.2.840.113549.1.1.11", True),
        (alg.ECDSA_WITH_SHA256_DER, "1.2.840.10045.4.3.2", False),
        (alg.ECDSA_WITH_SHA384_DER, "1.2.840.10045.4.3.3", False),
        (alg.ECDSA_WITH_SHA512_DER, "1.2.840.10045.4.3.4", False),
    ],
)
def test_algorithm_identifier_constants(der: bytes, oid: str, null_params: bool) -> None:
    decoded, rest = decoder.decode(der, asn1Spec=rfc5280.AlgorithmIdentifier())
    assert rest == b""
    assert str(decoded["algorithm"]) == oid
    if null_params:
        assert decoded["parameters"].isValue
        assert encoder.encode(decoded["parameters"]) == encoder.encode(univ.Null(""))
    else:
        assert not decoded["parameters"].isValue
    assert encoder.encode(decoded) == der  # DER round trip: the constant is canonical


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_choose_rsa(rsa_key: rsa.RSAPrivateKey) -> None:
    a = alg.choose_algorithm(rsa_key.public_key())
    assert (a.mechanism, a.algorithm_identifier_der, a.prehash) == (
        "CKM_SHA256_RSA_PKCS", alg.SHA256_WITH_RSA_DER, False)
    assert isinstance(a.digest, hashes.SHA256) and not a.is_ecdsa


@pytest.mark.parametrize(
    ("curve", "der", "digest"),
    [
        (ec.SECP256R1(), alg.ECDSA_WITH_SHA256_DER, hashes.SHA256),
        (ec.SECP384R1(), alg.ECDSA_WITH_SHA384_DER, hashes.SHA384),
        (ec.SECP521R1(), alg.ECDSA_WITH_SHA512_DER, hashes.SHA512),
    ],
)
def test_choose_ec(curve: ec.EllipticCurve, der: bytes, digest: type[hashes.HashAlgorithm]) -> None:
    a = alg.choose_algorithm(ec.generate_private_key(curve).public_key())
    assert (a.mechanism, a.algorithm_identifier_der, a.prehash, a.is_ecdsa) == (
        "CKM_ECDSA", der, True, True)
    assert isinstance(a.digest, digest)


def test_choose_rejects_other_keys() -> None:
    with pytest.raises(SignerError, match="secp256k1"):
        alg.choose_algorithm(ec.generate_private_key(ec.SECP256K1()).public_key())
    with pytest.raises(SignerError, match="Ed25519"):
        alg.choose_algorithm(ed25519.Ed25519PrivateKey.generate().public_key())
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(SignerError, match="1024"):
        alg.choose_algorithm(small.public_key())


def test_ecdsa_raw_to_der_fixed_vector() -> None:
    # r has its top bit set (needs a 0x00 pad), s has leading zero bytes (stripped).
    r = bytes([0x80]) + bytes(31)
    s = bytes(31) + bytes([0x05])
    expected = bytes.fromhex("3026" "022100" "80" + "00" * 31 + "020105")
    assert alg.ecdsa_raw_to_der(r + s) == expected
    assert decode_dss_signature(expected) == (1 << 255, 5)


def test_ecdsa_raw_to_der_p384_round_trip() -> None:
    r, s = 0x1234 << 300, (1 << 383) + 7
    raw = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    assert decode_dss_signature(alg.ecdsa_raw_to_der(raw)) == (r, s)


@pytest.mark.parametrize("raw", [b"", b"\x01\x02\x03", bytes(64)])
def test_ecdsa_raw_to_der_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(SignerError, match="malformed ECDSA"):
        alg.ecdsa_raw_to_der(raw)
