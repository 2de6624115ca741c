"""/readyz and /readyz/<handle> over fake handles; the lifecycle metrics; ExpiryWatch."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from hsmocsp.handle import Handle
from hsmocsp.health import Health, State
from hsmocsp.lifecycle import ExpiryWatch
from hsmocsp.web.app import OCSPApp
from tests.unit.test_cert_lifecycle import NOW, _crl, clock_at, make, responder_cert
from tests.unit.test_web import fetch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DAY = 86400


def two_handles(clock: Clock) -> tuple[OCSPApp, StubTreq, Handle, Handle]:
    a, _, _ = make(clock, responder_cert(NOW + 600))
    b, _, _ = make(clock, responder_cert(NOW + 40 * DAY))
    a.name, b.name = "a", "b"
    b.path = "/b/ocsp"
    app = OCSPApp([a, b], now=clock.seconds)
    return app, StubTreq(app.resource()), a, b


def body_of(client: StubTreq, url: str) -> tuple[int, dict[str, object]]:
    code, _, body = fetch(client, "GET", url)
    return code, json.loads(body)


def test_readyz_is_503_only_while_starting_or_when_every_handle_failed() -> None:
    clock = clock_at()
    app, client, _a, _b = two_handles(clock)
    assert body_of(client, "/readyz") == (
        200,
        {
            "ready": True,
            "state": "ready",
            "handles": {
                "a": {"state": "ready", "reason": ""},
                "b": {"state": "ready", "reason": ""},
            },
        },
    )
    # Starting (e.g. HTTP fronts not listening yet): 503 with the reason.
    waiting: list[str | None] = ["HTTP front(s) 2 not listening yet"]
    app.probes.waiting.append(lambda: waiting[0])
    code, body = body_of(client, "/readyz")
    assert code == 503 and body["state"] == "starting" and "front(s) 2" in str(body["reason"])
    assert body_of(client, "/readyz/a")[0] == 503
    waiting[0] = None
    # One handle's certificate expires: that handle is failed, the service still ready.
    clock.advance(600)
    code, body = body_of(client, "/readyz")
    assert code == 200 and body["state"] == "degraded"  # some handle is not ready
    handles = body["handles"]
    assert isinstance(handles, dict)
    assert handles["a"]["state"] == "failed" and "expired" in handles["a"]["reason"]
    assert handles["b"] == {"state": "ready", "reason": ""}
    assert code == 200
    assert body_of(client, "/readyz/a")[0] == 503
    assert body_of(client, "/readyz/b") == (
        200, {"handle": "b", "state": "ready", "reason": "", "ready": True}
    )
    assert fetch(client, "GET", "/readyz/nope")[0] == 404
    # Every handle failed: 503.
    clock.advance(40 * DAY)
    code, body = body_of(client, "/readyz")
    assert code == 503 and body["state"] == "failed" and body["ready"] is False


def test_degraded_handle_keeps_readyz_200_and_reports_parts() -> None:
    clock = clock_at()
    app, client, a, _ = two_handles(clock)
    a.source.health = lambda: Health(State.DEGRADED, "Vault unreachable")  # type: ignore[attr-defined]
    app.probes.parts["fronts"] = lambda: Health(State.DEGRADED, "HTTP front(s) 1 not listening")
    code, body = body_of(client, "/readyz")
    assert code == 200 and body["state"] == "degraded"
    assert body["handles"]["a"] == {"state": "degraded", "reason": "source: Vault unreachable"}  # type: ignore[index]
    assert body["fronts"] == {"state": "degraded", "reason": "HTTP front(s) 1 not listening"}
    assert body_of(client, "/readyz/a")[0] == 503


def metric(body: bytes, line_start: str) -> float:
    for line in body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in metrics")


def test_lifecycle_metrics() -> None:
    clock = clock_at()
    _app, client, a, _b = two_handles(clock)
    crl = _crl(datetime.fromtimestamp(NOW + 3600, UTC))
    a.source.crl_der = lambda issuer: crl  # type: ignore[method-assign]
    body = fetch(client, "GET", "/metrics")[2]
    assert metric(body, 'hsmocsp_responder_cert_expiry_timestamp_seconds{handle="a"}') == NOW + 600
    assert metric(body, 'hsmocsp_crl_next_update_timestamp_seconds{handle="a"}') == NOW + 3600
    assert b'hsmocsp_crl_next_update_timestamp_seconds{handle="b"} NaN' in body
    assert metric(body, 'hsmocsp_handle_state{handle="a",state="ready"}') == 1
    assert metric(body, 'hsmocsp_handle_state{handle="a",state="failed"}') == 0
    clock.advance(3601)
    body = fetch(client, "GET", "/metrics")[2]
    assert metric(body, 'hsmocsp_handle_state{handle="a",state="failed"}') == 1
    assert metric(body, 'hsmocsp_handle_state{handle="a",state="ready"}') == 0
    assert metric(body, 'hsmocsp_handle_state{handle="b",state="ready"}') == 1


def collect_logs() -> tuple[list[str], object]:
    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        text = formatEvent(event)
        if text:
            lines.append(text)

    globalLogPublisher.addObserver(observer)
    return lines, observer


def test_expiry_warnings_once_per_lead_time_and_state_changes_once() -> None:
    clock = clock_at()
    handle, _, _ = make(clock, responder_cert(NOW + 40 * DAY))
    crl = _crl(datetime.fromtimestamp(NOW + 20 * DAY, UTC))
    handle.source.crl_der = lambda issuer: crl  # type: ignore[method-assign]
    watch = ExpiryWatch([handle], clock, warn_days=(30, 7, 1), interval=3600)
    lines, observer = collect_logs()
    try:
        watch.start()
        assert watch.warnings == 0
        for _ in range(24 * 39 + 23):  # hour by hour up to one hour before notAfter
            clock.advance(3600)
        expiring = [line for line in lines if "expires in" in line]
        assert len(expiring) == 3, expiring
        assert ["warning at 30 days" in expiring[0], "warning at 7 days" in expiring[1],
                "warning at 1 days" in expiring[2]] == [True, True, True]  # fmt: skip
        crl_lines = [line for line in lines if "past its nextUpdate" in line]
        assert len(crl_lines) == 2  # the warning, and the state change ready -> degraded
        changes = [line for line in lines if "handle t: " in line and " -> " in line]
        assert changes == [
            "handle t: ready -> degraded (CRL past its nextUpdate "
            f"({datetime.fromtimestamp(NOW + 20 * DAY, UTC):%Y-%m-%d %H:%M:%S} UTC))"
        ]
        clock.advance(3600)  # the certificate has expired: failed, logged once
        clock.advance(3600)
        changes = [line for line in lines if "handle t: " in line and " -> " in line]
        assert len(changes) == 2 and "degraded -> failed" in changes[1]
        assert "responder certificate expired" in changes[1]
    finally:
        watch.stop()
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


def test_a_renewed_certificate_is_warned_about_afresh() -> None:
    clock = clock_at()
    handle, _, _ = make(clock, responder_cert(NOW + 5 * DAY))
    watch = ExpiryWatch([handle], clock, warn_days=(30, 7, 1), interval=60)
    watch.check()
    assert watch.warnings == 1  # at start: only the nearest lead time crossed (7 days)
    watch.check()
    assert watch.warnings == 1
    handle.replace_responder_cert(responder_cert(NOW + 20 * DAY))
    watch.check()
    assert watch.warnings == 2
    handle.replace_responder_cert(responder_cert(NOW + 400 * DAY))
    watch.check()
    assert watch.warnings == 2
