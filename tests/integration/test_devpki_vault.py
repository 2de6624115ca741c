"""Dev PKI levels 2-3 on a real OpenBao, then the real responder and ``openssl ocsp``.

Level 1 (OpenSSL root, SoftHSM token) and a dev-mode OpenBao on a free port live in one
temp directory per module; the responder serves the root handle plus the two Vault
handles exactly as ``etc/hsmocsp-dev.yaml`` does, only with temp paths and ports.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from hsmocsp.devpki import softhsm
from hsmocsp.devpki.bao import BaoServer, free_port, vault_serial
from hsmocsp.devpki.cli import main
from hsmocsp.devpki.opensslca import DevPki, build_level1
from hsmocsp.devpki.run import PersistentBao, _port_open, check_commands
from hsmocsp.devpki.tools import DevPkiError
from hsmocsp.devpki.vaultpki import MountFiles, VaultPki, build_vault_levels
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, openssl_ocsp, wait_until

CACHE_TTL = 1


@dataclass
class World:
    dev: DevPki
    bao: BaoServer
    vault: VaultPki
    work: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("devpki-vault")
    dev = build_level1(base / "devpki")
    bao = BaoServer().start(base / "bao")
    try:
        vault = build_vault_levels(dev, bao.address, bao.root_token)
        yield World(dev=dev, bao=bao, vault=vault, work=base)
    finally:
        bao.stop()


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _spki_of_cert(path: Path) -> bytes:
    return (
        _cert(path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _token_spki(dev: DevPki, label: str) -> bytes:
    der = softhsm.public_key_der(dev.softhsm_conf, dev.module, label, token_label=dev.token_label)
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the dev PKI itself ------------------------------------------------------------------


@pytest.mark.parametrize("level", ["level2", "level3"])
def test_leaves_verify_to_the_openssl_root(world: World, level: str) -> None:
    files: MountFiles = getattr(world.vault, level)
    for leaf in (files.good_pem, files.revoked_pem):
        proc = subprocess.run(
            ["openssl", "verify", "-CAfile", str(world.dev.ca_pem),
             "-untrusted", str(files.chain_pem), str(leaf)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0 and f"{leaf}: OK" in proc.stdout, proc.stdout + proc.stderr
        key = leaf.with_suffix(".key")
        assert key.stat().st_mode & 0o077 == 0
        full = x509.load_pem_x509_certificates(
            leaf.with_name(leaf.stem + "-chain.pem").read_bytes()
        )
        assert full[0] == _cert(leaf) and full[-1] == _cert(world.dev.ca_pem)


def test_level2_is_signed_by_the_hsm_root_and_level3_by_level2(world: World) -> None:
    root = _cert(world.dev.ca_pem)
    l2, l3 = _cert(world.vault.level2.ca_pem), _cert(world.vault.level3.ca_pem)
    l2.verify_directly_issued_by(root)
    l3.verify_directly_issued_by(l2)
    bc = l2.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 1
    # The root's index.txt knows level 2, so the root handle answers for it.
    assert f"\t{l2.serial_number:X}\t" in world.dev.index.read_text().upper()


@pytest.mark.parametrize("level", ["level2", "level3"])
def test_ocsp_signers_hold_the_hsm_keys(world: World, level: str) -> None:
    files: MountFiles = getattr(world.vault, level)
    cert = _cert(files.ocsp_pem)
    cert.verify_directly_issued_by(_cert(files.ca_pem))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert _spki_of_cert(files.ocsp_pem) == _token_spki(world.dev, files.signer_key_label)


def test_mount_urls_point_at_hsmocsp(world: World) -> None:
    api = world.bao.api()
    for files in world.vault.mounts:
        urls = api.call("GET", f"{files.mount}/config/urls")["data"]
        assert urls["ocsp_servers"] == [f"http://127.0.0.1:8080/{files.mount}/ocsp"]
        assert urls["issuing_certificates"] == [f"http://127.0.0.1:8080/ca/{files.mount}.der"]
        assert urls["crl_distribution_points"] == [f"http://127.0.0.1:8080/crl/{files.mount}.crl"]
        aia = _cert(files.good_pem).extensions.get_extension_for_class(
            x509.AuthorityInformationAccess
        )
        assert f"http://127.0.0.1:8080/{files.mount}/ocsp" in str(aia.value)


def test_token_file_is_private_and_read_only(world: World) -> None:
    token_file = world.vault.token_file
    assert token_file.stat().st_mode & 0o077 == 0
    api = world.bao.api(token_file.read_text().strip())
    assert api.call("GET", "pki/issuers?list=true")["data"]["keys"]
    with pytest.raises(Exception, match="403"):
        api.call("POST", "sys/mounts/evil", {"type": "pki"})


def test_second_build_changes_nothing(world: World) -> None:
    before = _files(world.vault.directory)
    index = world.dev.index.read_text()
    again = build_vault_levels(world.dev, world.bao.address, world.bao.root_token)
    assert again.rebuilt == ()
    assert _files(world.vault.directory) == before
    assert world.dev.index.read_text() == index


def test_lost_server_data_rebuilds_levels_2_and_3(tmp_path: Path) -> None:
    dev = build_level1(tmp_path / "devpki")
    with BaoServer().start(tmp_path / "bao1") as first:
        v1 = build_vault_levels(dev, first.address, first.root_token)
        old = _files(v1.directory)
    with BaoServer().start(tmp_path / "bao2") as second:  # a dev server forgets everything
        v2 = build_vault_levels(dev, second.address, second.root_token)
        assert v2.rebuilt == ("pki", "pki_int_development")
        assert old[v1.level2.ca_pem] != v2.level2.ca_pem.read_bytes()
        assert old[v1.level3.good_pem] != v2.level3.good_pem.read_bytes()
        _cert(v2.level3.good_pem).verify_directly_issued_by(_cert(v2.level3.ca_pem))
        # and the new token works against the new server
        api = second.api(v2.token_file.read_text().strip())
        assert api.call("GET", "pki_int_development/issuers?list=true")["data"]["keys"]


# --- the responder -----------------------------------------------------------------------


def vault_handle(
    files: MountFiles,
    address: str,
    token_file: Path,
    *,
    name: str | None = None,
    source: dict[str, object] | None = None,
    publish: bool = False,
) -> str:
    """One ``handles:`` entry (YAML) serving the Vault mount of ``files`` at
    ``/<name>/ocsp`` (``name``: the mount's by default); ``source``: more settings of its
    ``kind: vault`` source (cache_ttl, crl_refresh, ...)."""
    name = name or files.mount
    settings = "".join(f"      {key}: {value}\n" for key, value in (source or {}).items())
    published = (
        f"    publish: {{ca: /ca/{files.mount}.der, crl: /crl/{files.mount}.crl}}\n"
        if publish
        else ""
    )
    return f"""\
  {name}:
    path: /{name}/ocsp
    responder_cert: {files.ocsp_pem}
    signer: {{token: dev, key_label: {files.signer_key_label}}}
    source:
      kind: vault
      address: {address}
      mount: {files.mount}
      auth: {{method: token, token_file: {token_file}}}
{settings}    validity: 600
{published}"""


def _vault_handles(world: World) -> str:
    v = world.vault
    source: dict[str, object] = {"cache_ttl": CACHE_TTL, "crl_refresh": 30}
    return "".join(
        vault_handle(files, v.address, v.token_file, source=source, publish=True)
        for files in v.mounts
    )


@pytest.fixture(scope="module")
def vault_responder(world: World) -> Iterator[Responder]:
    work = world.work / "responder"
    work.mkdir()
    cfg = level1_config(world.dev, work, extra=_vault_handles(world))
    r = Responder(config=cfg, env=dev_env(world.dev), workdir=work)
    try:
        r.start()
        yield r
    finally:
        r.stop()


def _ocsp(r: Responder, files: MountFiles, *args: str) -> str:
    result = openssl_ocsp(
        "-url", r.url + files.ocsp_path, "-issuer", str(files.ca_pem), *args,
        "-VAfile", str(files.ocsp_pem), "-CAfile", str(files.chain_pem),
    )  # fmt: skip
    assert result.verified, result.output
    return result.output


@pytest.mark.parametrize("level", ["level2", "level3"])
def test_openssl_ocsp_good_revoked_unknown(
    world: World, vault_responder: Responder, level: str
) -> None:
    files: MountFiles = getattr(world.vault, level)
    out = _ocsp(vault_responder, files, "-cert", str(files.good_pem))
    assert f"{files.good_pem}: good" in out
    out = _ocsp(vault_responder, files, "-cert", str(files.revoked_pem))
    assert f"{files.revoked_pem}: revoked" in out
    out = _ocsp(vault_responder, files, "-serial", "0x7E57AB1E0DDBA11")
    assert "0x7E57AB1E0DDBA11: unknown" in out


def test_level2_leaf_issued_now_via_role(world: World, vault_responder: Responder) -> None:
    files = world.vault.level2
    data = world.bao.api().issue(files.mount, files.role, common_name="fresh.pki.hsmocsp.test")
    leaf = world.work / "fresh-l2.pem"
    leaf.write_text(data["certificate"])
    out = _ocsp(vault_responder, files, "-cert", str(leaf))
    assert f"{leaf}: good" in out


def test_root_handle_answers_for_the_vault_intermediate(
    world: World, vault_responder: Responder
) -> None:
    result = openssl_ocsp(
        "-url", vault_responder.url + "/ocsp", "-issuer", str(world.dev.ca_pem),
        "-cert", str(world.vault.level2.ca_pem),
        "-VAfile", str(world.dev.ocsp_pem), "-CAfile", str(world.dev.ca_pem),
    )  # fmt: skip
    assert result.verified, result.output
    assert f"{world.vault.level2.ca_pem}: good" in result.output


def test_revocation_in_vault_is_seen_while_running(
    world: World, vault_responder: Responder
) -> None:
    files = world.vault.level3
    api = world.bao.api()
    data = api.issue(files.mount, files.role, common_name="soon-revoked.hsmocsp.test")
    leaf = world.work / "soon-revoked.pem"
    leaf.write_text(data["certificate"])
    assert f"{leaf}: good" in _ocsp(vault_responder, files, "-cert", str(leaf))
    api.revoke(vault_serial(_cert(leaf).serial_number), files.mount)
    # cache_ttl is 1 s; the deadline only stops a broken responder from hanging the test.
    wait_until(
        lambda: f"{leaf}: revoked" in _ocsp(vault_responder, files, "-cert", str(leaf)),
        "the revocation to be answered",
        timeout=20 * CACHE_TTL + 10,
    )


# --- make run's persistent OpenBao -------------------------------------------------------


def _two_free_ports() -> int:
    """A port p with p+1 free too (raft's cluster listener); retried against races."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and not _port_open("127.0.0.1", port + 1):
            return port
    raise AssertionError("no two adjacent free ports")


def test_persistent_bao_keeps_the_hierarchy_across_restarts(tmp_path: Path) -> None:
    dev = build_level1(tmp_path / "devpki")
    bao = PersistentBao(tmp_path / "bao", port=_two_free_ports())
    try:
        bao.start()
        for secret in (bao.unseal_key_file, bao.root_token_file):
            assert secret.stat().st_mode & 0o077 == 0
        first = build_vault_levels(dev, bao.address, bao.root_token)
        assert first.rebuilt == ("pki", "pki_int_development")
        before = _files(first.directory)
        bao.stop()
        assert not bao.pid_file.exists()
        bao.start()  # sealed after the restart: unsealed with the saved key
        again = build_vault_levels(dev, bao.address, bao.root_token)
        assert again.rebuilt == ()
        assert _files(again.directory) == before
    finally:
        bao.stop()


def test_persistent_bao_refuses_a_foreign_port(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        bao = PersistentBao(tmp_path / "bao", port=squatter.getsockname()[1])
        with pytest.raises(DevPkiError, match="not the OpenBao of"):
            bao.start()
    assert not bao.pid_file.exists()


def test_check_commands_name_existing_files(world: World) -> None:
    text = check_commands(world.dev, world.vault)
    lines = [line for line in text.splitlines() if line.startswith("openssl ocsp")]
    assert len(lines) == 9
    for line in lines:
        words = line.split()
        for flag in ("-issuer", "-VAfile", "-CAfile"):
            assert Path(words[words.index(flag) + 1]).is_file(), line


def test_cli_vault_action(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "root-token"
    token_file.write_text(world.bao.root_token)
    argv = ["--dir", str(world.dev.directory), "vault", "--address", world.bao.address]
    assert main([*argv, "--token-file", str(token_file)]) == 0
    out = capsys.readouterr().out
    assert str(world.vault.level3.directory) in out and world.bao.root_token not in out
    assert main([*argv, "--token-file", str(tmp_path / "missing")]) == 1


def test_a_foreign_pki_mount_is_never_replaced(tmp_path: Path) -> None:
    """Pointed at a Vault whose ``pki`` someone else made, the builder stops, deletes nothing."""
    dev = build_level1(tmp_path / "devpki")
    with BaoServer().start(tmp_path / "bao") as other:
        api = other.api()
        api.enable_pki("pki")
        theirs = api.generate_root("pki", common_name="someone's real root")["certificate"]
        with pytest.raises(DevPkiError, match="did not make"):
            build_vault_levels(dev, other.address, other.root_token)
        assert api.call("GET", "pki/cert/ca")["data"]["certificate"].strip() == theirs.strip()
