"""A throw-away CA for running the production image: file signer, OpenSSL index, CRL.

deploy-check runs the production image with this and asks it with ``openssl ocsp``. The
image gets no PKCS#11 module, so the responder signs with a key file (``signer: {file}``);
everything else (index.txt, CRL, delegated responder certificate, read-only root, uid 10001)
is production. Usage: ``python filepki.py DIR PORT`` writes DIR/pki/* and DIR/hsmocsp.yaml
(paths as the container sees them: /etc/pki/root, /var/lib/hsmocsp).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, serial: int, *, ca: bool = False, ocsp: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if ocsp:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def main(out: Path, port: int) -> None:
    pki = out / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("deploy-check root", ca_key, None, ca_key, 1, ca=True)
    ocsp_key = ec.generate_private_key(ec.SECP256R1())
    ocsp = _cert("deploy-check OCSP", ocsp_key, ca, ca_key, 2, ocsp=True)
    _pem(pki / "ca.pem", ca)
    _pem(pki / "ocsp.pem", ocsp)
    (pki / "ocsp.key").write_bytes(
        ocsp_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    lines = []
    for serial, name in ((0x1001, "good"), (0x1002, "revoked")):
        leaf = _cert(f"deploy-check {name}", ec.generate_private_key(ec.SECP256R1()), ca,
                     ca_key, serial)
        _pem(out / f"{name}.pem", leaf)
        expiry = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        if name == "good":
            lines.append(f"V\t{expiry}\t\t{serial:X}\tunknown\t/CN=deploy-check {name}")
        else:
            revoked = NOW.strftime("%y%m%d%H%M%SZ")
            lines.append(f"R\t{expiry}\t{revoked},keyCompromise\t{serial:X}\tunknown"
                         f"\t/CN=deploy-check {name}")
    (pki / "index.txt").write_text("\n".join(lines) + "\n")
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(days=7))
        .sign(ca_key, hashes.SHA256())
    )
    (pki / "crl.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    for path in pki.iterdir():
        path.chmod(0o644)  # the container's uid 10001 reads them from a read-only mount
    config = {
        "listen": f"tcp:{port}:interface=127.0.0.1",
        "data_dir": "/var/lib/hsmocsp",
        "handles": {
            "root": {
                "path": "/ocsp",
                "issuer": "/etc/pki/root/ca.pem",
                "responder_cert": "/etc/pki/root/ocsp.pem",
                "signer": {"file": "/etc/pki/root/ocsp.key"},
                "source": {
                    "kind": "openssl",
                    "index": "/etc/pki/root/index.txt",
                    "crl": "/etc/pki/root/crl.der",
                },
                "validity": 3600,
                "max_cached": 1000,
            }
        },
    }
    (out / "hsmocsp.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
