"""VaultSource and the Vault auth methods against a small Klein fake of Vault (StubTreq).

The fake serves the few endpoints the source uses; a ``task.Clock`` drives timeouts,
cache ages and lease renewal, so nothing here sleeps or touches the network.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import TimeoutMixin, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Site

from hsmocsp.config import load_config
from hsmocsp.errors import ConfigError, SourceError, SourceUnavailable, UnknownIssuer
from hsmocsp.health import Health, State
from hsmocsp.sources.vault import VaultSource, vault_serial
from hsmocsp.sources.vaultauth import AppRoleAuth, KubernetesAuth, TokenAuth, VaultTransport
from hsmocsp.status import CRLReason, Status
from tests.factories import vault_source
from tests.waiting import wait_for

T = TypeVar("T")
NOW = datetime(2030, 1, 1, tzinfo=UTC)
GOOD, REVOKED, REVOKED_LATER = 0x1001, 0x1002, 0x1003
TOKEN = "s.valid-secret-token"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class FakeCA:
    def __init__(self, cn: str = "Fake Root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def leaf(self, serial: int) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"leaf {serial}"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def crl(self, revoked: dict[int, x509.ReasonFlags | None], key: Any = None) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(NOW)
            .next_update(NOW + timedelta(days=3))
        )
        for serial, reason in revoked.items():
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW)
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(key or self.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER
        )


class FakeVault:
    """Just enough of Vault's API; ``mode`` switches the cert endpoint's behaviour."""

    app = Klein()

    def __init__(self) -> None:
        self.ca = FakeCA()
        self.tokens = {TOKEN}
        self.revoked: dict[int, int] = {REVOKED: int(NOW.timestamp())}
        self.crl_entries: dict[int, x509.ReasonFlags | None] = {
            REVOKED: x509.ReasonFlags.key_compromise
        }
        self.crl_key: Any = None
        self.crl_der: bytes | None = None  # served as is when set
        self.issued = {GOOD, REVOKED, REVOKED_LATER}
        self.mode = "ok"
        self.pending: list[Deferred[bytes]] = []
        self.logins: list[dict[str, Any]] = []
        self.lease = 300
        self.renewals = 0
        self.seen_tokens: list[str | None] = []
        self.lookup_self: dict[str, Any] = {"ttl": 0, "renewable": False}
        self.cert_calls = 0
        self.health_calls = 0

    def _token_ok(self, request: Any) -> bool:
        token = request.getHeader("X-Vault-Token")
        self.seen_tokens.append(token)
        return token in self.tokens

    @staticmethod
    def _json(request: Any, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(body).encode()

    @app.route("/v1/auth/token/lookup-self", methods=["GET"])
    def lookup(self, request: Any) -> bytes:
        if not self._token_ok(request):
            return self._json(request, 403, {"errors": ["permission denied"]})
        return self._json(request, 200, {"data": self.lookup_self})

    @app.route("/v1/auth/token/renew-self", methods=["POST"])
    def renew(self, request: Any) -> bytes | Deferred[bytes]:
        self.renewals += 1
        body = self._json(request, 200, {"auth": {"lease_duration": 90, "renewable": True}})
        if self.mode == "hang-renew":  # answered when the test fires self.pending
            d: Deferred[bytes] = Deferred()
            d.addCallback(lambda _: body)
            self.pending.append(d)
            return d
        return body

    @app.route("/v1/auth/<mount>/login", methods=["POST"])
    def login(self, request: Any, mount: str) -> bytes:
        body = json.loads(request.content.read())
        self.logins.append({"mount": mount, **body})
        if body.get("secret_id") == "wrong" or body.get("jwt") == "wrong":
            return self._json(request, 400, {"errors": ["invalid role or secret ID"]})
        token = f"s.login-{len(self.logins)}"
        self.tokens = {token}
        return self._json(
            request,
            200,
            {"auth": {"client_token": token, "lease_duration": self.lease, "renewable": True}},
        )

    @app.route("/v1/sys/health", methods=["GET"])
    def sys_health(self, request: Any) -> bytes:
        self.health_calls += 1
        if self.mode in ("down", "sealed"):
            return self._json(request, 503, {"sealed": True})
        return self._json(request, 200, {"sealed": False})

    @app.route("/v1/pki/issuers", methods=["GET"])
    def issuers(self, request: Any) -> bytes:
        if self.mode == "down":
            return self._json(request, 503, {"errors": ["Vault is sealed"]})
        return self._json(request, 200, {"data": {"keys": ["id-1"]}})

    @app.route("/v1/pki/issuer/id-1/der", methods=["GET"])
    def issuer_der(self, request: Any) -> bytes:
        return self.ca.cert.public_bytes(serialization.Encoding.DER)

    @app.route("/v1/pki/issuer/id-1/crl/der", methods=["GET"])
    def crl(self, request: Any) -> bytes:
        if self.mode == "down":
            request.setResponseCode(503)
            return b""
        if self.crl_der is not None:
            return self.crl_der
        return self.ca.crl(self.crl_entries, self.crl_key)

    @app.route("/v1/pki/cert/<serial>", methods=["GET"])
    def cert(self, request: Any, serial: str) -> bytes | Deferred[bytes]:
        self.cert_calls += 1
        if self.mode == "forbid" or not self._token_ok(request):
            return self._json(request, 403, {"errors": ["permission denied"]})
        if self.mode == "500":
            return self._json(request, 500, {"errors": ["internal error"]})
        if self.mode == "down":
            return self._json(request, 503, {"errors": ["Vault is sealed"]})
        if self.mode == "garbage":
            request.setResponseCode(200)
            return b"<html>not json"
        if self.mode == "hang":
            d: Deferred[bytes] = Deferred()
            self.pending.append(d)
            return d
        number = int(serial.replace(":", ""), 16)
        if number not in self.issued:
            return self._json(request, 404, {"errors": []})
        data = {"certificate": self.ca.leaf(number), "revocation_time": self.revoked.get(number, 0)}
        return self._json(request, 200, {"data": data})


class Env:
    def __init__(self, auth: Any = None, **kw: Any) -> None:
        self.fake = FakeVault()
        self.clock = task.Clock()
        self.clock.advance(NOW.timestamp())
        self.stub = StubTreq(self.fake.app.resource())
        self.source: VaultSource = vault_source(
            auth=auth or TokenAuth(token=TOKEN), reactor=self.clock, http_client=self.stub, **kw
        )
        self.transport = VaultTransport(
            address="http://vault.test:8200", http_client=self.stub, clock=self.clock
        )

    def run(self, d: Deferred[T]) -> T:
        """Drive the stub until ``d`` fires; return its result or raise its error."""
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(50):
            if results:
                break
            self.stub.flush()
            self.clock.advance(0)
        assert results, "deferred never fired"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        value: T = results[0]
        return value

    def start(self) -> VaultSource:
        self.run(self.source.start())
        return self.source

    def issuer(self) -> x509.Certificate:
        return self.source.issuers()[0]

    def status(self, serial: int) -> Any:
        return self.run(self.source.status(self.issuer(), serial))


def test_vault_serial_spelling() -> None:
    assert vault_serial(0x01F2) == "01:f2"
    assert vault_serial(0xCA) == "CA"  # never the /cert/ca route
    assert vault_serial(0x80_00) == "80:00"


def test_good_revoked_unknown_and_reason_from_crl() -> None:
    env = Env()
    env.start()
    assert env.source.ready()
    assert env.status(GOOD).status is Status.good
    revoked = env.status(REVOKED)
    assert revoked.status is Status.revoked
    assert revoked.reason is CRLReason.keyCompromise
    assert revoked.revocation_time == NOW
    assert env.status(0x9999).status is Status.unknown
    assert env.status(0).status is Status.unknown
    assert env.source.crl_der(env.issuer()) is not None


def test_cache_serves_within_ttl_then_refetches() -> None:
    env = Env(cache_ttl=10)
    env.start()
    env.status(GOOD)
    calls = env.fake.cert_calls
    env.status(GOOD)
    assert env.fake.cert_calls == calls
    env.clock.advance(11)
    env.status(GOOD)
    assert env.fake.cert_calls == calls + 1


def test_unknown_issuer_is_refused() -> None:
    env = Env()
    env.start()
    with pytest.raises(UnknownIssuer):
        env.run(env.source.status(FakeCA("Other").cert, GOOD))


def test_403_relogs_in_once_and_retries() -> None:
    env = Env(auth=AppRoleAuth("role-1", _secret_file("sid")))
    env.start()
    assert len(env.fake.logins) == 1
    env.fake.tokens = {"s.rotated-elsewhere"}  # our token was revoked behind our back
    assert env.status(GOOD).status is Status.good  # 403 -> re-login -> retry
    assert len(env.fake.logins) == 2


def test_persistent_403_is_unavailable_and_unready() -> None:
    env = Env()
    env.start()
    env.fake.mode = "forbid"
    with pytest.raises(SourceUnavailable) as info:
        env.status(GOOD)
    assert "permission denied" in str(info.value)
    assert TOKEN not in str(info.value)
    assert not env.source.ready()


def test_wrong_token_at_start_names_mount_not_token() -> None:
    env = Env(auth=TokenAuth(token="s.wrong-token-value"))
    with pytest.raises(SourceError) as info:
        env.start()
    assert "'pki'" in str(info.value) and "permission denied" in str(info.value)
    assert "wrong-token-value" not in str(info.value)


def test_500_is_unavailable_then_recovers() -> None:
    env = Env()
    env.start()
    env.fake.mode = "500"
    with pytest.raises(SourceUnavailable):
        env.status(GOOD)
    assert not env.source.ready()
    env.fake.mode = "ok"
    assert env.status(GOOD).status is Status.good
    assert env.source.ready()


def test_malformed_json_is_a_clear_error() -> None:
    env = Env()
    env.start()
    env.fake.mode = "garbage"
    with pytest.raises(SourceError) as info:
        env.status(GOOD)
    assert "non-JSON" in str(info.value)


def test_timeout_uses_the_clock() -> None:
    env = Env(request_timeout=5)
    env.start()
    env.fake.mode = "hang"
    d = env.source.status(env.issuer(), GOOD)
    env.stub.flush()
    assert not d.called
    env.clock.advance(5.1)
    with pytest.raises(SourceUnavailable) as info:
        env.run(d)
    assert "no answer within 5s" in str(info.value)
    assert not env.source.ready()


def test_fresh_cache_survives_outage_and_last_known_is_kept() -> None:
    env = Env(cache_ttl=60)
    env.start()
    env.status(GOOD)
    env.fake.mode = "500"
    assert env.status(GOOD).status is Status.good  # fresh entry: no request
    env.clock.advance(61)
    with pytest.raises(SourceUnavailable):
        env.status(GOOD)
    last = env.source.last_known(GOOD)
    assert last is not None and last.status is Status.good


def test_crl_refresh_reports_new_revocations() -> None:
    env = Env(cache_ttl=3600, crl_refresh=30)
    env.start()
    changes: list[frozenset[int] | None] = []
    env.source.on_change(changes.append)
    assert env.status(REVOKED_LATER).status is Status.good
    generation = env.source.generation
    env.fake.revoked[REVOKED_LATER] = int(NOW.timestamp())
    env.fake.crl_entries[REVOKED_LATER] = None
    env.clock.advance(30)  # the background refresh fires
    env.stub.flush()
    assert changes == [frozenset({REVOKED_LATER})]
    assert env.source.generation > generation
    status = env.status(REVOKED_LATER)  # still within cache_ttl, updated from the CRL
    assert status.status is Status.revoked and status.reason is None


def test_crl_refresh_failure_marks_unready_and_retries() -> None:
    env = Env(crl_refresh=300)
    env.start()
    started = env.source.checked_at
    assert started == env.clock.seconds()
    env.fake.mode = "down"
    env.clock.advance(5)
    env.run(env.source.refresh_crl())
    assert not env.source.ready()
    assert env.source.checked_at == started  # the data is getting older
    env.fake.mode = "ok"
    env.clock.advance(15)  # CRL_RETRY
    env.stub.flush()
    assert env.source.ready()
    assert env.source.checked_at == env.clock.seconds()
    env.run(env.source.stop())
    assert env.clock.getDelayedCalls() == []


def test_bad_crl_signature_fails_start() -> None:
    env = Env()
    env.fake.crl_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SourceError) as info:
        env.start()
    assert "bad signature" in str(info.value)


def test_missing_mount_is_a_clear_start_error() -> None:
    env = Env()
    env.source = vault_source(
        mount="nope", auth=TokenAuth(token=TOKEN), reactor=env.clock, http_client=env.stub
    )
    with pytest.raises(SourceError) as info:
        env.start()
    assert "'nope'" in str(info.value) and "no CA certificate" in str(info.value)


def test_bad_config_values(tmp_path: Path) -> None:
    """Checked once, where the configuration is read (the source trusts its config)."""
    for source, key in (
        ("{kind: vault, address: 'vault:8200', mount: pki}", "address"),
        ("{kind: vault, address: 'http://v', mount: /}", "mount"),
    ):
        cfg = tmp_path / "hsmocsp.yaml"
        cfg.write_text(
            "handles:\n  v:\n    path: /v\n    signer: {key: k.pem}\n"
            f"    responder_cert: r.pem\n    source: {source}\n"
        )
        (tmp_path / "k.pem").write_text("x")
        (tmp_path / "r.pem").write_text("x")
        with pytest.raises(ConfigError) as info:
            load_config(cfg)
        assert f"handles.v.source.{key}" in str(info.value)


# --- auth methods ---------------------------------------------------------------------


def _secret_file(value: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "secret"
    path.write_text(value + "\n")
    return path


def test_approle_relogin_at_two_thirds_of_ttl() -> None:
    env = Env()
    auth = AppRoleAuth("role-1", _secret_file("sid-1"))
    auth.bind(env.transport)
    env.fake.lease = 300
    assert env.run(auth.token()) == "s.login-1"
    assert env.fake.logins[0] == {"mount": "approle", "role_id": "role-1", "secret_id": "sid-1"}
    env.clock.advance(199)
    env.stub.flush()
    assert len(env.fake.logins) == 1
    env.clock.advance(2)
    env.stub.flush()
    assert len(env.fake.logins) == 2
    assert env.run(auth.token()) == "s.login-2"
    auth.stop()
    assert env.clock.getDelayedCalls() == []


def test_concurrent_token_calls_share_one_login() -> None:
    env = Env()
    auth = AppRoleAuth("role-1", _secret_file("sid-1"))
    auth.bind(env.transport)
    d1, d2 = auth.token(), auth.token()
    assert env.run(d1) == env.run(d2)
    assert len(env.fake.logins) == 1
    auth.stop()


def test_approle_refused_is_clear_and_secret_free() -> None:
    env = Env()
    auth = AppRoleAuth("role-1", _secret_file("wrong"))
    auth.bind(env.transport)
    with pytest.raises(SourceError) as info:
        env.run(auth.token())
    assert "invalid role or secret ID" in str(info.value)
    assert "wrong" not in str(info.value).replace("invalid role", "")


def test_approle_missing_secret_file() -> None:
    env = Env()
    auth = AppRoleAuth("role-1", Path("/nonexistent/secret-id"))
    auth.bind(env.transport)
    with pytest.raises(SourceError) as info:
        env.run(auth.token())
    assert "/nonexistent/secret-id" in str(info.value)


def test_kubernetes_login_with_fake() -> None:
    env = Env()
    auth = KubernetesAuth(_secret_file("eyJhbGciOi.fake.jwt"), role="ocsp", mount="k8s")
    auth.bind(env.transport)
    assert env.run(auth.token()).startswith("s.login-")
    assert env.fake.logins == [{"mount": "k8s", "role": "ocsp", "jwt": "eyJhbGciOi.fake.jwt"}]
    auth.invalidate()
    env.run(auth.token())
    assert len(env.fake.logins) == 2
    auth.stop()


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s.first\n")
    auth = TokenAuth(file=path)
    env = Env()
    auth.bind(env.transport)
    assert env.run(auth.token()) == "s.first"
    path.write_text("s.second-longer\n")
    assert env.run(auth.token()) == "s.second-longer"
    path.unlink()  # Vault Agent rewriting it: keep the last one
    assert env.run(auth.token()) == "s.second-longer"
    assert "s.second" not in repr(auth)


def test_token_file_missing_at_start(tmp_path: Path) -> None:
    auth = TokenAuth(file=tmp_path / "absent")
    env = Env()
    auth.bind(env.transport)
    with pytest.raises(SourceError):
        env.run(auth.token())


def test_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TokenAuth(env="X_TOKEN", environ={"X_TOKEN": "s.abc"}) is not None
    with pytest.raises(SourceError) as info:
        TokenAuth(env="X_TOKEN", environ={})
    assert "X_TOKEN" in str(info.value)
    with pytest.raises(ValueError):
        TokenAuth()


def test_renewable_token_is_renewed_at_two_thirds() -> None:
    env = Env()
    env.fake.lookup_self = {"ttl": 90, "renewable": True}
    env.start()  # lookup-self on first token() schedules the renewal
    env.clock.advance(0)
    env.stub.flush()
    assert env.fake.renewals == 0
    env.clock.advance(61)
    env.stub.flush()
    assert env.fake.renewals == 1
    env.run(env.source.stop())
    assert env.clock.getDelayedCalls() == []


def test_a_renewal_in_flight_at_stop_schedules_nothing() -> None:
    """Seen as a leftover timer on the real reactor (tests/conftest.py): a renewal whose
    answer came after stop() scheduled the next one, so a stopped source kept renewing."""
    env = Env()
    env.fake.lookup_self = {"ttl": 90, "renewable": True}
    env.start()
    env.clock.advance(0)
    env.stub.flush()
    env.fake.mode = "hang-renew"
    env.clock.advance(61)  # the renewal is sent; Vault has not answered yet
    env.stub.flush()
    env.run(env.source.stop())
    env.fake.pending.pop().callback(b"")  # the answer arrives after stop()
    env.stub.flush()
    assert env.fake.renewals == 1
    assert env.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_stop_ends_a_request_in_flight_and_closes_its_connection() -> None:
    """Seen as leftover timers on the real reactor (tests/conftest.py) after the Vault
    integration tests: stop() emptied the HTTP pool, but a request still waiting for
    Vault went on (its timeout timer running) and its connection, once answered, went
    back into the emptied pool (240 s expiry timer). Real pool, FakeVault on loopback."""
    from twisted.internet import reactor

    fake = FakeVault()
    server = WrappingFactory(Site(fake.app.resource()))
    port = reactor.listenTCP(0, server, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        address = f"http://127.0.0.1:{port.getHost().port}"
        source = vault_source(address, auth=TokenAuth(token=TOKEN), request_timeout=30.0)
        await source.start()
        before = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
        fake.mode = "hang"
        lookup = source.status(source.issuers()[0], GOOD)
        await wait_for(lambda: fake.pending, "the lookup to reach FakeVault")
        await source.stop()
        outcome: list[Failure] = []
        lookup.addErrback(outcome.append)
        assert outcome and outcome[0].check(SourceUnavailable), "the lookup outlived stop()"
        left = [
            c
            for c in reactor.getDelayedCalls()  # type: ignore[attr-defined]
            if c not in before
            and c.active()
            and not isinstance(getattr(c.func, "__self__", None), TimeoutMixin)  # the server's
        ]
        assert left == []
        await wait_for(lambda: not server.protocols, "FakeVault to see the connection closed")
    finally:
        await port.stopListening()


def test_concurrent_lookups_share_one_request_and_survive_a_cancelled_waiter() -> None:
    env = Env(cache_ttl=0)
    env.start()
    env.fake.mode = "hang"
    calls = env.fake.cert_calls
    first = env.source.status(env.issuer(), GOOD)
    second = env.source.status(env.issuer(), GOOD)
    env.stub.flush()
    assert env.fake.cert_calls == calls + 1
    gone: list[Any] = []
    first.addErrback(gone.append)
    first.cancel()  # a client went away: the shared lookup goes on for the other
    assert gone[0].check(CancelledError)
    env.fake.mode = "ok"
    pending = env.fake.pending.pop()
    body = {"data": {"certificate": env.fake.ca.leaf(GOOD), "revocation_time": 0}}
    pending.callback(json.dumps(body).encode())
    assert env.run(second).status is Status.good
    assert env.fake.cert_calls == calls + 1


def _crl_with_unreadable_entry(ca: FakeCA, serial: int) -> bytes:
    """A CRL whose entry for ``serial`` has an invalidity date with fractional seconds
    (RFC 5280 forbids them; OpenSSL writes them if told to; cryptography refuses them)."""
    bad_date = x509.UnrecognizedExtension(
        x509.oid.CRLEntryExtensionOID.INVALIDITY_DATE, b"\x18\x11" + b"20240102030405.5Z"
    )
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(NOW)
        .add_extension(bad_date, critical=False)
        .build()
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=3))
        .add_revoked_certificate(entry)
    )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_remove_from_crl_entry_is_not_a_revocation() -> None:
    """Like the OpenSSL source (one CRL reader): a removeFromCRL entry lifts a hold."""
    env = Env(cache_ttl=3600, crl_refresh=30)
    env.fake.crl_entries[GOOD] = x509.ReasonFlags.remove_from_crl
    env.start()
    assert env.source.last_known(GOOD) is None  # not "revoked (removeFromCRL)"
    env.fake.crl_entries.pop(GOOD)
    env.clock.advance(30)
    env.stub.flush()
    assert env.status(REVOKED_LATER).status is Status.good  # cached for an hour
    env.fake.crl_entries[REVOKED_LATER] = x509.ReasonFlags.remove_from_crl
    env.clock.advance(30)  # the refresh sees the entry: still good, not revoked
    env.stub.flush()
    assert env.status(REVOKED_LATER).status is Status.good


def test_unreadable_crl_entry_revokes_and_the_background_refresh_goes_on() -> None:
    env = Env(cache_ttl=3600, crl_refresh=30)
    env.start()
    assert env.status(REVOKED_LATER).status is Status.good
    env.fake.revoked[REVOKED_LATER] = int(NOW.timestamp())
    env.fake.crl_der = _crl_with_unreadable_entry(env.fake.ca, REVOKED_LATER)
    env.clock.advance(30)
    env.stub.flush()
    # The signed CRL says revoked: believed, without the reason it cannot read.
    status = env.status(REVOKED_LATER)
    assert status.status is Status.revoked and status.reason is None
    # And the timer still runs: a later CRL is picked up.
    env.fake.crl_der = None
    env.fake.crl_entries[GOOD] = x509.ReasonFlags.superseded
    env.fake.revoked[GOOD] = int(NOW.timestamp())
    env.clock.advance(30)
    env.stub.flush()
    good_now = env.status(GOOD)
    assert good_now.status is Status.revoked and good_now.reason is CRLReason.superseded


class LogLines:
    """Collects the source's log lines (text) while a test runs."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("hsmocsp.sources"):
            self.lines.append(formatEvent(event))

    def __enter__(self) -> LogLines:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def test_idle_source_sees_vault_go_and_come_back_logged_once_each() -> None:
    env = Env(cache_ttl=3600, crl_refresh=300, probe_interval=10)
    env.start()
    env.status(GOOD)
    assert env.source.health() == Health(State.READY)
    with LogLines() as logged:
        env.fake.mode = "down"
        env.clock.advance(10)  # nobody asks anything: the probe notices
        env.stub.flush()
        health = env.source.health()
        assert health.state is State.DEGRADED and "sys/health: HTTP 503" in health.reason
        assert not env.source.ready()
        # Cached statuses are still answered; new serials are tryLater.
        assert env.status(GOOD).status is Status.good
        for _ in range(5):
            with pytest.raises(SourceUnavailable):
                env.status(0x4242)
        for _ in range(6):  # a minute of probes and CRL retries while down
            env.clock.advance(10)
            env.stub.flush()
        assert env.source.state.errors >= 10
        env.fake.mode = "ok"
        env.clock.advance(10)  # the probe sees it back and refreshes the CRLs at once
        env.stub.flush()
        assert env.source.health() == Health(State.READY)
        assert env.source.ready()
    down = [line for line in logged.lines if "degraded" in line]
    back = [line for line in logged.lines if "ready again" in line]
    assert len(down) == 1 and "mount 'pki'" in down[0], logged.lines
    assert len(back) == 1, logged.lines
    assert TOKEN not in "\n".join(logged.lines)
    env.run(env.source.stop())
    assert env.clock.getDelayedCalls() == []


