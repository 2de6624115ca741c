"""The Klein app over fakes, driven in memory with treq's StubTreq."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest
from cryptography.x509 import ocsp
from treq.testing import StubTreq
from twisted.internet.task import Clock

from hsmocsp.errors import SourceUnavailable
from hsmocsp.web.app import OCSPApp
from tests.unit.test_responder import make, request_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def app_and_client() -> tuple[OCSPApp, StubTreq, object, object]:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    handle.publish_ca = "/ca/t.der"
    handle.publish_crl = "/crl/t.crl"
    app = OCSPApp([handle], now=clock.seconds, max_request_size=4000)
    return app, StubTreq(app.resource()), source, signer


def fetch(
    client: StubTreq, method: str, url: str, **kw: object
) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    d = client.request(method, "http://responder" + url, **kw)
    out: list[object] = []
    d.addCallback(lambda r: client.content(r).addCallback(lambda b: out.append((r, b))))
    client.flush()
    assert out, "no response"
    resp, body = out[0]  # type: ignore[misc]
    return resp.code, dict(resp.headers.getAllRawHeaders()), body


def status_of(body: bytes) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(body).response_status


def test_post_and_get_variants_same_bytes() -> None:
    _, client, _, signer = app_and_client()
    req = request_for(1)
    code, headers, body = fetch(
        client, "POST", "/ocsp", data=req, headers={"Content-Type": "application/ocsp-request"}
    )
    assert code == 200 and headers[b"Content-Type"] == [b"application/ocsp-response"]
    assert b"max-age=" in headers[b"Cache-Control"][0]
    b64 = base64.b64encode(req).decode()
    for tail in (quote(b64, safe=""), b64, "/" + b64.rstrip("="), b64.replace("+", " ")):
        code, _, got = fetch(client, "GET", "/ocsp/" + tail)
        assert code == 200 and got == body, tail
    assert signer.calls == 1  # type: ignore[attr-defined]


def test_errors_map_to_statuses_and_http_codes() -> None:
    app, client, source, _ = app_and_client()
    ct = {"Content-Type": "application/ocsp-request"}
    assert status_of(fetch(client, "POST", "/ocsp", data=b"junk", headers=ct)[2]) == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    assert fetch(client, "POST", "/ocsp", data=b"\x30" * 5000, headers=ct)[0] == 413
    assert (
        fetch(client, "POST", "/ocsp", data=request_for(1), headers={"Content-Type": "x/y"})[0]
        == 415
    )
    assert fetch(client, "DELETE", "/ocsp")[0] == 405
    source.fail_with = SourceUnavailable("vault down")  # type: ignore[attr-defined]
    code, headers, body = fetch(client, "POST", "/ocsp", data=request_for(3), headers=ct)
    assert code == 200 and status_of(body) == ocsp.OCSPResponseStatus.TRY_LATER
    assert b"no-cache" in headers[b"Cache-Control"][0]
    app.problems.stop()  # its summary timer (on the real reactor) ends with the test


def test_probes_and_metrics() -> None:
    _, client, source, _ = app_and_client()
    assert fetch(client, "GET", "/healthz")[0] == 200
    assert fetch(client, "GET", "/readyz")[0] == 200
    source.is_ready = False  # type: ignore[attr-defined]
    # Degraded (answers from cache, tryLater for new serials) still takes traffic;
    # the strict per-handle probe says it is not ready.
    code, _, body = fetch(client, "GET", "/readyz")
    assert code == 200 and json.loads(body)["handles"]["t"]["state"] == "degraded"
    code, _, body = fetch(client, "GET", "/readyz/t")
    assert code == 503 and json.loads(body)["reason"].startswith("source: ")
    source.is_ready = True  # type: ignore[attr-defined]
    fetch(
        client,
        "POST",
        "/ocsp",
        data=request_for(1),
        headers={"Content-Type": "application/ocsp-request"},
    )
    code, _, body = fetch(client, "GET", "/metrics")
    assert code == 200
    assert b'hsmocsp_responses_total{handle="t",method="POST",status="successful"} 1.0' in body
    assert b'hsmocsp_cache_misses_total{handle="t"} 1.0' in body
    assert b"hsmocsp_sign_seconds" in body
    # Prometheus conventions: counters end in _total, no _created series, build info.
    assert b"# TYPE hsmocsp_cache_hits_total counter" in body
    assert b"# TYPE hsmocsp_signatures_total counter" in body
    assert b"_created" not in body
    assert b'hsmocsp_build_info{' in body and b"process_cpu_seconds_total" in body
    # The miss's latency, by handle and result.
    assert b'hsmocsp_request_duration_seconds_count{handle="t",result="signed"} 1.0' in body
    # The fake source last confirmed its data at t=1,750,000,000 - 42 (clock time now).
    source.checked_at = 1_750_000_000 - 42  # type: ignore[attr-defined]
    body = fetch(client, "GET", "/metrics")[2]
    assert b'hsmocsp_source_age_seconds{handle="t"} 42.0' in body
    source.checked_at = None  # type: ignore[attr-defined]
    body = fetch(client, "GET", "/metrics")[2]
    assert b'hsmocsp_source_age_seconds{handle="t"} NaN' in body


def test_published_ca() -> None:
    _, client, _, _ = app_and_client()
    code, headers, body = fetch(client, "GET", "/ca/t.der")
    assert code == 200 and headers[b"Content-Type"] == [b"application/pkix-cert"]
    assert body[:1] == b"\x30"
    assert fetch(client, "GET", "/crl/t.crl")[0] == 404  # the fake source has no CRL
