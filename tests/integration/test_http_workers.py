"""``--workers N``: extra HTTP processes on the same port, fed from the main cache.

A real ``twistd hsmocsp --workers 3`` (the main process and two fronts) on the dev
PKI. Connections are spread by the kernel (``SO_REUSEPORT``), so each check opens
many new connections; ``hsmocsp_front_answers_total`` shows the fronts answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hsmocsp.devpki.opensslca import DevPki, issue_leaf, revoke
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, http, openssl_ocsp
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

CONNECTIONS = 60
HOT = 2  # hot_cache_entries: each front holds at most this many responses per handle


@pytest.fixture(scope="module")
def workers(devpki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Responder]:
    work = tmp_path_factory.mktemp("workers")
    env = dict(dev_env(devpki), HSMOCSP_TEST_SECRET="not-for-fronts")
    r = Responder(
        config=level1_config(devpki, work, extra=f"hot_cache_entries: {HOT}"), env=env,
        workdir=work, extra_args=("--workers", "3"),
    )  # fmt: skip
    r.start()
    yield r
    r.stop()


def _request(cert: Path, issuer: Path) -> bytes:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    ca = x509.load_pem_x509_certificate(issuer.read_bytes())
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _post_new_connection(port: int, der: bytes) -> bytes:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/ocsp", der, {"Content-Type": "application/ocsp-request"})
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def _statuses(r: Responder, der: bytes) -> set[ocsp.OCSPCertStatus]:
    seen = set()
    for _ in range(CONNECTIONS):
        parsed = ocsp.load_der_ocsp_response(_post_new_connection(r.port, der))
        assert parsed.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        seen.add(parsed.certificate_status)
    return seen


def _front_answers(r: Responder, metric: str = "hsmocsp_front_answers_total") -> dict[str, float]:
    text = http(r.url + "/metrics")[2].decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            label = line.split('front="', 1)[1].split('"', 1)[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def _front_pids(r: Responder) -> list[int]:
    assert r.proc is not None
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(r.proc.pid)], capture_output=True, text=True
    ).stdout
    return [
        int(line.split()[0]) for line in out.splitlines() if "hsmocsp.web.front_process" in line
    ]


def _readyz_fronts(r: Responder) -> dict[str, str]:
    fronts: dict[str, str] = json.loads(http(r.url + "/readyz")[2])["fronts"]
    return fronts


def test_fronts_answer_and_openssl_verifies(workers: Responder, devpki: DevPki) -> None:
    assert len(_front_pids(workers)) == 2
    for pid in _front_pids(workers):  # a front parses untrusted input: it holds no secret
        assert b"HSMOCSP_TEST_SECRET" not in Path(f"/proc/{pid}/environ").read_bytes()
    assert workers.proc is not None
    assert b"HSMOCSP_TEST_SECRET" in Path(f"/proc/{workers.proc.pid}/environ").read_bytes()
    # Ready means every front has bound the port (the start fixture waited for /readyz).
    assert _readyz_fronts(workers) == {"state": "ready", "reason": ""}
    der = _request(devpki.good_pem, devpki.ca_pem)
    _post_new_connection(workers.port, der)  # signed once, pushed to the fronts
    # Whichever process takes a connection answers good; once the push has reached the
    # fronts they answer from their copy (they report counts once a second).
    wait_until(
        lambda: _statuses(workers, der) == {ocsp.OCSPCertStatus.GOOD}
        and len(_front_answers(workers)) == 2,
        "both fronts to report answers",
    )
    assert all(n > 0 for n in _front_answers(workers).values())
    # Whatever process answers, openssl verifies it: good, revoked and unknown.
    for _ in range(6):
        for args, expect in (
            (("-cert", str(devpki.good_pem)), "good"),
            (("-cert", str(devpki.revoked_pem)), "revoked"),
            (("-serial", "0x7E57AB1F"), "unknown"),
        ):
            result = openssl_ocsp(
                "-url", workers.url + "/ocsp", "-issuer", str(devpki.ca_pem), "-no_nonce",
                *args, "-VAfile", str(devpki.ocsp_pem), "-CAfile", str(devpki.ca_pem),
            )  # fmt: skip
            assert result.verified, result.output
            assert f": {expect}" in result.output


def test_relayed_requests_are_answered_by_the_main_process(workers: Responder) -> None:
    # Not OCSP fast-path material: probes, metrics, CA download, a 404, a bad request.
    for _ in range(10):
        assert http(workers.url + "/readyz")[0] == 200
        assert http(workers.url + "/ca/root.der")[0] == 200
        assert http(workers.url + "/nothing-here")[0] == 404
        status, _, body = http(
            workers.url + "/ocsp", b"\x30\x03garbage", {"Content-Type": "application/ocsp-request"}
        )
        assert status == 200
        assert ocsp.load_der_ocsp_response(body).response_status == (
            ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        )


def test_revocation_reaches_every_process(workers: Responder, devpki: DevPki) -> None:
    leaf = issue_leaf(devpki, "workers-leaf")
    der = _request(leaf, devpki.ca_pem)
    wait_until(
        lambda: ocsp.load_der_ocsp_response(_post_new_connection(workers.port, der))
        .certificate_status == ocsp.OCSPCertStatus.GOOD,
        "the new leaf to be known",
    )  # fmt: skip
    # Both fronts hold the "good" answer before the revocation (else the check below
    # proves nothing): they answer it from their copy, which their counts show.
    answered = _front_answers(workers)
    wait_until(
        lambda: _statuses(workers, der) == {ocsp.OCSPCertStatus.GOOD}
        and all(_front_answers(workers).get(n, 0) > answered.get(n, 0) for n in ("1", "2")),
        "both fronts to answer the new leaf from their copy",
    )
    generation = _generation(workers)
    revoke(devpki, leaf, "superseded")
    wait_until(lambda: _generation(workers) > generation, "the revocation to be loaded")
    # No OCSP request has reached any process since the reload. Many at once now:
    # a front still holding the old "good" would answer it at once, before the main
    # process has signed anything new.
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        answers = list(pool.map(lambda _: _post_new_connection(workers.port, der), range(60)))
    seen = {ocsp.load_der_ocsp_response(a).certificate_status for a in answers}
    assert seen == {ocsp.OCSPCertStatus.REVOKED}
    assert _statuses(workers, der) == {ocsp.OCSPCertStatus.REVOKED}


def _generation(r: Responder) -> float:
    text = http(r.url + "/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith('hsmocsp_source_generation{handle="root"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no source generation metric")


def test_a_front_that_dies_is_replaced(workers: Responder, devpki: DevPki) -> None:
    before = _front_pids(workers)
    os.kill(before[0], signal.SIGKILL)
    wait_until(
        lambda: len(_front_pids(workers)) == 2 and before[0] not in _front_pids(workers),
        "a new front",
    )
    wait_until(lambda: _readyz_fronts(workers)["state"] == "ready", "the new front to listen")
    answered = _front_answers(workers)
    der = _request(devpki.good_pem, devpki.ca_pem)  # cached long ago: only the snapshot has it
    assert _statuses(workers, der) == {ocsp.OCSPCertStatus.GOOD}
    # Both fronts, the new one included, answered from their copy of the cache.
    wait_until(
        lambda: all(_front_answers(workers)[n] > answered[n] for n in answered),
        "both fronts to answer",
    )


def test_fronts_stop_with_the_main_process(devpki: DevPki, tmp_path: Path) -> None:
    r = Responder(
        config=level1_config(devpki, tmp_path), env=dev_env(devpki), workdir=tmp_path,
        extra_args=("--workers", "2"),
    )  # fmt: skip
    r.start()
    pids = _front_pids(r)
    assert len(pids) == 1
    r.stop()
    wait_until(lambda: not os.path.exists(f"/proc/{pids[0]}"), "the front to exit", timeout=10)


def test_a_front_holds_at_most_hot_cache_entries(workers: Responder, devpki: DevPki) -> None:
    # Four certificates asked many times each, on new connections: every front sees each
    # of them (the kernel spreads connections), answers from its hot cache once it got
    # them, and holds no more than hot_cache_entries (the main process holds all four).
    leaves = [issue_leaf(devpki, f"hot-{n}") for n in range(3)] + [devpki.good_pem]
    ders = [_request(leaf, devpki.ca_pem) for leaf in leaves]
    for der in ders:
        wait_until(lambda der=der: _statuses(workers, der) == {ocsp.OCSPCertStatus.GOOD},
                   "the new leaves to be known")  # fmt: skip

    def held() -> dict[str, float]:
        return _front_answers(workers, "hsmocsp_front_hot_cache_entries")

    wait_until(lambda: len(held()) == 2 and all(n == HOT for n in held().values()),
               "both fronts to hold a full hot cache")  # fmt: skip
    answered = _front_answers(workers)
    for der in ders:  # more asks: still bounded, still answered (and verified by openssl above)
        assert _statuses(workers, der) == {ocsp.OCSPCertStatus.GOOD}
    # A front reports what it holds with its answer counts (once a second, when it changed):
    # once both have reported answers since, their held counts are as of after the asks.
    wait_until(lambda: all(_front_answers(workers)[n] > answered[n] for n in answered),
               "both fronts to report again")  # fmt: skip
    assert all(n == HOT for n in held().values()), held()
