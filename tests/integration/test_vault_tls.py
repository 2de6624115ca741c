"""VaultSource over HTTPS to a real ``bao server -dev -dev-tls`` (hostname + CA checks)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmocsp.config import VaultTLSConfig
from hsmocsp.devpki.bao import BaoServer, setup_dev_pki
from hsmocsp.errors import SourceError, SourceUnavailable
from hsmocsp.sources.vault import VaultSource
from hsmocsp.sources.vaultauth import TokenAuth
from hsmocsp.status import Status
from tests.factories import vault_source

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    server = BaoServer()
    server.start(tmp_path_factory.mktemp("bao-tls"), tls=True)
    try:
        setup_dev_pki(server.api(), "pki", "server")
        yield server
    finally:
        server.stop()


def _source(server: BaoServer, address: str, ca: Path) -> VaultSource:
    source: VaultSource = vault_source(
        address,
        auth=TokenAuth(token=server.root_token),
        tls=VaultTLSConfig(ca_file=ca, cert_file=None, key_file=None),
        request_timeout=3,
    )
    return source


@pytest_twisted.ensureDeferred
async def test_https_with_ca_bundle(tls_bao: BaoServer) -> None:
    assert tls_bao.ca_file is not None
    src = _source(tls_bao, f"https://localhost:{tls_bao.port}", tls_bao.ca_file)
    await src.start()
    try:
        serial = int(tls_bao.api().issue()["serial_number"].replace(":", ""), 16)
        assert (await src.status(src.issuers()[0], serial)).status is Status.good
    finally:
        await src.stop()


def _other_ca(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unrelated CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest_twisted.ensureDeferred
async def test_https_untrusted_server_is_unavailable(tls_bao: BaoServer, tmp_path: Path) -> None:
    src = _source(tls_bao, f"https://127.0.0.1:{tls_bao.port}", _other_ca(tmp_path))
    with pytest.raises(SourceUnavailable):
        await src.start()
    await src.stop()


def test_unreadable_ca_bundle_is_a_config_error(tls_bao: BaoServer, tmp_path: Path) -> None:
    bad = tmp_path / "bundle.pem"
    bad.write_text("not a certificate")
    with pytest.raises(SourceError) as info:
        _source(tls_bao, f"https://127.0.0.1:{tls_bao.port}", bad)
    assert "tls" in str(info.value)
