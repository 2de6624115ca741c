"""A real signer (``twistd hsmocsp``, ``role: signer``) writing to a real redis-server
(#11): what it answers is in Redis byte for byte with its TTL at nextUpdate; with Redis
stopped it keeps answering (openssl verifies) and writing SQLite, counts and logs the
failure once, and catches up by itself when Redis returns; a revocation loaded deletes
the serial in Redis and publishes it."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from hsmocsp.devpki.opensslca import DevPki
from hsmocsp.stores.codec import decode
from tests.integration.conftest import dev_env
from tests.integration.harness import Responder, http, openssl_ocsp, wait_until
from tests.redisfixtures import RedisFactory, RedisServer


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def _config(dev: DevPki, work: Path, index: Path, redis: RedisServer) -> Path:
    cfg = work / "hsmocsp.yaml"
    cfg.write_text(f"""
role: signer
data_dir: {work / "data"}
presign_rate: 0
store:
  kind: redis
  address: {redis.address}
  timeout: 0.5
tokens:
  dev:
    module: {dev.module}
    token_label: {dev.token_label}
    pin_file: {dev.pin_file}
    workers: 1
handles:
  root:
    path: /ocsp
    issuer: {dev.ca_pem}
    responder_cert: {dev.ocsp_pem}
    signer: {{token: dev, key_label: {dev.ocsp_key_label}}}
    source: {{kind: openssl, index: {index}, poll_interval: 0.2}}
    validity: 3600
""")
    return cfg


def _ask(r: Responder, dev: DevPki, cert: Path, out: Path, *extra: str) -> str:
    result = openssl_ocsp(*extra,
        "-url", r.url + "/ocsp", "-issuer", str(dev.ca_pem), "-cert", str(cert), "-no_nonce",
        "-VAfile", str(dev.ocsp_pem), "-CAfile", str(dev.ca_pem), "-respout", str(out),
    )  # fmt: skip
    assert result.verified, result.output
    return result.output


def _stored(redis: RedisServer, serial: int) -> list[bytes]:
    reply = redis.cmd("HGETALL", f"hsmocsp:r:root:{serial:x}")
    return [reply[n + 1] for n in range(0, len(reply), 2)]


def redis_server_busy(redis: RedisServer) -> str:
    """What Redis is doing now, as seen from outside: "DEBUG" while DEBUG SLEEP runs."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            sock.recv(64)
            return "awake"
    except TimeoutError:
        return "DEBUG"


def _metric(r: Responder, name: str) -> float:
    for line in http(r.url + "/metrics")[2].decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count: int = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
        return count


def _revoke_in_copy(index: Path, serial: int) -> None:
    """Mark ``serial`` revoked in our copy of index.txt (the shared dev PKI stays as is)."""
    when = datetime.now(UTC).strftime("%y%m%d%H%M%SZ")
    lines = []
    for line in index.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) > 3 and int(cols[3], 16) == serial:
            cols[0], cols[2] = "R", f"{when},keyCompromise"
        lines.append("\t".join(cols))
    index.write_text("\n".join(lines) + "\n")


