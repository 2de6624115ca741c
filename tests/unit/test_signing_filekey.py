"""FileSigner: PEM keys signed with cryptography, verified with cryptography."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.internet.defer import Deferred

from hsmocsp.errors import SignerError
from hsmocsp.signing import algorithms as alg
from tests.factories import file_signer

DATA = b"\x30\x03\x02\x01\x00 tbsResponseData"


def result(d: Deferred[object]) -> object:
    """The value of an already-fired Deferred (FileSigner answers inline)."""
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def failure_of(d: Deferred[object]) -> BaseException:
    value = result(d)
    exc = getattr(value, "value", None)
    assert isinstance(exc, BaseException), f"expected a failure, got {value!r}"
    return exc


def write_key(path: Path, key: PrivateKeyTypes, password: bytes | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rsa_signature_verifies(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    signer = file_signer(str(write_key(tmp_path / "k.pem", rsa_key)))
    assert result(signer.start()) is None
    assert signer.signature_algorithm_der == alg.SHA256_WITH_RSA_DER
    signature = result(signer.sign(DATA))
    assert isinstance(signature, bytes)
    rsa_key.public_key().verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())
    assert signer.public_key() == rsa_key.public_key()
    assert result(signer.check()) is None
    assert result(signer.stop()) is None


@pytest.mark.parametrize(
    ("curve", "der", "digest"),
    [
        (ec.SECP256R1(), alg.ECDSA_WITH_SHA256_DER, hashes.SHA256()),
        (ec.SECP384R1(), alg.ECDSA_WITH_SHA384_DER, hashes.SHA384()),
    ],
)
def test_ec_signature_verifies(
    tmp_path: Path, curve: ec.EllipticCurve, der: bytes, digest: hashes.HashAlgorithm
) -> None:
    key = ec.generate_private_key(curve)
    signer = file_signer(str(write_key(tmp_path / "k.pem", key)))
    result(signer.start())
    assert signer.signature_algorithm_der == der
    signature = result(signer.sign(DATA))
    assert isinstance(signature, bytes)
    key.public_key().verify(signature, DATA, ec.ECDSA(digest))  # DER Ecdsa-Sig-Value


def test_password_from_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = str(write_key(tmp_path / "k.pem", rsa_key, b"s3cret-pass"))
    monkeypatch.setenv("KEYPASS", "s3cret-pass")
    assert result(file_signer(path, password_env="KEYPASS").start()) is None
    (tmp_path / "pass").write_text("s3cret-pass\n")
    assert result(file_signer(path, password_file=str(tmp_path / "pass")).start()) is None


def test_wrong_or_missing_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey
) -> None:
    path = str(write_key(tmp_path / "k.pem", rsa_key, b"s3cret-pass"))
    monkeypatch.setenv("KEYPASS", "wrong-pass")
    err = failure_of(file_signer(path, password_env="KEYPASS").start())
    assert isinstance(err, SignerError) and path in str(err)
    assert "wrong-pass" not in str(err)
    err = failure_of(file_signer(path).start())
    assert isinstance(err, SignerError) and path in str(err)
    monkeypatch.delenv("KEYPASS")
    err = failure_of(file_signer(path, password_env="KEYPASS").start())
    assert isinstance(err, SignerError) and "KEYPASS" in str(err)
    err = failure_of(file_signer(path, password_file=str(tmp_path / "nope")).start())
    assert isinstance(err, SignerError) and "nope" in str(err)


def test_bad_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    err = failure_of(file_signer(missing).start())
    assert isinstance(err, SignerError) and missing in str(err)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    err = failure_of(file_signer(str(garbage)).start())
    assert isinstance(err, SignerError) and str(garbage) in str(err)
    ed = write_key(tmp_path / "ed.pem", ed25519.Ed25519PrivateKey.generate())
    err = failure_of(file_signer(str(ed)).start())
    assert isinstance(err, SignerError) and "Ed25519" in str(err) and str(ed) in str(err)


def test_not_started(tmp_path: Path) -> None:
    signer = file_signer(str(tmp_path / "k.pem"))
    assert isinstance(failure_of(signer.sign(DATA)), SignerError)
    assert isinstance(failure_of(signer.check()), SignerError)
    with pytest.raises(SignerError, match="not started"):
        signer.public_key()
