"""cfssl-backed CAs end to end: the real cfssl, SQLite and PostgreSQL certdbs, twistd, openssl.

Certificates are issued with ``cfssl sign -db-config`` and revoked with ``cfssl revoke
-db-config ... -reason keyCompromise``; hsmocsp signs with a key in SoftHSM; every answer is
checked by ``openssl ocsp`` with ``-VAfile``/``-CAfile``. Pre-signed answers come from
``cfssl ocsprefresh`` (the ocsp_responses table) and ``cfssl ocspdump`` (a file) and must
be served byte for byte. PostgreSQL is a real cluster (``initdb`` + ``pg_ctl``, as
``nobody`` when we are root) that one test stops and starts under load.
"""

from __future__ import annotations

import base64
import random
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from hsmocsp.devpki.cfsslca import (
    SIGNER_LABEL,
    CfsslCA,
    CfsslLevel,
    build_cfssl_level,
    hsm_signer_cert,
    init_ca,
    use_database,
)
from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env
from tests.integration.harness import Responder, http, openssl_ocsp
from tests.integration.pgcluster import PgCluster, remove_cluster, start_cluster
from tests.waiting import wait_until

OCSP_REQUEST = {"Content-Type": "application/ocsp-request"}




def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def config_text(dev: DevPki, handles: str, data_dir: Path) -> str:
    return f"""
data_dir: {data_dir}
tokens:
  dev:
    module: {dev.module}
    token_label: {dev.token_label}
    pin_file: {dev.pin_file}
    workers: 1
handles:
{handles}
"""


def cfssl_handle(name: str, path: str, ca: CfsslCA, ocsp_pem: Path, poll: float = 0.3) -> str:
    return f"""  {name}:
    path: {path}
    issuer: {ca.ca_pem}
    responder_cert: {ocsp_pem}
    signer: {{token: dev, key_label: {SIGNER_LABEL}}}
    source: {{kind: cfssl, db_config: {ca.db_config}, poll_interval: {poll}}}
    validity: 3600
"""


@dataclass
class Checker:
    responder: Responder
    ca: CfsslCA
    va: Path

    def ocsp(self, path: str, *args: str, va: Path | None = None) -> str:
        result = openssl_ocsp(
            "-url", self.responder.url + path, "-issuer", str(self.ca.ca_pem), *args,
            "-VAfile", str(va or self.va), "-CAfile", str(self.ca.ca_pem),
        )  # fmt: skip
        assert result.verified, result.output
        return result.output

    def status(self, path: str, cert: Path) -> str:
        out = self.ocsp(path, "-cert", str(cert))
        m = re.search(rf"{re.escape(str(cert))}: (\w+)", out)
        assert m is not None, out
        return m.group(1)


# --- SQLite: the dev PKI's cfssl level (HSM signer) ---------------------------------------


@dataclass
class SqliteWorld:
    level: CfsslLevel
    responder: Responder
    check: Checker
    dump: Path


@pytest.fixture(scope="module")
def sqlite_world(devpki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqliteWorld]:
    level = build_cfssl_level(devpki)
    ca = level.ca
    # cfssl's own pre-signed answers, signed by the CA key on disk, as cfssl does it.
    ca.ocsprefresh(ca.ca_pem, ca.ca_key)
    work = tmp_path_factory.mktemp("cfssl-sqlite")
    dump = work / "ocspdump.txt"
    dump.write_bytes(ca.ocspdump())
    handles = cfssl_handle("cfssl", "/cfssl/ocsp", ca, level.ocsp_pem) + f"""  cfssl-presigned:
    path: /cfssl-presigned/ocsp
    signer: none
    source: {{kind: cfssl, db_config: {ca.db_config}, poll_interval: 0.3}}
  dump:
    path: /dump/ocsp
    signer: none
    source: {{kind: response-file, path: {dump}, poll_interval: 0.3}}
"""
    cfg = work / "hsmocsp.yaml"
    cfg.write_text(config_text(devpki, handles, work / "data"))
    r = Responder(config=cfg, env=dev_env(devpki), workdir=work)
    r.start()
    try:
        yield SqliteWorld(level, r, Checker(r, ca, level.ocsp_pem), dump)
    finally:
        r.stop()


