"""VaultSource against a real OpenBao dev server (tests/integration/conftest_bao.py)."""

# ruff: noqa: F811  (the session fixtures are imported by name from conftest_bao)

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.portforward import ProxyFactory

from hsmocsp.errors import SourceError, SourceUnavailable
from hsmocsp.sources.vault import VaultSource
from hsmocsp.sources.vaultauth import AppRoleAuth, TokenAuth
from hsmocsp.status import Status
from tests.factories import vault_source
from tests.integration.conftest_bao import BaoPki, bao, bao_pki  # noqa: F401

pytestmark = pytest.mark.integration


def make_source(
    pki: BaoPki, auth: Any = None, address: str | None = None, **kw: Any
) -> VaultSource:
    source: VaultSource = vault_source(
        address or pki.server.address,
        auth=auth or TokenAuth(token=pki.server.root_token),
        **{"mount": pki.mount, **kw},
    )
    return source


async def started(src: VaultSource) -> VaultSource:
    await src.start()
    return src


@pytest_twisted.ensureDeferred
async def test_good_revoked_unknown(bao_pki: BaoPki) -> None:
    src = await started(make_source(bao_pki))
    try:
        assert src.ready()
        [issuer] = src.issuers()
        assert issuer == bao_pki.root
        good = await src.status(issuer, bao_pki.good_serial)
        assert good.status is Status.good
        revoked = await src.status(issuer, bao_pki.revoked_serial)
        assert revoked.status is Status.revoked
        assert revoked.revocation_time is not None
        assert revoked.reason is None  # OpenBao records no reason
        unknown = await src.status(issuer, 0x1234567890ABCDEF)
        assert unknown.status is Status.unknown
        # 0xca would spell /cert/ca (the CA certificate) if sent as-is.
        assert (await src.status(issuer, 0xCA)).status is Status.unknown
        crl = x509.load_der_x509_crl(src.crl_der(issuer) or b"")
        assert crl.get_revoked_certificate_by_serial_number(bao_pki.revoked_serial) is not None
        assert src.last_known(bao_pki.good_serial) is not None
    finally:
        await src.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_token_is_a_clear_startup_error(bao_pki: BaoPki) -> None:
    secret = "s.definitely-not-a-valid-token"
    src = make_source(bao_pki, auth=TokenAuth(token=secret))
    with pytest.raises(SourceError) as info:
        await src.start()
    message = str(info.value)
    assert "permission denied" in message and "'pki'" in message
    assert secret not in message
    await src.stop()


@pytest_twisted.ensureDeferred
async def test_token_from_file(bao_pki: BaoPki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(bao_pki.api.create_token(ttl="1h") + "\n")
    src = await started(make_source(bao_pki, auth=TokenAuth(file=token_file)))
    try:
        assert (await src.status(src.issuers()[0], bao_pki.good_serial)).status is Status.good
    finally:
        await src.stop()


@pytest_twisted.ensureDeferred
async def test_approle_auth(bao_pki: BaoPki, tmp_path: Path) -> None:
    role_id, secret_id = bao_pki.api.create_approle("ocsp-ok")
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)
    src = await started(make_source(bao_pki, auth=AppRoleAuth(role_id, secret_file)))
    try:
        assert (await src.status(src.issuers()[0], bao_pki.revoked_serial)).status is (
            Status.revoked
        )
    finally:
        await src.stop()


@pytest_twisted.ensureDeferred
async def test_approle_bad_secret_is_clear(bao_pki: BaoPki, tmp_path: Path) -> None:
    role_id, _ = bao_pki.api.create_approle("ocsp-bad")
    secret_file = tmp_path / "secret-id"
    secret_file.write_text("00000000-0000-0000-0000-000000000000")
    src = make_source(bao_pki, auth=AppRoleAuth(role_id, secret_file))
    with pytest.raises(SourceError) as info:
        await src.start()
    assert "approle" in str(info.value)
    assert "00000000-0000" not in str(info.value)
    await src.stop()


@pytest_twisted.ensureDeferred
async def test_revocation_while_running(bao_pki: BaoPki) -> None:
    serial = bao_pki.issue("later-revoked.example")
    src = await started(make_source(bao_pki, cache_ttl=3600))
    changes: list[frozenset[int] | None] = []
    src.on_change(changes.append)
    try:
        issuer = src.issuers()[0]
        assert (await src.status(issuer, serial)).status is Status.good
        generation = src.generation
        bao_pki.api.revoke(serial)
        # Cached as good for an hour; a CRL refresh must override the cache at once.
        await src.refresh_crl()
        assert (await src.status(issuer, serial)).status is Status.revoked
        assert src.generation > generation
        assert any(c is not None and serial in c for c in changes)
    finally:
        await src.stop()


