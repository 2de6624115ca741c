"""Server replicas (``role: server``) against a real signer, a real redis-server and
``openssl ocsp`` (issue #11).

One world per module: the level-1 dev PKI on SoftHSM, a ``redis-server`` on a free
loopback port, a signer (``twistd hsmocsp --role signer``) and a server replica
(``--role server``), all reading the SAME configuration file. Tests that stop a part
start it again before they end.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hsmocsp.devpki.opensslca import DevPki, issue_leaf, regen_crl, revoke
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, http, openssl_ocsp, wait_until
from tests.redisfixtures import RedisServer


@dataclass
class World:
    dev: DevPki
    redis: RedisServer
    signer: Responder
    server: Responder
    config: Path

    def ocsp(self, *args: str, url: str | None = None, path: str = "/ocsp") -> str:
        """``openssl ocsp`` against the server, verified with the CA file."""
        result = openssl_ocsp(
            "-url", (url or self.server.url) + path, "-issuer", str(self.dev.ca_pem),
            "-CAfile", str(self.dev.ca_pem), "-no_nonce", *args,
        )  # fmt: skip
        return result.output

    def metric(self, responder: Responder, name: str) -> float:
        _, _, body = http(responder.url + "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def replica_config(dev: DevPki, directory: Path, redis: RedisServer, signer_port: int) -> Path:
    """The dev PKI's two handles, a Redis store and the signer's URL: one file, every role."""
    return level1_config(dev, directory, extra=f"""
