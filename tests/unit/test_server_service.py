"""The ``role: server`` service tree, in-process on the real reactor.

The signer is a real :class:`~hsmocsp.service.service.ResponderService` (file key,
OpenSSL index) on a free loopback port; the server forwards to it over real HTTP. The
shared store is the in-memory fake of test_server_handle (Redis: the integration tests).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest_twisted
import treq.client
from cryptography.x509 import ocsp
from twisted.internet import reactor

from hsmocsp.config import load_config
from hsmocsp.service.server import ServerService
from hsmocsp.service.service import ResponderService
from tests.unit.test_responder import request_for
from tests.unit.test_server_handle import FakeStore
from tests.unit.test_service_tree import _config as signer_config

REPO = Path(__file__).resolve().parents[2]


def client() -> treq.client.HTTPClient:
    """A treq client that keeps no connection open (no idle timer left on the reactor)."""
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


def server_config(directory: Path, signer_url: str, extra: str = "") -> Path:
    directory.mkdir(exist_ok=True)
    cfg = directory / "server.yaml"
    cfg.write_text(
        f"""
role: server
listen: "tcp:0:interface=127.0.0.1"
signer_url: {signer_url}
store: {{kind: redis, address: "127.0.0.1:1"}}
hot_cache_entries: 1000
handles:
  root:
    path: /ocsp
    issuer: {directory.parent / "ca.pem"}
    responder_cert: {directory.parent / "responder_rsa.pem"}
    signer: {{file: {directory.parent / "responder_rsa.key"}}}
    source: {{kind: openssl, index: {directory.parent / "index.txt"}}}
    publish: {{ca: /ca.der}}
{extra}
"""
    )
    return cfg


def test_the_tree_is_in_start_order(tmp_path: Path) -> None:
    signer_config(tmp_path)
    svc = ServerService(
        load_config(server_config(tmp_path / "s", "http://127.0.0.1:1")), reactor,
        store=FakeStore(),  # type: ignore[arg-type]
    )  # fmt: skip
    assert [c.name for c in svc] == [
        "store", "signer link", "invalidations", "listener", "serving"
    ]  # fmt: skip


def test_a_server_imports_no_pkcs11_no_signing_tree(tmp_path: Path) -> None:
    """Building a server replica's service loads nothing of PKCS#11, the token pools,
    the signers, the sources, pre-signing or the SQLite store (a fresh interpreter, the
    module table read)."""
    signer_config(tmp_path)
    cfg = server_config(tmp_path / "s", "http://127.0.0.1:1")
    script = textwrap.dedent(f"""
        import sys
        from twisted.internet import reactor
        import hsmocsp.tap
        from hsmocsp.config import load_config
        from hsmocsp.service.server import ServerService
        class Store:  # nothing of the tests' fakes: they import a file signer
            def fetch(self, *a): ...
            def subscribe(self, *a): ...
            def health(self): ...
        ServerService(load_config(__import__("pathlib").Path({str(cfg)!r})), reactor,
                      store=Store())
        bad = sorted(m for m in sys.modules if m.startswith((
            "PyKCS11", "hsmocsp.signing.pkcs11", "hsmocsp.signing.pool",
            "hsmocsp.signing.worker", "hsmocsp.signing.filekey", "hsmocsp.sources.openssl",
            "hsmocsp.sources.index", "hsmocsp.sources.vault", "hsmocsp.sources.cfssl",
            "hsmocsp.sources.responsefile", "hsmocsp.presign", "hsmocsp.stores.sqlite",
            "hsmocsp.service.service", "hsmocsp.service.builder")))
        print(bad)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_server_forwards_to_a_real_signer_and_serves_from_its_hot_cache(
    tmp_path: Path,
) -> None:
    http = client()
    signer = ResponderService(load_config(signer_config(tmp_path)), reactor)
    signer.startService()
    server: ServerService | None = None
    try:
        await signer.whenStarted()
        signer_port = signer.listener.port.getHost().port  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{signer_port}"
        server = ServerService(
            load_config(server_config(tmp_path / "s", url)), reactor,
            store=FakeStore(),  # type: ignore[arg-type]
        )  # fmt: skip
        server.startService()
        await server.whenStarted()
        port = server.getServiceNamed("listener").port.getHost().port
        base = f"http://127.0.0.1:{port}"
        der = request_for(2)  # serial 2 is in the signer's index.txt
        answers = []
        for _ in range(3):
            response = await http.post(
                base + "/ocsp", data=der, headers={"Content-Type": ["application/ocsp-request"]}
            )
            assert response.code == 200
            assert b"max-age=" in b"".join(response.headers.getRawHeaders(b"cache-control"))
            answers.append(await response.content())
        assert answers[0] == answers[1] == answers[2]
        single = ocsp.load_der_ocsp_response(answers[0])
        assert single.certificate_status is ocsp.OCSPCertStatus.GOOD
        handle = server.handles[0]
        assert handle.stats.forwarded == 1 and handle.hot.stats.hits >= 1
        ready = await http.get(base + "/readyz")
        body = await ready.json()
        assert ready.code == 200 and body["signer"]["state"] == "ready"
        # The published CA certificate comes from the signer.
        ca = await http.get(base + "/ca.der")
        assert ca.code == 404  # the signer's config publishes none: its answer relayed
        await ca.content()
        metrics = await (await http.get(base + "/metrics")).text()
        assert 'hsmocsp_forwarded_total{handle="root"} 1.0' in metrics
        assert "hsmocsp_hotcache_hits_total" in metrics
        assert "hsmocsp_invalidations_subscribed 1.0" in metrics
    finally:
        if server is not None:
            await server.stopService()
        await signer.stopService()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_server_whose_signer_is_gone_answers_try_later_and_says_so(
    tmp_path: Path,
) -> None:
    http = client()
    signer_config(tmp_path)
    server = ServerService(
        load_config(server_config(tmp_path / "s", "http://127.0.0.1:1")), reactor,
        store=FakeStore(),  # type: ignore[arg-type]
    )  # fmt: skip
    server.startService()
    try:
        await server.whenStarted()
        port = server.getServiceNamed("listener").port.getHost().port
        base = f"http://127.0.0.1:{port}"
        response = await http.post(
            base + "/ocsp", data=request_for(2),
            headers={"Content-Type": ["application/ocsp-request"]},
        )  # fmt: skip
        body = await response.content()
        assert ocsp.load_der_ocsp_response(body).response_status is (
            ocsp.OCSPResponseStatus.TRY_LATER
        )
        ready = await http.get(base + "/readyz/root")
        state = await ready.json()
        assert ready.code == 503 and state["state"] == "degraded"
        assert "signer http://127.0.0.1:1" in state["reason"]
        ca = await http.get(base + "/ca.der")
        assert ca.code == 503
        await ca.content()
    finally:
        await server.stopService()


