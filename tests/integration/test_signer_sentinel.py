"""A real signer (twistd, ``role: signer``) writing through Redis Sentinel while the
primary is SIGKILLed twice (3 sentinels, quorum 2): it keeps answering (openssl
verifies), and every response it signed ends up on whichever primary the sentinels
promoted, without a restart. Long: ``make reliability``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env
from tests.integration.harness import Responder, wait_until
from tests.integration.test_signer_redis import _ask, _serial
from tests.redisfixtures import MASTER_NAME, RedisServer, SentinelSet, start_sentinel_set

pytestmark = pytest.mark.reliability

#: CertID hash algorithms we answer: one new response (hash field) per ask.
DIGESTS = ("-sha1", "-sha256", "-sha384", "-sha512")


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    # Down after 2 s, as Redis's own Sentinel tests use: at 0.5 s a sentinel took a
    # just-promoted primary for down (its new link had no PONG yet) and failed over
    # again, two or three times in a row, promoting replicas still syncing.
    found = start_sentinel_set(tmp_path / "sentinel", replicas=2, sentinels=3, down_after_ms=2000)
    yield found
    found.stop()


def test_signer_follows_two_failovers(
    devpki: DevPki, tmp_path: Path, sentinels: SentinelSet
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = work / "hsmocsp.yaml"
    addresses = ", ".join(s.address for s in sentinels.sentinels)
    cfg.write_text(f"""
role: signer
data_dir: {work / "data"}
presign_rate: 0
store:
  kind: redis
  sentinels: [{addresses}]
  master_name: {MASTER_NAME}
  timeout: 0.5
tokens:
  dev:
    module: {devpki.module}
    token_label: {devpki.token_label}
    pin_file: {devpki.pin_file}
    workers: 1
handles:
  root:
    path: /ocsp
    issuer: {devpki.ca_pem}
    responder_cert: {devpki.ocsp_pem}
    signer: {{token: dev, key_label: {devpki.ocsp_key_label}}}
    source: {{kind: openssl, index: {devpki.index}}}
""")
    r = Responder(config=cfg, env=dev_env(devpki), workdir=work).start()
    keys = [f"hsmocsp:r:root:{_serial(c):x}" for c in (devpki.good_pem, devpki.revoked_pem)]
    asks = [(devpki.good_pem, d) for d in DIGESTS] + [(devpki.revoked_pem, "-sha1")]

    def held(server: RedisServer) -> int:
        return sum(server.cmd("HLEN", k) for k in keys)

    def ask(n: int) -> None:
        cert, digest = asks[n]
        output = _ask(r, devpki, cert, work / f"{n}.der", digest)  # openssl verified it
        want = "revoked" if cert == devpki.revoked_pem else "good"
        assert f": {want}" in output, output  # the right status, failover or not
    try:
        asked = 0
        for round_ in range(3):
            primary = sentinels.primary()
            ask(asked)
            asked += 1
            wait_until(lambda p=primary, n=asked: held(p) == n, "written")
            if round_ == 2:
                break
            # Every replica holds it before the kill: a failover may not lose what the
            # store acknowledged before it (Redis replicates asynchronously).
            for replica in [s for s in sentinels.servers if s is not primary]:
                wait_until(lambda s=replica, n=asked: held(s) == n, "replicated", 60)
            primary.kill()
            # Signed while no primary is known: kept, then written to the promoted one.
            ask(asked)
            asked += 1
            promoted = sentinels.wait_failover(primary.port, 60)
            wait_until(lambda p=promoted, n=asked: held(p) == n, "caught up", 60)
            primary.start()  # back as a replica of the promoted one
            assert sentinels.wait_replicated() is promoted
        assert r.alive()
    finally:
        r.stop()