def test_sqlite_good_revoked_unknown(sqlite_world: SqliteWorld) -> None:
    """Rows as cfssl 1.2.0 writes them (empty AKI for good) and with an AKI (revoked)."""
    w = sqlite_world
    assert w.check.status("/cfssl/ocsp", w.level.good_pem) == "good"
    out = w.check.ocsp("/cfssl/ocsp", "-cert", str(w.level.revoked_pem))
    assert f"{w.level.revoked_pem}: revoked" in out
    assert "Reason: keyCompromise" in out
    out = w.check.ocsp("/cfssl/ocsp", "-serial", "0xC0FFEE0DDBA11")
    assert "0xC0FFEE0DDBA11: unknown" in out


def test_cfssl_level_second_build_changes_nothing(
    sqlite_world: SqliteWorld, devpki: DevPki
) -> None:
    """make run builds the level at every start: what exists is kept byte for byte."""
    root = sqlite_world.level.ca.directory
    before = {p: p.read_bytes() for p in [*sorted(root.rglob("*.pem")), root / "db.json"]}
    again = build_cfssl_level(devpki)
    assert again.good_pem == sqlite_world.level.good_pem
    assert {p: p.read_bytes() for p in before} == before


def test_sqlite_issue_and_revoke_while_running(sqlite_world: SqliteWorld) -> None:
    w = sqlite_world
    leaf = w.level.ca.issue(f"while-running-{random.randrange(1 << 30)}")
    # Seen at once (a point lookup for a serial not loaded yet), then cached as good.
    assert w.check.status("/cfssl/ocsp", leaf) == "good"
    w.level.ca.revoke(leaf, "keyCompromise")
    wait_until(lambda: w.check.status("/cfssl/ocsp", leaf) == "revoked",
               "the revocation reaches the answer")  # fmt: skip
    out = w.check.ocsp("/cfssl/ocsp", "-cert", str(leaf))
    assert "Reason: keyCompromise" in out


