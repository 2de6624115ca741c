"""The ``hsmocsp`` command with real processes: SoftHSM, ``openssl req``/``openssl ca``,
a real ``twistd hsmocsp`` and ``openssl ocsp``.

``hsmocsp csr`` makes a request signed inside the token; OpenSSL verifies it, the
dev CA (``openssl ca`` with its HSM key) issues a responder certificate from it,
and the responder, restarted with that certificate, answers what ``openssl
ocsp`` verifies. ``hsmocsp check`` says, one line per handle, what start-up would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmocsp.devpki.opensslca import DevPki, build_level1, sign_csr
from tests.integration.conftest import dev_env, level1_config
from tests.integration.conftest_bao import BaoPki, bao, bao_pki  # noqa: F401
from tests.integration.harness import REPO, Responder, openssl_ocsp

HSMOCSP = Path(sys.executable).with_name("hsmocsp")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """A dev PKI of our own: issuing certificates here touches no other test's index."""
    return build_level1(tmp_path_factory.mktemp("cli-devpki"))


def hsmocsp(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as ``python -m hsmocsp.cli`` (what the console script runs)."""
    return subprocess.run(
        [sys.executable, "-m", "hsmocsp.cli", *args], capture_output=True, text=True, timeout=120,
        env=dict(env, PYTHONPATH=str(REPO)), cwd=cwd,
    )  # fmt: skip


def test_the_console_script_is_installed() -> None:
    assert HSMOCSP.exists(), "pip install the package: [project.scripts] hsmocsp"
    proc = subprocess.run([str(HSMOCSP), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("hsmocsp ")


def test_csr_signed_in_the_token_is_issued_and_served(pki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(pki, tmp_path)
    proc = hsmocsp("csr", "--config", str(cfg), "--handle", "root",
                   "--subject", "/CN=Renewed OCSP signer/O=hsmocsp test",
                   env=dev_env(pki), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert pki.pin() not in proc.stdout + proc.stderr
    csr_path = tmp_path / "ocsp.csr"
    csr_path.write_text(proc.stdout)
    verify = subprocess.run(["openssl", "req", "-verify", "-noout", "-in", str(csr_path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert verify.returncode == 0 and "verify OK" in verify.stdout + verify.stderr, verify
    csr = x509.load_pem_x509_csr(proc.stdout.encode())
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Renewed OCSP signer"
    )
    # The token's key: the request's public key is the old certificate's.
    old = x509.load_pem_x509_certificate(pki.ocsp_pem.read_bytes())
    assert csr.public_key() == old.public_key()

    renewed = tmp_path / "renewed.pem"
    sign_csr(pki, csr_path, renewed)  # openssl ca, the CA key in the HSM
    cert = x509.load_pem_x509_certificate(renewed.read_bytes())
    assert cert.subject == csr.subject and cert.serial_number != old.serial_number

    cfg.write_text(cfg.read_text().replace(str(pki.ocsp_pem), str(renewed)))
    r = Responder(config=cfg, env=dev_env(pki), workdir=tmp_path).start()
    try:
        result = openssl_ocsp(
            "-url", r.url + "/ocsp", "-issuer", str(pki.ca_pem), "-cert", str(pki.good_pem),
            "-VAfile", str(renewed), "-CAfile", str(pki.ca_pem), "-no_nonce",
        )  # fmt: skip
        assert result.verified, result.output
        assert f"{pki.good_pem}: good" in result.output
    finally:
        r.stop()


def test_csr_by_token_and_key_label(pki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(pki, tmp_path)
    proc = hsmocsp("csr", "--config", str(cfg), "--token", "dev",
                   "--key-label", pki.ocsp_ec_key_label, "--subject", "/CN=EC signer",
                   env=dev_env(pki), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    csr = x509.load_pem_x509_csr(proc.stdout.encode())
    assert csr.is_signature_valid
    ec_cert = x509.load_pem_x509_certificate(pki.ocsp_ec_pem.read_bytes())
    assert csr.public_key() == ec_cert.public_key()


def test_csr_errors_are_one_line(pki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(pki, tmp_path)
    for args, message in (
        (("--handle", "nope", "--subject", "/CN=x"), "no handle 'nope'"),
        (("--handle", "root", "--subject", "CN=x"), "must start with '/'"),
        (("--token", "dev", "--key-label", "missing", "--subject", "/CN=x"), "missing"),
    ):
        proc = hsmocsp("csr", "--config", str(cfg), *args, env=dev_env(pki), cwd=tmp_path)
        assert proc.returncode == 1, proc
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_check_all_good(pki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(pki, tmp_path)
    proc = hsmocsp("check", "--config", str(cfg), env=dev_env(pki), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["handle root", "handle root-ec"]
    assert all(": ok: " in line for line in lines)
    assert "RSA-2048" in lines[0] and "EC secp256r1" in lines[1]
    assert not (tmp_path / "data").exists()  # nothing written, nothing served


def test_check_reports_each_handle_and_fails(pki: DevPki, tmp_path: Path) -> None:
    # root-ec's certificate swapped for root's: its key does not match the token key.
    cfg = level1_config(pki, tmp_path)
    text = cfg.read_text().replace(str(pki.ocsp_ec_pem), str(pki.ocsp_pem))
    cfg.write_text(text)
    proc = hsmocsp("check", "--config", str(cfg), env=dev_env(pki), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("handle root: ok: ")
    assert lines[1].startswith("handle root-ec: FAILED: ")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_check_wrong_pin_fails_every_handle_of_the_token(pki: DevPki, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("99887766\n")
    cfg = level1_config(pki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(pki.pin_file), str(pin)))
    proc = hsmocsp("check", "--config", str(cfg), env=dev_env(pki), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(": FAILED: token dev: " in line for line in lines)
    assert "99887766" not in proc.stdout + proc.stderr


def test_pkcs11_uri_signer_serves_and_openssl_verifies(pki: DevPki, tmp_path: Path) -> None:
    """RFC 7512 URI with module-path and pin-source, no tokens: section at all."""
    uri = (
        f"pkcs11:token={quote(pki.token_label)};object={quote(pki.ocsp_key_label)};type=private"
        f"?module-path={pki.module}&pin-source=file:{pki.pin_file}"
    )
    cfg = tmp_path / "hsmocsp.yaml"
    cfg.write_text(f"""
handles:
  root:
    path: /ocsp
    issuer: {pki.ca_pem}
    responder_cert: {pki.ocsp_pem}
    signer: "{uri}"
    source: {{kind: openssl, index: {pki.index}, crl: {pki.crl_der}}}
""")
    check = hsmocsp("check", "--config", str(cfg), env=dev_env(pki), cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    r = Responder(config=cfg, env=dev_env(pki), workdir=tmp_path).start()
    try:
        result = openssl_ocsp(
            "-url", r.url + "/ocsp", "-issuer", str(pki.ca_pem), "-cert", str(pki.good_pem),
            "-VAfile", str(pki.ocsp_pem), "-CAfile", str(pki.ca_pem), "-no_nonce",
        )  # fmt: skip
        assert result.verified and f"{pki.good_pem}: good" in result.output, result.output
    finally:
        r.stop()
    assert pki.pin() not in r.output()


def test_vault_sign_verbatim_and_check_against_openbao(
    pki: DevPki,
    tmp_path: Path,
    bao_pki: BaoPki,  # noqa: F811
) -> None:
    """docs/bring-your-own-ca.md's Vault route with a real OpenBao: the CSR signed by
    sign-verbatim with the OCSPSigning EKU; hsmocsp check reaches the mount with the
    token (ok) and without a valid one (FAILED: permission denied)."""
    cfg = level1_config(pki, tmp_path)
    proc = hsmocsp("csr", "--config", str(cfg), "--handle", "root", "--subject",
                   "/CN=pki OCSP responder", env=dev_env(pki), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = bao_pki.api.call(
        "POST", f"{bao_pki.mount}/sign-verbatim",
        {"csr": proc.stdout, "ttl": "24h", "ext_key_usage": ["OCSPSigning"]},
    )["data"]  # fmt: skip
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.OCSP_SIGNING in list(eku)
    assert cert.public_key() == x509.load_pem_x509_csr(proc.stdout.encode()).public_key()
    responder = tmp_path / "vault-ocsp.pem"
    responder.write_text(data["certificate"])
    cfg = tmp_path / "vault.yaml"
    cfg.write_text(f"""
tokens:
  dev:
    module: {pki.module}
    token_label: {pki.token_label}
    pin_file: {pki.pin_file}
handles:
  vault:
    path: /pki/ocsp
    responder_cert: {responder}
    signer: {{token: dev, key_label: {pki.ocsp_key_label}}}
    source:
      kind: vault
      address: {bao_pki.server.address}
      mount: {bao_pki.mount}
      auth: {{method: token, token_env: HSMOCSP_TEST_VAULT_TOKEN}}
""")
    env = dict(dev_env(pki), HSMOCSP_TEST_VAULT_TOKEN=bao_pki.server.root_token)
    ok = hsmocsp("check", "--config", str(cfg), env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("handle vault: ok: /pki/ocsp") and "vault source" in ok.stdout
    env["HSMOCSP_TEST_VAULT_TOKEN"] = "s.not-a-token"
    refused = hsmocsp("check", "--config", str(cfg), env=env, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stdout.startswith("handle vault: FAILED: ") and "permission denied" in (
        refused.stdout
    ), refused.stdout
    assert bao_pki.server.root_token not in ok.stdout + ok.stderr + refused.stdout