def test_a_server_reads_a_shared_config_whose_files_live_on_the_signer(tmp_path: Path) -> None:
    """The signer's files (module, issuer, responder certificate, index) need not exist
    on a server's box; the same file is still checked for the signer."""
    import pytest

    from hsmocsp.config import parse_config
    from hsmocsp.errors import ConfigError

    shared = {
        "signer_url": "http://127.0.0.1:8080",
        "store": {"kind": "redis", "address": "127.0.0.1:6379"},
        "tokens": {"t": {"module": "/nowhere/libsofthsm2.so", "token_label": "T",
                         "pin_file": "/nowhere/pin"}},
        "handles": {"root": {
            "path": "/ocsp", "issuer": "/nowhere/ca.pem", "responder_cert": "/nowhere/r.pem",
            "signer": {"token": "t", "key_label": "k"},
            "source": {"kind": "openssl", "index": "/nowhere/index.txt"},
        }},
    }  # fmt: skip
    cfg = parse_config(tmp_path / "c.yaml", shared, role="server")
    assert cfg.role == "server" and cfg.handles[0].path == "/ocsp"
    with pytest.raises(ConfigError, match=r"tokens.t.module: file /nowhere/libsofthsm2.so"):
        parse_config(tmp_path / "c.yaml", shared, role="signer")
