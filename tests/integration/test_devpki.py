"""The level-1 dev PKI, built for real: SoftHSM token, openssl + pkcs11 engine, openssl ca."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from hsmocsp.devpki import (
    DevPki,
    DevPkiError,
    build_level1,
    issue_leaf,
    main,
    regen_crl,
    revoke,
    softhsm,
)
from hsmocsp.devpki.opensslca import TOKEN_KEYS
from hsmocsp.devpki.tools import CommandError, run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return build_level1(tmp_path_factory.mktemp("devpki") / "var" / "devpki")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _token_spki(dev: DevPki, label: str) -> bytes:
    der = softhsm.public_key_der(dev.softhsm_conf, dev.module, label)
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _files(directory: Path) -> dict[str, bytes]:
    """Every file's bytes except SoftHSM's own store (its token.object records logins)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "tokens" not in p.relative_to(directory).parts
    }


def _openssl_env(dev: DevPki) -> dict[str, str]:
    return softhsm.env_with(dev.softhsm_conf, OPENSSL_CONF=str(dev.openssl_cnf))


def test_token_has_all_keys(dev: DevPki) -> None:
    objs = softhsm.list_objects(dev.softhsm_conf, dev.module, dev.pin())
    for label, (key_id, _) in TOKEN_KEYS.items():
        kinds = sorted(o.kind for o in objs if o.label == label and o.id == key_id)
        assert kinds == ["privkey", "pubkey"], label
    assert len(objs) == 2 * len(TOKEN_KEYS)


def test_secrets_files_private(dev: DevPki) -> None:
    for path in (dev.pin_file, dev.so_pin_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_text().strip()) >= 16
    assert dev.pin() != dev.so_pin_file.read_text().strip()
    assert dev.env_file.read_text() == (
        f"SOFTHSM2_CONF={dev.softhsm_conf}\nHSMOCSP_PIN_FILE={dev.pin_file}\n"
    )
    assert dev.pin() not in dev.openssl_cnf.read_text()


def test_root_ca(dev: DevPki) -> None:
    root = _cert(dev.ca_pem)
    root.verify_directly_issued_by(root)
    assert root.subject.rfc4514_string() == "CN=hsmocsp dev OpenSSL Root CA"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aia = root.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.CA_ISSUERS, "http://127.0.0.1:8080/ca/root.der")
    ]
    cdp = root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [
        x509.UniformResourceIdentifier("http://127.0.0.1:8080/crl/root.crl")
    ]
    assert _spki(root) == _token_spki(dev, "root-ca")
    assert dev.ca_der.read_bytes() == root.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("attr", "label"), [("ocsp_pem", "root-ocsp"), ("ocsp_ec_pem", "root-ocsp-ec")]
)
def test_ocsp_signer(dev: DevPki, attr: str, label: str) -> None:
    root = _cert(dev.ca_pem)
    cert = _cert(getattr(dev, attr))
    cert.verify_directly_issued_by(root)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 360 <= days <= 370
    assert _spki(cert) == _token_spki(dev, label)


def test_leaves_and_index(dev: DevPki) -> None:
    for leaf in (dev.good_pem, dev.revoked_pem):
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", str(dev.ca_pem), str(leaf)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        aia = _cert(leaf).extensions.get_extension_for_class(x509.AuthorityInformationAccess)
        ocsp = [d.access_location.value for d in aia.value
                if d.access_method == AuthorityInformationAccessOID.OCSP]  # fmt: skip
        assert ocsp == ["http://127.0.0.1:8080/ocsp"]
    rows = {int(r.split("\t")[3], 16): r.split("\t") for r in dev.index.read_text().splitlines()}
    assert len(rows) == 4  # two OCSP signers, good, revoked
    good = rows[_cert(dev.good_pem).serial_number]
    bad = rows[_cert(dev.revoked_pem).serial_number]
    assert good[0] == "V" and good[2] == ""
    assert bad[0] == "R" and bad[2].endswith(",keyCompromise")
    assert sorted(r[0] for r in rows.values()) == ["R", "V", "V", "V"]


