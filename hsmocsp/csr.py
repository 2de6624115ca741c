"""PKCS#10 certification requests (RFC 2986) signed by a key we cannot read.

cryptography's CSR builder wants the private key; ours stays in the HSM. So the
CertificationRequestInfo is assembled here from DER pieces (the subject and the
extensions are encoded by cryptography, the SubjectPublicKeyInfo comes from the
token), the token signs its DER through the signing pool, and the request is
SEQUENCE { info, signatureAlgorithm, BIT STRING signature }.

By default the request asks for what an OCSP responder certificate needs
(RFC 6960 4.2.2.2): extendedKeyUsage id-kp-OCSPSigning and keyUsage
digitalSignature, in a PKCS#9 extensionRequest attribute (``openssl ca`` with
``copy_extensions``, Vault ``sign-verbatim`` and cfssl read it; a CA may also
impose its own profile).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmocsp.ocsp import der

#: PKCS#9 extensionRequest (1.2.840.113549.1.9.14).
EXTENSION_REQUEST_OID = "1.2.840.113549.1.9.14"

_NAME_KEYS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
}


class SubjectError(ValueError):
    """An OpenSSL-style subject (``/CN=.../O=...``) that cannot be read."""


def parse_subject(text: str) -> x509.Name:
    """``/CN=OCSP signer/O=Example`` (OpenSSL's ``-subj`` syntax; ``\\/`` escapes a slash)."""
    if not text.startswith("/"):
        raise SubjectError(f"subject {text!r} must start with '/', e.g. '/CN=OCSP signer'")
    attributes = []
    for part in re.split(r"(?<!\\)/", text[1:]):
        if not part:
            continue
        key, sep, value = part.partition("=")
        oid = _NAME_KEYS.get(key.strip().upper())
        if not sep or oid is None:
            known = ", ".join(sorted(_NAME_KEYS))
            raise SubjectError(f"subject part {part!r}: expected KEY=value with KEY one of {known}")
        value = value.replace("\\/", "/")
        if not value:
            raise SubjectError(f"subject part {part!r} has an empty value")
        try:
            attributes.append(x509.NameAttribute(oid, value))
        except ValueError as err:
            raise SubjectError(f"subject part {part!r}: {err}") from None
    if not attributes:
        raise SubjectError("the subject is empty")
    return x509.Name(attributes)


def ocsp_signer_extensions() -> list[x509.Extension[x509.ExtensionType]]:
    """What a delegated OCSP responder certificate carries (RFC 6960 4.2.2.2)."""
    return [
        x509.Extension(
            x509.oid.ExtensionOID.EXTENDED_KEY_USAGE,
            False,
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
        ),
        x509.Extension(
            x509.oid.ExtensionOID.KEY_USAGE,
            True,
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
        ),
    ]


def _extension_der(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    parts = [der.oid(ext.oid.dotted_string)]
    if ext.critical:
        parts.append(der.tlv(der.BOOLEAN, b"\xff"))
    parts.append(der.octet_string(ext.value.public_bytes()))
    return der.sequence(*parts)


def request_info_der(
    subject: x509.Name,
    public_key: PublicKeyTypes,
    extensions: Sequence[x509.Extension[x509.ExtensionType]] = (),
) -> bytes:
    """DER of CertificationRequestInfo: version 0, subject, SPKI, attributes."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    attributes = b""
    if extensions:
        exts = der.sequence(*(_extension_der(e) for e in extensions))
        attributes = der.sequence(der.oid(EXTENSION_REQUEST_OID), der.tlv(der.SET, exts))
    return der.sequence(
        der.integer(0),
        subject.public_bytes(),
        spki,
        der.tlv(der.context(0), attributes),
    )


def request_der(info_der: bytes, algorithm_identifier_der: bytes, signature: bytes) -> bytes:
    """DER of the CertificationRequest around a signed CertificationRequestInfo."""
    return der.sequence(info_der, algorithm_identifier_der, der.bit_string(signature))


def to_pem(request: bytes) -> str:
    """PEM, checked: the request parses and its self-signature verifies."""
    csr = x509.load_der_x509_csr(request)
    if not csr.is_signature_valid:
        raise ValueError("the token's signature does not verify against the request's key")
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


__all__ = [
    "SubjectError",
    "ocsp_signer_extensions",
    "parse_subject",
    "request_der",
    "request_info_der",
    "to_pem",
]