@pytest_twisted.ensureDeferred
async def test_revocation_seen_after_cache_ttl(bao_pki: BaoPki) -> None:
    serial = bao_pki.issue("ttl-revoked.example")
    src = make_source(bao_pki, cache_ttl=0.5, crl_refresh=10_000)
    try:
        await src.start()
        issuer = src.issuers()[0]
        assert (await src.status(issuer, serial)).status is Status.good
        bao_pki.api.revoke(serial)
        assert (await src.status(issuer, serial)).status is Status.good  # still cached
        await task.deferLater(reactor, 0.6, lambda: None)  # type: ignore[arg-type]
        assert (await src.status(issuer, serial)).status is Status.revoked
    finally:
        await src.stop()


class _Switch:
    """A TCP proxy we can cut and restore: the outage test without losing bao's state.

    A dev-mode bao forgets everything on restart, so instead of killing bao the test stops
    this proxy (listening socket closed -> connection refused, live connections aborted)
    and listens again on the same port: for the source that is exactly Vault going away
    and coming back.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port: Any = None
        self.number = 0
        self.conns: list[Protocol] = []

    def factory(self) -> Factory:
        outer = self
        pf = ProxyFactory("127.0.0.1", self.target_port)
        base = pf.buildProtocol

        def build(addr: Any) -> Protocol | None:
            proto = base(addr)
            if proto is not None:
                outer.conns.append(proto)
            return proto

        pf.buildProtocol = build  # type: ignore[method-assign]
        return pf

    def up(self) -> None:
        self.port = reactor.listenTCP(self.number, self.factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.number = self.port.getHost().port

    async def down(self) -> None:
        await self.port.stopListening()
        for proto in self.conns:
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
            peer = getattr(proto, "peer", None)
            if peer is not None and peer.transport is not None:
                peer.transport.abortConnection()
        self.conns.clear()
        await task.deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]


@pytest.fixture
def switch(bao_pki: BaoPki) -> _Switch:
    return _Switch(bao_pki.server.port)


@pytest_twisted.ensureDeferred
async def test_outage_and_recovery(bao_pki: BaoPki, switch: _Switch) -> None:
    switch.up()
    address = f"http://127.0.0.1:{switch.number}"
    src = await started(make_source(bao_pki, address=address, request_timeout=3))
    try:
        issuer = src.issuers()[0]
        assert (await src.status(issuer, bao_pki.good_serial)).status is Status.good
        assert src.ready()
        await switch.down()
        new_serial = bao_pki.issue("during-outage.example")
        with pytest.raises(SourceUnavailable):
            await src.status(issuer, new_serial)
        assert not src.ready()
        # A CRL refresh during the outage fails quietly (logged, retried by the timer).
        await src.refresh_crl()
        assert not src.ready()
        # Still-fresh cached answers are served; last_known stays available.
        assert (await src.status(issuer, bao_pki.good_serial)).status is Status.good
        assert src.last_known(bao_pki.good_serial) is not None
        switch.up()
        assert (await src.status(issuer, new_serial)).status is Status.good
        assert src.ready()
    finally:
        await src.stop()
        await switch.down()


@pytest_twisted.ensureDeferred
async def test_multi_issuer_mount(bao_pki: BaoPki) -> None:
    api = bao_pki.api
    api.enable_pki("pki2")
    api.generate_root("pki2", common_name="Root A", issuer_name="a")
    api.generate_root("pki2", common_name="Root B", issuer_name="b")
    api.create_role("pki2", "server")
    a_serial = int(api.issue("pki2", issuer_ref="a")["serial_number"].replace(":", ""), 16)
    b_serial = int(api.issue("pki2", issuer_ref="b")["serial_number"].replace(":", ""), 16)
    api.revoke(b_serial, "pki2")
    src = make_source(bao_pki, mount="pki2")
    await src.start()
    try:
        by_cn: dict[str, x509.Certificate] = {c.subject.rfc4514_string(): c for c in src.issuers()}
        assert set(by_cn) == {"CN=Root A", "CN=Root B"}
        root_a, root_b = by_cn["CN=Root A"], by_cn["CN=Root B"]
        assert (await src.status(root_a, a_serial)).status is Status.good
        assert (await src.status(root_b, b_serial)).status is Status.revoked
        # Asked with the wrong CA, a serial is unknown (the CertID would not match).
        assert (await src.status(root_b, a_serial)).status is Status.unknown
        crl_b = x509.load_der_x509_crl(src.crl_der(root_b) or b"")
        assert crl_b.get_revoked_certificate_by_serial_number(b_serial) is not None
        assert src.crl_der(root_a) is not None
    finally:
        await src.stop()
