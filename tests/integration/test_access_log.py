"""The access log of a real ``twistd hsmocsp --workers 2`` (#10): answers of the main
process and of the front, and the client address of connections the front relays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def logged(devpki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Responder]:
    work = tmp_path_factory.mktemp("access")
    extra = f"access_log: json\naccess_log_file: {work / 'access.log'}\n"
    r = Responder(config=level1_config(devpki, work, extra=extra), env=dev_env(devpki),
                  workdir=work, extra_args=("--workers", "2"))  # fmt: skip
    r.start()
    wait_until(lambda: "HTTP front 1 (pid" in r.output(), "the front to listen")
    yield r
    r.stop()




def _post(port: int, der: bytes) -> None:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/ocsp", der, {"Content-Type": "application/ocsp-request"})
        assert conn.getresponse().read()
    finally:
        conn.close()


def _issuer_hashes(ca: x509.Certificate) -> tuple[bytes, bytes]:
    from hsmocsp.ocsp.response import issuer_hashes

    return issuer_hashes(ca, "sha1")


def _records(r: Responder) -> list[dict[str, Any]]:
    path = r.workdir / "access.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_access_log_covers_main_front_and_relayed(logged: Responder, devpki: DevPki) -> None:
    leaf = x509.load_pem_x509_certificate(devpki.good_pem.read_bytes())
    ca = x509.load_pem_x509_certificate(devpki.ca_pem.read_bytes())
    der = (ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1()).build()
           .public_bytes(serialization.Encoding.DER))  # fmt: skip
    # Unknown serials: pre-signing has not made them, so each is signed for its request;
    # those the front takes are relayed to the main process (1 in 256 that none is).
    for serial in range(0x5EED1E50, 0x5EED1E58):
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            *_issuer_hashes(ca), serial, hashes.SHA1())
        _post(logged.port, builder.build().public_bytes(serialization.Encoding.DER))
    for _ in range(40):  # new connections: the kernel spreads them over both processes
        _post(logged.port, der)
    wait_until(lambda: len(_records(logged)) >= 48
               and any(r["process"] == "front 1" for r in _records(logged)),
               "40 records, some from the front")  # fmt: skip
    records = _records(logged)
    assert {r["client"] for r in records} == {"127.0.0.1"}  # relayed ones too, not the socket
    unknown = [r for r in records if r["serials"][0].startswith("5eed1e5")]
    assert len(unknown) == 8 and {r["source"] for r in unknown} == {"signed"}
    assert {r["serials"][0] for r in records} - {format(leaf.serial_number, "x")} == {
        r["serials"][0] for r in unknown}
    assert {r["process"] for r in records} == {"main", "front 1"}
    assert all(r["status"] == "successful" and r["handle"] == "root" for r in records)
    assert Path(logged.workdir / "access.log").stat().st_size > 0