def test_bad_crl_degrades_but_keeps_serving_the_last_good_one() -> None:
    env = Env(crl_refresh=30)
    env.start()
    good_crl = env.source.crl_der(env.issuer())
    env.fake.crl_key = ec.generate_private_key(ec.SECP256R1())
    env.clock.advance(30)
    env.stub.flush()
    health = env.source.health()
    assert health.state is State.DEGRADED and "bad signature" in health.reason
    assert env.source.ready()  # Vault itself answers
    assert env.source.crl_der(env.issuer()) == good_crl
    assert env.status(REVOKED).status is Status.revoked
    env.fake.crl_key = None
    env.clock.advance(15)  # CRL_RETRY
    env.stub.flush()
    assert env.source.health() == Health(State.READY)


def test_health_before_start_is_failed() -> None:
    env = Env()
    assert env.source.health().state is State.FAILED


def test_sighup_reloads_the_mounts_issuer_certificates() -> None:
    """A renewed issuer certificate in the mount (same key) is served after refresh()
    (SIGHUP), with its CRL; Vault down then keeps the issuers in use."""
    env = Env(cache_ttl=1, crl_refresh=3600)
    env.start()
    old = env.issuer()
    renewed = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.subject)
        .public_key(env.fake.ca.key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(env.fake.ca.key, hashes.SHA256())
    )
    env.fake.ca.cert = renewed
    env.run(env.source.refresh())
    assert env.issuer() == renewed
    assert env.source.crl_der(renewed) is not None
    assert env.status(REVOKED).status is Status.revoked
    env.fake.mode = "down"
    env.fake.ca.cert = old
    lines: list[str] = []
    globalLogPublisher.addObserver(lines.append)  # type: ignore[arg-type]
    try:
        env.run(env.source.refresh())
    finally:
        globalLogPublisher.removeObserver(lines.append)  # type: ignore[arg-type]
    assert env.issuer() == renewed
    assert any("issuer certificates not reloaded" in formatEvent(e) for e in lines)  # type: ignore[arg-type]


def test_a_stale_failure_does_not_undo_a_later_success() -> None:
    """A request that started before Vault came back and fails after a newer one
    succeeded (a CRL refresh waiting for its timeout) must not flap health."""
    env = Env()
    env.start()
    state = env.source.state
    with LogLines() as logged:
        old = state.attempt()
        state.problem("vault", "connection refused", ticket=state.attempt())
        newer = state.attempt()
        state.solved("vault", ticket=newer)
        state.problem("vault", "connection refused (late)", ticket=old)
        assert env.source.health() == Health(State.READY)
    assert sum("degraded" in line for line in logged.lines) == 1
    assert sum("ready again" in line for line in logged.lines) == 1