def test_crl(dev: DevPki) -> None:
    crl = x509.load_der_x509_crl(dev.crl_der.read_bytes())
    assert crl.public_bytes(serialization.Encoding.PEM) == dev.crl_pem.read_bytes()
    root_key = _cert(dev.ca_pem).public_key()
    assert isinstance(root_key, rsa.RSAPublicKey)
    assert crl.is_signature_valid(root_key)
    entry = crl.get_revoked_certificate_by_serial_number(_cert(dev.revoked_pem).serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(_cert(dev.good_pem).serial_number) is None


def test_openssl_ocsp_signs_with_hsm_key(dev: DevPki, tmp_path: Path) -> None:
    """`openssl ocsp` as the responder, key from the token via the engine store URI."""
    resp = tmp_path / "resp.der"
    run(
        ["openssl", "ocsp", "-index", str(dev.index), "-CA", str(dev.ca_pem),
         "-rsigner", str(dev.ocsp_ec_pem),
         "-rkey", "org.openssl.engine:pkcs11:" + dev.key_uri("root-ocsp-ec"),
         "-passin", f"file:{dev.pin_file}", "-issuer", str(dev.ca_pem),
         "-cert", str(dev.good_pem), "-cert", str(dev.revoked_pem), "-respout", str(resp)],
        env=_openssl_env(dev),
    )  # fmt: skip
    out = run(
        ["openssl", "ocsp", "-respin", str(resp), "-CAfile", str(dev.ca_pem), "-no_nonce",
         "-issuer", str(dev.ca_pem), "-cert", str(dev.good_pem), "-cert", str(dev.revoked_pem)]
    ).decode()  # fmt: skip
    assert f"{dev.good_pem}: good" in out
    assert f"{dev.revoked_pem}: revoked" in out


def test_second_run_changes_nothing(dev: DevPki) -> None:
    before = _files(dev.directory)
    keys = len(softhsm.list_objects(dev.softhsm_conf, dev.module, dev.pin()))
    proc = subprocess.run(
        [sys.executable, "-m", "hsmocsp.devpki", "--dir", str(dev.directory)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert dev.pin() not in proc.stdout + proc.stderr
    assert _files(dev.directory) == before
    assert len(softhsm.list_objects(dev.softhsm_conf, dev.module, dev.pin())) == keys


def test_revoke_and_regen_crl(tmp_path: Path) -> None:
    dev = build_level1(tmp_path / "pki")
    extra = issue_leaf(dev, "extra")
    assert issue_leaf(dev, "extra") == extra
    serial = _cert(extra).serial_number
    revoke(dev, extra, "superseded")
    revoke(dev, extra, "superseded")  # already revoked: no-op, no error
    row = [r for r in dev.index.read_text().splitlines() if int(r.split("\t")[3], 16) == serial]
    assert (
        len(row) == 1 and row[0].startswith("R\t") and row[0].endswith("\t/CN=extra.hsmocsp.test")
    )
    old_crl = x509.load_der_x509_crl(dev.crl_der.read_bytes())
    assert old_crl.get_revoked_certificate_by_serial_number(serial) is None
    regen_crl(dev)
    crl = x509.load_der_x509_crl(dev.crl_der.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    with pytest.raises(DevPkiError, match="bad revocation reason"):
        revoke(dev, dev.good_pem, "because")
    with pytest.raises(DevPkiError, match="root CA certificate itself"):
        revoke(dev, dev.ca_pem, "superseded")
    foreign = tmp_path / "foreign.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=foreign", "-keyout", str(tmp_path / "foreign.key"),
         "-out", str(foreign)])  # fmt: skip
    index_before = dev.index.read_bytes()
    with pytest.raises(DevPkiError, match="not issued by"):
        revoke(dev, foreign, "superseded")
    assert dev.index.read_bytes() == index_before


def test_missing_tool_exits_2_without_traceback(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    openssl = shutil.which("openssl")
    assert openssl is not None
    (bin_dir / "openssl").symlink_to(openssl)
    env = dict(os.environ, PATH=str(bin_dir))
    proc = subprocess.run(
        [sys.executable, "-m", "hsmocsp.devpki", "--dir", str(tmp_path / "pki")],
        capture_output=True, text=True, check=False, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hsmocsp-devpki: pkcs11-tool not found: install the Debian package 'opensc'"
    ]


def test_command_error_masks_pin(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as info:
        run(["openssl", "pkey", "-in", str(tmp_path / "s3cretPIN-missing")],
            secrets=("s3cretPIN",))  # fmt: skip
    assert "s3cretPIN" not in str(info.value)
    assert "openssl pkey -in" in str(info.value)


def test_cli_actions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    assert main(["--dir", str(directory), "leaf", "cli"]) == 0
    leaf = directory / "root" / "leaves" / "cli.pem"
    assert capsys.readouterr().out.strip() == str(leaf.resolve())
    assert (
        main(["--dir", str(directory), "revoke", str(leaf), "--reason", "cessationOfOperation"])
        == 0
    )
    assert main(["--dir", str(directory), "crl"]) == 0
    crl = x509.load_der_x509_crl((directory / "root" / "crl.der").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(_cert(leaf).serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.cessation_of_operation
    assert main(["--dir", str(directory), "leaf", "No/Good"]) == 1
    out = capsys.readouterr()
    assert "bad leaf name" in out.err
    pin = (directory / "pin").read_text().strip()
    assert pin not in out.out + out.err
