"""PKCS#10 requests assembled from DER pieces: cryptography and pyasn1 read them back,
the signature verifies, the subject syntax is OpenSSL's ``-subj``."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der import decoder
from pyasn1_modules import rfc2986

from hsmocsp.csr import (
    SubjectError,
    ocsp_signer_extensions,
    parse_subject,
    request_der,
    request_info_der,
    to_pem,
)
from hsmocsp.signing.algorithms import ECDSA_WITH_SHA256_DER, SHA256_WITH_RSA_DER

VECTORS = Path(__file__).resolve().parents[1] / "testdata" / "ocsp"


def _rsa() -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(
        (VECTORS / "responder_rsa.key").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def test_rsa_request_round_trips_and_verifies() -> None:
    key = _rsa()
    subject = parse_subject("/CN=OCSP signer/O=Example\\/Test/C=DE")
    info = request_info_der(subject, key.public_key(), ocsp_signer_extensions())
    signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    der = request_der(info, SHA256_WITH_RSA_DER, signature)
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Example/Test"
    assert csr.public_key() == key.public_key()
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.OCSP_SIGNING] and not eku.critical
    ku = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    decoded, rest = decoder.decode(der, asn1Spec=rfc2986.CertificationRequest())
    assert rest == b"" and int(decoded["certificationRequestInfo"]["version"]) == 0
    assert to_pem(der).startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_ec_request_without_extensions() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    info = request_info_der(parse_subject("/CN=x"), key.public_key())
    der = request_der(info, ECDSA_WITH_SHA256_DER, key.sign(info, ec.ECDSA(hashes.SHA256())))
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid and len(csr.extensions) == 0


def test_a_bad_signature_is_refused() -> None:
    key = _rsa()
    info = request_info_der(parse_subject("/CN=x"), key.public_key())
    signature = key.sign(info + b"x", padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(ValueError, match="does not verify"):
        to_pem(request_der(info, SHA256_WITH_RSA_DER, signature))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("CN=x", "must start with '/'"),
        ("/", "empty"),
        ("/XX=y", "KEY=value"),
        ("/CN", "KEY=value"),
        ("/CN=", "empty value"),
        ("/C=Germany", "C=Germany"),
    ],
)
def test_bad_subjects(text: str, problem: str) -> None:
    with pytest.raises(SubjectError, match=problem):
        parse_subject(text)
