"""Make the fixed OCSP test vectors in this folder (run once; the outputs are committed).

    .venv/bin/python tests/testdata/ocsp/make_vectors.py          # keys, certs, requests
    HSMOCSP_REGEN_VECTORS=1 .venv/bin/pytest tests/unit/test_ocsp_response.py   # resp_*.der

Keys here are throw-away TEST keys, never used anywhere else. Existing files are
kept; delete one to make it again. Requests are made by ``openssl ocsp -reqout``
(the real client) and by cryptography's ``OCSPRequestBuilder``.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2099, 12, 31, tzinfo=UTC)


def _write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _load_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    serial: int,
    ca: bool,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _ensure_pki() -> None:
    if not (HERE / "ca.pem").exists():
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(HERE / "ca.key", new_key)
        ca = _cert("hsmocsp test CA", new_key, "hsmocsp test CA", new_key, 1, ca=True)
        (HERE / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca_key = _load_key(HERE / "ca.key")
    for name, make in (
        ("responder_rsa", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("responder_ec", lambda: ec.generate_private_key(ec.SECP256R1())),
    ):
        if (HERE / f"{name}.pem").exists():
            continue
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = make()
        _write_key(HERE / f"{name}.key", key)
        serial = 2 if name == "responder_rsa" else 3
        cert = _cert(f"hsmocsp test {name}", key, "hsmocsp test CA", ca_key, serial, ca=False)
        (HERE / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# name -> openssl ocsp arguments (after -issuer ca.pem)
OPENSSL_REQUESTS: dict[str, list[str]] = {
    "req_openssl_sha1_nonce.der": ["-serial", "0x1001"],
    "req_openssl_sha1.der": ["-serial", "4097", "-no_nonce"],
    "req_openssl_sha256_multi.der": [
        "-sha256", "-serial", "1", "-serial", "0x1001", "-serial", "0xdeadbeef", "-no_nonce",
    ],
    "req_openssl_sha384.der": ["-sha384", "-serial", "4097", "-no_nonce"],
    "req_openssl_sha512_nonce.der": ["-sha512", "-serial", "4097"],
    "req_openssl_mixed.der": ["-sha1", "-serial", "7", "-sha512", "-serial", "8", "-no_nonce"],
}


def _ensure_requests() -> None:
    for name, args in OPENSSL_REQUESTS.items():
        out = HERE / name
        if not out.exists():
            subprocess.run(
                ["openssl", "ocsp", "-issuer", str(HERE / "ca.pem"), *args, "-reqout", str(out)],
                check=True,
                capture_output=True,
            )
    ca = x509.load_pem_x509_certificate((HERE / "ca.pem").read_bytes())
    rsa_cert = x509.load_pem_x509_certificate((HERE / "responder_rsa.pem").read_bytes())
    for name, algorithm, nonce in (
        ("req_crypto_sha1.der", hashes.SHA1(), None),
        ("req_crypto_sha256_nonce32.der", hashes.SHA256(), bytes(range(32))),
        ("req_crypto_sha384_nonce1.der", hashes.SHA384(), b"\x2a"),
        ("req_crypto_sha256_nonce128.der", hashes.SHA256(), bytes(range(128))),  # RFC 9654 max
    ):
        out = HERE / name
        if out.exists():
            continue
        builder = ocsp.OCSPRequestBuilder().add_certificate(rsa_cert, ca, algorithm)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        out.write_bytes(builder.build().public_bytes(serialization.Encoding.DER))


if __name__ == "__main__":
    _ensure_pki()
    _ensure_requests()