store: {{kind: redis, address: "{redis.address}"}}
signer_url: http://127.0.0.1:{signer_port}
hot_cache_entries: 1000
""")


@pytest.fixture(scope="module")
def world(devpki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from hsmocsp.devpki.bao import free_port

    work = tmp_path_factory.mktemp("replicas")
    redis = RedisServer(work / "redis").start()
    signer_port = free_port()
    config = replica_config(devpki, work, redis, signer_port)
    signer = Responder(config=config, env=dev_env(devpki), workdir=work, port=signer_port,
                       extra_args=("--role", "signer"))  # fmt: skip
    # The server gets no PIN and no SoftHSM configuration in its environment.
    server_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    server = Responder(config=config, env=server_env, workdir=work,
                       extra_args=("--role", "server"))  # fmt: skip
    try:
        signer.start()
        server.start()
        yield World(devpki, redis, signer, server, config)
    finally:
        server.stop()
        signer.stop()
        redis.stop()


def answers(url: str) -> bool:
    try:
        return http(url)[0] == 200
    except OSError:
        return False


def post(url: str, der: bytes) -> ocsp.OCSPResponse:
    req = urllib.request.Request(
        url, data=der, headers={"Content-Type": "application/ocsp-request"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return ocsp.load_der_ocsp_response(resp.read())


def request_der(cert: Path, issuer: Path) -> bytes:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    ca = x509.load_pem_x509_certificate(issuer.read_bytes())
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def serial_request(serial: int, issuer: Path) -> bytes:
    from hsmocsp.ocsp.response import issuer_hashes

    ca = x509.load_pem_x509_certificate(issuer.read_bytes())
    name_hash, key_hash = issuer_hashes(ca, "sha1")
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def test_good_revoked_unknown_verified_through_a_server(world: World) -> None:
    dev = world.dev
    out = world.ocsp("-cert", str(dev.good_pem), "-cert", str(dev.revoked_pem),
                     "-serial", "0x0BADC0DE")  # fmt: skip
    assert "Response verify OK" in out, out
    assert f"{dev.good_pem}: good" in out
    assert f"{dev.revoked_pem}: revoked" in out
    assert "0x0BADC0DE: unknown" in out
    # The EC handle, by its own path, verified against its responder certificate.
    out = world.ocsp("-cert", str(dev.good_pem), "-VAfile", str(dev.ocsp_ec_pem),
                     path="/ec/ocsp")  # fmt: skip
    assert "Response verify OK" in out and f"{dev.good_pem}: good" in out, out
    # A nonce is echoed (forwarded to the signer every time).
    nonce = openssl_ocsp("-url", world.server.url + "/ocsp", "-issuer", str(dev.ca_pem),
                         "-CAfile", str(dev.ca_pem), "-cert", str(dev.good_pem))  # fmt: skip
    assert nonce.verified and "WARNING: no nonce" not in nonce.output, nonce.output
    assert world.metric(world.server, "hsmocsp_forwarded_total") >= 1
    # The server's own metrics follow the conventions too (promtool, Debian's prometheus).
    status, _, body = http(world.server.url + "/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                           timeout=60)  # fmt: skip
    assert status == 200 and check.returncode == 0, (check.stdout + check.stderr).decode()
    for name in ("hsmocsp_hotcache_hits_total", "hsmocsp_store_fetch_hits_total",
                 "hsmocsp_forward_errors_total", "hsmocsp_handle_state"):  # fmt: skip
        assert f"\n{name}{{" in body.decode(), name


def test_a_server_process_maps_no_pkcs11_module_and_holds_no_pin(world: World) -> None:
    assert world.server.proc is not None and world.signer.proc is not None
    pid, signer_pid = world.server.proc.pid, world.signer.proc.pid
    module = Path(world.dev.module).name  # libsofthsm2.so
    pin = world.dev.pin().encode()
    # The signer's workers (children) map the module; the server maps nothing of it.
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert module not in maps and "pkcs11" not in maps.lower(), "PKCS#11 mapped in a server"
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not any(pin in entry for entry in environ)
    assert not any(entry.startswith((b"SOFTHSM2_CONF=", b"HSMOCSP_PIN")) for entry in environ)
    # The check can fail: the signer's process tree does map it.
    children = Path(f"/proc/{signer_pid}/task/{signer_pid}/children").read_text().split()
    assert any(module in Path(f"/proc/{c}/maps").read_text() for c in children)


def test_signer_stopped_store_answers_misses_try_later_then_recovers(world: World) -> None:
    dev = world.dev
    # Pre-signed by the signer into Redis (and asked once, so a server knows them too).
    assert f"{dev.good_pem}: good" in world.ocsp("-cert", str(dev.good_pem))
    world.signer.stop()
    try:
        out = world.ocsp("-cert", str(dev.good_pem))
        assert "Response verify OK" in out and f"{dev.good_pem}: good" in out, out
        # Never asked through this server before: from the store the signer pre-signed.
        out = world.ocsp("-cert", str(dev.revoked_pem), "-VAfile", str(dev.ocsp_ec_pem),
                         path="/ec/ocsp")  # fmt: skip
        assert "Response verify OK" in out and f"{dev.revoked_pem}: revoked" in out, out
        # Several CertIDs in one request need the signer (one signature over all).
        out = world.ocsp("-cert", str(dev.good_pem), "-cert", str(dev.revoked_pem))
        assert "trylater" in out.lower(), out
        # A serial nobody pre-signed: the store lacks it, the signer is gone.
        missing = post(world.server.url + "/ocsp", serial_request(0x5EED, dev.ca_pem))
        assert missing.response_status is ocsp.OCSPResponseStatus.TRY_LATER
        out = world.ocsp("-serial", "0x5EED")
        assert "trylater" in out.lower(), out
        status, _, body = http(world.server.url + "/readyz/root")
        assert status == 503 and b"degraded" in body and b"signer" in body
    finally:
        world.signer.start()
    # Back by itself: no restart of the server.
    answered = wait_until(
        lambda: "0x5EED: unknown" in (out := world.ocsp("-serial", "0x5EED")) and out,
        "the server to answer through the restarted signer",
    )
    assert "Response verify OK" in answered
    wait_until(lambda: http(world.server.url + "/readyz/root")[0] == 200, "ready again")


def test_redis_stopped_hot_cache_and_forwarding_then_back(world: World) -> None:
    dev = world.dev
    assert f"{dev.good_pem}: good" in world.ocsp("-cert", str(dev.good_pem))
    forwarded = world.metric(world.server, "hsmocsp_forwarded_total")
    world.redis.stop()
    try:
        out = world.ocsp("-cert", str(dev.good_pem))
        assert "Response verify OK" in out and f"{dev.good_pem}: good" in out, out
        out = world.ocsp("-cert", str(dev.revoked_pem))
        assert f"{dev.revoked_pem}: revoked" in out, out
        out = world.ocsp("-serial", "0x0BADBEEF")
        assert "0x0BADBEEF: unknown" in out and "Response verify OK" in out, out
        assert world.metric(world.server, "hsmocsp_forwarded_total") > forwarded
        status, _, body = http(world.server.url + "/readyz/root")
        assert status == 503 and b"store" in body, body
        assert http(world.server.url + "/readyz")[0] == 200  # degraded, still serving
    finally:
        world.redis.start()
    wait_until(
        lambda: world.metric(world.server, "hsmocsp_invalidations_subscribed") == 1.0,
        "the server to subscribe again",
    )
    # Subscribed again: the hot cache was emptied, so this asks the store again.
    out = world.ocsp("-cert", str(dev.good_pem))
    assert "Response verify OK" in out and f"{dev.good_pem}: good" in out, out
    wait_until(lambda: http(world.server.url + "/readyz/root")[0] == 200,
               "ready again: " + http(world.server.url + "/readyz")[2].decode())  # fmt: skip


def test_a_server_started_against_an_empty_store_serves_once_the_signer_presigned(
    world: World, tmp_path: Path
) -> None:
    """A second Redis, empty, and a signer and server on it: the server is up first (with
    no signer) and answers tryLater; once the signer has pre-signed, it answers from the
    store (no forwarding needed)."""
    from hsmocsp.devpki.bao import free_port

    dev = world.dev
    redis = RedisServer(tmp_path / "redis").start()
    signer_port = free_port()
    config = replica_config(dev, tmp_path, redis, signer_port)
    server = Responder(config=config, env=dict(os.environ), workdir=tmp_path,
                       extra_args=("--role", "server"))  # fmt: skip
    signer = Responder(config=config, env=dev_env(dev), workdir=tmp_path, port=signer_port,
                       extra_args=("--role", "signer"))  # fmt: skip
    try:
        server.start(wait_ready=False)
        wait_until(lambda: answers(server.url + "/healthz"), "the server to listen")
        first = post(server.url + "/ocsp", request_der(dev.good_pem, dev.ca_pem))
        assert first.response_status is ocsp.OCSPResponseStatus.TRY_LATER
        signer.start()
        wait_until(lambda: world.metric(signer, "hsmocsp_signatures_total") >= 2,
                   "the signer to pre-sign")  # fmt: skip
        good_serial = x509.load_pem_x509_certificate(dev.good_pem.read_bytes()).serial_number
        stored = f"hsmocsp:r:root:{good_serial:x}"
        wait_until(lambda: redis.cmd("EXISTS", stored) == 1, f"{stored} in Redis")
        out = world.ocsp("-cert", str(dev.good_pem), "-cert", str(dev.revoked_pem), url=server.url)
        assert "Response verify OK" in out, out
        out = world.ocsp("-cert", str(dev.good_pem), url=server.url)
        assert f"{dev.good_pem}: good" in out
        assert world.metric(server, "hsmocsp_store_fetch_hits_total") >= 1
    finally:
        server.stop()
        signer.stop()
        redis.stop()


def test_revocation_on_the_signer_reaches_the_server_within_the_bound(world: World) -> None:
    """No ``good`` from the server for a request sent later than 1 s after the signer
    loaded the revocation. The load happened after the signer processed its last ``good``
    answer (asked all along by a second client), so that answer's send time is taken as
    the load time: a strict lower bound. The server's lag behind the signer is measured
    and printed (docs/design-replicas.md), not asserted."""
    dev = world.dev
    leaf = issue_leaf(dev, "replica-revoke-me")
    der = request_der(leaf, dev.ca_pem)
    url = world.server.url + "/ocsp"
    wait_until(
        lambda: post(url, der).certificate_status is ocsp.OCSPCertStatus.GOOD,
        "the new leaf to be good through the server",
    )
    # Clients keep asking the server (its hot cache holds the good answer) and the signer.
    at_server: list[tuple[float, ocsp.OCSPCertStatus]] = []
    at_signer: list[tuple[float, ocsp.OCSPCertStatus]] = []
    stop = threading.Event()

    def ask(where: str, into: list[tuple[float, ocsp.OCSPCertStatus]]) -> None:
        while not stop.is_set():
            sent = time.time()
            try:
                into.append((sent, post(where, der).certificate_status))
            except Exception:
                pass  # a failed request is no answer

    askers = [
        threading.Thread(target=ask, args=(url, at_server), daemon=True),
        threading.Thread(target=ask, args=(world.signer.url + "/ocsp", at_signer), daemon=True),
    ]
    for asker in askers:
        asker.start()
    revoked = ocsp.OCSPCertStatus.REVOKED
    try:
        revoke(dev, leaf, "keyCompromise")
        regen_crl(dev)
        wait_until(lambda: any(s is revoked for _, s in at_signer), "the signer to revoke",
                   timeout=30)  # fmt: skip
        seen_at = time.time()
        wait_until(lambda: any(t > seen_at + 1.5 for t, _ in at_server), "answers after it")
    finally:
        stop.set()
        for asker in askers:
            asker.join(15)
    good = ocsp.OCSPCertStatus.GOOD
    first_revoked_at_signer = min(t for t, s in at_signer if s is revoked)
    loaded = max(t for t, s in at_signer if s is good and t < first_revoked_at_signer)
    late = [round(t - loaded, 3) for t, s in at_server if s is good and t > loaded + 1]
    assert not late, f"the server answered good {late} s after the signer loaded the revocation"
    last_good = max((t for t, s in at_server if s is good), default=loaded)
    first_revoked = min(t for t, s in at_server if s is revoked)
    print(f"revocation: the signer's last good sent at L; the server's last good sent"
          f" {last_good - loaded:+.3f} s, its first revoked {first_revoked - loaded:+.3f} s"
          f" after L (signer's first revoked {first_revoked_at_signer - loaded:+.3f} s;"
          f" {len(at_server)} server answers)")  # fmt: skip
    out = world.ocsp("-cert", str(leaf))
    assert "Response verify OK" in out and f"{leaf}: revoked" in out, out
