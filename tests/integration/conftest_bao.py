"""Session fixtures for a real OpenBao dev server with a PKI mount (import into test modules).

Not named ``conftest.py`` (tests/integration/conftest.py belongs to the harness); test
modules do ``from tests.integration.conftest_bao import bao, bao_pki  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509

from hsmocsp.devpki.bao import BaoAPI, BaoServer, setup_dev_pki


@dataclass
class BaoPki:
    """What the ``bao_pki`` fixture set up: mount ``pki``, one root, role ``server``."""

    server: BaoServer
    api: BaoAPI
    mount: str
    role: str
    root: x509.Certificate
    good_serial: int
    revoked_serial: int

    def issue(self, cn: str = "leaf.example") -> int:
        data: dict[str, Any] = self.api.issue(self.mount, self.role, common_name=cn)
        return int(data["serial_number"].replace(":", ""), 16)


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    server = BaoServer()
    server.start(tmp_path_factory.mktemp("bao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bao_pki(bao: BaoServer) -> BaoPki:
    api = bao.api()
    root = setup_dev_pki(api, "pki", "server")
    pki = BaoPki(
        server=bao,
        api=api,
        mount="pki",
        role="server",
        root=x509.load_pem_x509_certificate(root["certificate"].encode()),
        good_serial=0,
        revoked_serial=0,
    )
    pki.good_serial = pki.issue("good.example")
    pki.revoked_serial = pki.issue("revoked.example")
    api.revoke(pki.revoked_serial, "pki")
    api.enable_approle()
    return pki