PASSWORD = "redis-Secret-4711"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_signer_feeds_redis_through_an_outage(
    devpki: DevPki, tmp_path: Path, redis_factory: RedisFactory
) -> None:
    redis_server = redis_factory(password=PASSWORD)
    work = tmp_path / "work"
    work.mkdir()
    index = work / "index.txt"
    index.write_text(devpki.index.read_text())
    config = _config(devpki, work, index, redis_server)
    config.write_text(config.read_text().replace(
        "  timeout: 0.5\n", "  timeout: 0.5\n  password_env: TEST_REDIS_PASSWORD\n"
    ))  # fmt: skip
    env = dict(dev_env(devpki), TEST_REDIS_PASSWORD=PASSWORD)
    r = Responder(config=config, env=env, workdir=work)
    good, revoked = _serial(devpki.good_pem), _serial(devpki.revoked_pem)
    inv = redis_server.subscribe("hsmocsp:inv")
    try:
        r.start()
        assert r.proc is not None
        workers = _children(r.proc.pid)
        assert workers  # the signing worker(s): they do not inherit the Redis password
        for pid in workers:
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        # 1. An answer is in Redis as sent, byte for byte, until its nextUpdate.
        _ask(r, devpki, devpki.good_pem, work / "good.der")
        wait_until(lambda: _stored(redis_server, good), "the good response in Redis")
        (value,) = _stored(redis_server, good)
        stored = decode(value)
        assert stored.der == (work / "good.der").read_bytes()
        assert redis_server.cmd("EXPIRETIME", f"hsmocsp:r:root:{good:x}") == int(
            stored.next_update
        )
        assert _metric(r, 'hsmocsp_store_connected{store="redis"}') == 1
        body = http(r.url + "/metrics")[2]
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()

        # 1b. Redis stalled (DEBUG SLEEP: it answers nobody): a new answer does not wait.
        stall = threading.Thread(target=redis_server.cmd, args=("DEBUG", "SLEEP", 4))
        stall.start()
        wait_until(lambda: "DEBUG" in redis_server_busy(redis_server), "Redis asleep")
        # A CertID form not asked yet (SHA-256): signed now, its write waits for Redis.
        _ask(r, devpki, devpki.good_pem, work / "during-stall.der", "-sha256")
        answered_while_stalled = stall.is_alive()
        stall.join()
        assert answered_while_stalled
        wait_until(lambda: len(_stored(redis_server, good)) == 2, "its write, once awake")

        # 2. Redis down: answers go on, SQLite is written, the failure counted and logged once.
        redis_server.stop()
        db = work / "data" / "responses.sqlite"
        out = _ask(r, devpki, devpki.revoked_pem, work / "revoked.der")
        assert "revoked" in out
        wait_until(lambda: _rows(db) == 3, "the responses in SQLite")
        errors = 'hsmocsp_store_write_errors_total{store="redis"}'
        wait_until(lambda: _metric(r, errors) >= 1, "a failed write counted")
        assert _metric(r, 'hsmocsp_store_pending_rows{store="redis"}') == 1
        assert _metric(r, 'hsmocsp_store_ready{store="redis"}') == 0
        code, _, body = http(r.url + "/readyz")
        state = json.loads(body)["handles"]["root"]
        assert code == 200 and state["state"] == "degraded", state
        assert "shared store: cannot write" in state["reason"], state
        _ask(r, devpki, devpki.good_pem, work / "good-again.der")  # cached: still served
        assert len(re.findall(r"redis#warn\] store \S+: cannot write", r.output())) == 1

        # 3. Redis back (empty, as after a crash): what waited arrives without a restart.
        redis_server.start()
        wait_until(lambda: _stored(redis_server, revoked), "the revoked response in Redis")
        assert decode(_stored(redis_server, revoked)[0]).der == (
            work / "revoked.der"
        ).read_bytes()
        wait_until(lambda: _metric(r, 'hsmocsp_store_ready{store="redis"}') == 1, "ready")
        assert _metric(r, 'hsmocsp_store_pending_rows{store="redis"}') == 0
        assert len(re.findall(r"redis#info\] store \S+: writing again", r.output())) == 1
        wait_until(
            lambda: json.loads(http(r.url + "/readyz")[2])["state"] == "ready", "ready again"
        )
        # Redis came back empty: what the signer holds from before is written again too
        # (servers find it in the store instead of forwarding until it is re-signed).
        wait_until(lambda: len(_stored(redis_server, good)) == 2, "the older responses again")
        assert decode(_stored(redis_server, good)[0]).der in (
            (work / "good.der").read_bytes(), (work / "during-stall.der").read_bytes(),
        )

        # 4. A revocation loaded: the serial is deleted in Redis and published.
        inv.close()
        inv = redis_server.subscribe("hsmocsp:inv")
        redis_server.cmd("HSET", f"hsmocsp:r:root:{good:x}", "x", "stale")
        _revoke_in_copy(index, good)
        assert inv.next(timeout=15) == f"root {good:x}".encode()
        assert redis_server.cmd("EXISTS", f"hsmocsp:r:root:{good:x}") == 0
        assert "revoked" in _ask(r, devpki, devpki.good_pem, work / "now-revoked.der")
        wait_until(lambda: _stored(redis_server, good), "the new answer in Redis")
        assert decode(_stored(redis_server, good)[0]).status_key.startswith("revoked")
        assert r.alive()
        assert PASSWORD not in r.output()
    finally:
        inv.close()
        r.stop()