def _request(ca: CfsslCA, cert: Path, out: Path) -> bytes:
    subprocess.run(
        ["openssl", "ocsp", "-issuer", str(ca.ca_pem), "-cert", str(cert), "-no_nonce",
         "-reqout", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return out.read_bytes()


def _dumped(dump: bytes, serial: int) -> bytes:
    for line in dump.splitlines():
        der = base64.b64decode(line)
        if ocsp.load_der_ocsp_response(der).serial_number == serial:
            return der
    raise AssertionError(f"serial {serial} not in the dump")


def _post(r: Responder, path: str, body: bytes) -> bytes:
    code, _, answer = http(r.url + path, data=body, headers=OCSP_REQUEST)
    assert code == 200
    return answer


def test_presigned_served_byte_for_byte_and_reloaded(
    sqlite_world: SqliteWorld, tmp_path: Path
) -> None:
    w = sqlite_world
    ca = w.level.ca
    req = _request(ca, w.level.good_pem, tmp_path / "req.der")
    expected = _dumped(w.dump.read_bytes(), serial_of(w.level.good_pem))
    assert _post(w.responder, "/dump/ocsp", req) == expected
    assert _post(w.responder, "/cfssl-presigned/ocsp", req) == expected
    # openssl accepts them: signed by the CA (no delegated certificate), good.
    for path in ("/dump/ocsp", "/cfssl-presigned/ocsp"):
        out = w.check.ocsp(path, "-cert", str(w.level.good_pem), "-no_nonce", va=ca.ca_pem)
        assert f"{w.level.good_pem}: good" in out
    out = w.check.ocsp("/dump/ocsp", "-cert", str(w.level.revoked_pem), va=ca.ca_pem)
    assert "Reason: keyCompromise" in out
    # A serial with no pre-signed answer: unauthorized, as cfssl ocspserve says.
    out = openssl_ocsp("-url", w.responder.url + "/dump/ocsp", "-issuer", str(ca.ca_pem),
                       "-serial", "0x5EED").output  # fmt: skip
    assert "unauthorized" in out.lower(), out

    # cfssl ocsprefresh again (new signatures), ocspdump into the file: both follow.
    ca.ocsprefresh(ca.ca_pem, ca.ca_key)
    fresh = ca.ocspdump()
    tmp = w.dump.with_suffix(".new")
    tmp.write_bytes(fresh)
    tmp.rename(w.dump)
    new = _dumped(fresh, serial_of(w.level.good_pem))
    assert new != expected
    wait_until(lambda: _post(w.responder, "/dump/ocsp", req) == new, "the new dump is served")
    wait_until(lambda: _post(w.responder, "/cfssl-presigned/ocsp", req) == new,
               "the refreshed table is served")  # fmt: skip


def test_bad_response_file_keeps_the_last_good_one(
    sqlite_world: SqliteWorld, tmp_path: Path
) -> None:
    w = sqlite_world
    req = _request(w.level.ca, w.level.good_pem, tmp_path / "req.der")
    before = _post(w.responder, "/dump/ocsp", req)
    good_text = w.dump.read_bytes()
    w.dump.write_bytes(good_text + b"this is not base64!\n")
    where = f"{w.dump}: line {len(good_text.splitlines()) + 1}"
    wait_until(lambda: where in w.responder.output(), "the problem is logged")
    assert _post(w.responder, "/dump/ocsp", req) == before
    # Truncated (what `cfssl ocspdump > FILE` leaves for a moment): not taken for "no answers".
    w.dump.write_bytes(b"")
    wait_until(lambda: "no responses in it" in w.responder.output(), "the empty file is refused")
    assert _post(w.responder, "/dump/ocsp", req) == before
    w.dump.write_bytes(good_text)


# --- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


@dataclass
class PgWorld:
    cluster: PgCluster
    ca: CfsslCA
    ocsp_pem: Path
    good: Path
    revoked: Path
    responder: Responder
    check: Checker


@pytest.fixture(scope="module")
def pg_world(
    devpki: DevPki, pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgWorld]:
    work = tmp_path_factory.mktemp("cfssl-pg")
    ca = init_ca(work / "ca", cn="hsmocsp test cfssl CA on PostgreSQL")
    use_database(ca, "postgres", pg_cluster.create_database("certdb"))
    ocsp_pem = ca.directory / "ocsp.pem"
    hsm_signer_cert(devpki, ca, ocsp_pem, "cfssl pg OCSP signer")
    good = ca.issue("good")
    revoked = ca.issue("revoked")
    ca.revoke(revoked, "keyCompromise")
    cfg = work / "hsmocsp.yaml"
    cfg.write_text(config_text(devpki, cfssl_handle("pg", "/pg/ocsp", ca, ocsp_pem), work / "d"))
    r = Responder(config=cfg, env=dev_env(devpki), workdir=work)
    r.start()
    try:
        yield PgWorld(pg_cluster, ca, ocsp_pem, good, revoked, r, Checker(r, ca, ocsp_pem))
    finally:
        r.stop()


def test_postgres_good_revoked_unknown_and_revocation_while_running(pg_world: PgWorld) -> None:
    w = pg_world
    assert w.check.status("/pg/ocsp", w.good) == "good"
    out = w.check.ocsp("/pg/ocsp", "-cert", str(w.revoked))
    assert f"{w.revoked}: revoked" in out and "Reason: keyCompromise" in out
    assert "0xABCDEF1234: unknown" in w.check.ocsp("/pg/ocsp", "-serial", "0xABCDEF1234")

    leaf = w.ca.issue("pg-while-running")
    assert w.check.status("/pg/ocsp", leaf) == "good"
    w.ca.revoke(leaf, "keyCompromise")
    wait_until(lambda: w.check.status("/pg/ocsp", leaf) == "revoked",
               "the revocation reaches the answer")  # fmt: skip


def test_postgres_serial_answered_unknown_then_issued(pg_world: PgWorld) -> None:
    """No rowid in PostgreSQL: serials answered "unknown" are asked again at every poll."""
    import psycopg

    w = pg_world
    serial = random.randrange(1 << 60, 1 << 61)
    assert f"{serial:#x}: unknown" in w.check.ocsp("/pg/ocsp", "-serial", f"{serial:#x}")
    # The row as cfssl 1.2.0 writes it (we choose the serial so we can ask first).
    with psycopg.connect(w.ca.db().data_source, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO certificates (serial_number, authority_key_identifier, ca_label, "
            "status, reason, expiry, revoked_at, pem) VALUES (%s, %s, %s, %s, 0, %s, %s, %s)",
            (str(serial).encode(), b"", b"", b"good", datetime(2030, 1, 1), datetime(1, 1, 1),
             b"-----BEGIN CERTIFICATE-----"),
        )  # fmt: skip
    wanted = f"{serial:#x}: good"
    wait_until(lambda: wanted in w.check.ocsp("/pg/ocsp", "-serial", f"{serial:#x}"),
               "the cached unknown answer is replaced")  # fmt: skip


def _metric(r: Responder, name: str, handle: str) -> float:
    _, _, body = http(r.url + "/metrics")
    m = re.search(rf'^{name}{{handle="{handle}"}} (\S+)$', body.decode(), re.M)
    assert m is not None
    return float(m.group(1))


def test_postgres_stopped_and_started_under_load(pg_world: PgWorld, tmp_path: Path) -> None:
    """Known serials keep being answered, new ones get tryLater, and it recovers by itself."""
    w = pg_world
    requests = [_request(w.ca, c, tmp_path / f"{c.stem}.der") for c in (w.good, w.revoked)]
    outcomes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for body in requests:
                code, _, answer = http(w.responder.url + "/pg/ocsp", data=body,
                                       headers=OCSP_REQUEST)  # fmt: skip
                ok = code == 200 and ocsp.load_der_ocsp_response(answer).response_status is (
                    ocsp.OCSPResponseStatus.SUCCESSFUL
                )
                outcomes.append(1 if ok else 0)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(outcomes) > 20, "some load")
        w.cluster.stop()
        wait_until(lambda: _metric(w.responder, "hsmocsp_source_ready", "pg") == 0.0,
                   "the outage is noticed")  # fmt: skip
        code, _, body = http(w.responder.url + "/readyz/pg")
        assert code == 503 and b"degraded" in body, body  # this CA's strict probe
        before = len(outcomes)
        # A serial never seen needs the database: tryLater (never a guess).
        out = openssl_ocsp("-url", w.responder.url + "/pg/ocsp", "-issuer", str(w.ca.ca_pem),
                           "-serial", "0x1DEAD").output  # fmt: skip
        assert "trylater" in out.lower(), out
        wait_until(lambda: len(outcomes) > before + 20, "load goes on during the outage")
        w.cluster.start()
        wait_until(lambda: _metric(w.responder, "hsmocsp_source_ready", "pg") == 1.0,
                   "recovery by itself")  # fmt: skip
        assert "0x2DEAD: unknown" in w.check.ocsp("/pg/ocsp", "-serial", "0x2DEAD")
        assert w.check.status("/pg/ocsp", w.good) == "good"
    finally:
        stop.set()
        thread.join(30)
        if not w.cluster.running():
            w.cluster.start()
    assert outcomes and all(outcomes), f"{outcomes.count(0)} of {len(outcomes)} failed"
    log = w.responder.output()
    # Said once each: the outage (with what is still served) and the recovery.
    assert log.count("degraded: ") == 1, log
    assert re.search(r"serving the \d+ certificates loaded, new serials get tryLater", log), log
    assert log.count("ready again") == 1, log
