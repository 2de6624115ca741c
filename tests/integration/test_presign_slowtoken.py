"""The real responder on a smart-card-like token (bench/slowtoken.c, 50 ms per signature).

The handle is set up so that the token cannot keep up: ~30 responses, each to be
re-signed 0.3 s after it was signed (validity 60 s, refresh at 0.005), need ~100
signatures/s; one at a time at 50 ms gives under 20. What must hold then:

* the responder logs one capacity line saying it does not fit, and which
  validity would;
* the token's time goes oldest first (each pass repeats the order of the first),
  and responses clients asked for jump ahead of the others;
* what is served still verifies with ``openssl ocsp`` and is never expired.

The token module's trace (``SLOWTOKEN_TRACE_DATA``) tells which tbsResponseData it
signed, in which order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from pyasn1.codec.der import decoder
from pyasn1_modules import rfc6960

from bench import slowtoken
from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env
from tests.integration.harness import Responder, http, openssl_ocsp
from tests.integration.softhsm_helpers import softhsm_available
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not softhsm_available(), reason="softhsm2/pkcs11-tool not installed"),
]

EXTRA = 24  # serials added to the dev index (it has a few of its own)
BASE = 0x5100


def signed_serials(trace: Path) -> list[int]:
    serials = []
    for tbs in slowtoken.signed_data(trace):
        data, _ = decoder.decode(tbs, asn1Spec=rfc6960.ResponseData())
        serials.append(int(data["responses"][0]["certID"]["serialNumber"]))
    return serials


def request_for(dev: DevPki, serial: int) -> bytes:
    ca = x509.load_pem_x509_certificate(dev.ca_pem.read_bytes())
    probe = ocsp.OCSPRequestBuilder().add_certificate(ca, ca, hashes.SHA1()).build()
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        probe.issuer_name_hash, probe.issuer_key_hash, serial, hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)




def test_slow_token_capacity_line_and_requested_then_oldest_first(
    devpki: DevPki, tmp_path: Path
) -> None:
    index = tmp_path / "index.txt"
    rows = [line + "\n" for line in devpki.index.read_text().splitlines() if line.strip()]
    rows += [
        f"V\t301231235959Z\t\t{BASE + i:X}\tunknown\t/CN=host{i}.example\n" for i in range(EXTRA)
    ]
    index.write_text("".join(rows))
    cfg = tmp_path / "hsmocsp.yaml"
    cfg.write_text(f"""
presign_rate: 1000
tokens:
  card:
    module: {slowtoken.build()}
    token_label: {devpki.token_label}
    pin_file: {devpki.pin_file}
    workers: 1
handles:
  root:
    path: /ocsp
    issuer: {devpki.ca_pem}
    responder_cert: {devpki.ocsp_pem}
    signer: {{token: card, key_label: {devpki.ocsp_key_label}}}
    source: {{kind: openssl, index: {index}, crl: {devpki.crl_der}, poll_interval: 5}}
    validity: 60
    refresh_fraction: 0.005
""")
    trace = tmp_path / "trace"
    env = dict(
        dev_env(devpki),
        **slowtoken.env(
            sign_ms=50,
            login_ms=50,
            lock=tmp_path / "lock",
            trace=trace,
            trace_data=True,
            module=devpki.module,
        ),
    )
    r = Responder(config=cfg, env=env, workdir=tmp_path).start()
    try:
        wait_until(lambda: "capacity of handle root" in r.output(), "the capacity line", timeout=60)
        (line,) = [x for x in r.output().splitlines() if "capacity of handle root" in x]
        total = len(rows)
        assert f"{total} responses re-signed every 0.3 s" in line, line
        assert "does not fit" in line and re.search(r"a validity of \d+ s would", line), line
        measured = float(re.search(r"the token delivers ([\d.]+) sig/s", line).group(1))  # type: ignore[union-attr]
        assert 1 < measured <= 20  # 50 ms a signature, one at a time: at most 20/s

        # The first pass (every serial unsigned: index order), then the token is behind
        # for good: every pass repeats the order of the one before (oldest first).
        wait_until(lambda: len(signed_serials(trace)) >= 2 * total + 2, "two passes", timeout=60)
        first = signed_serials(trace)[:total]
        assert len(set(first)) == total
        second = signed_serials(trace)[total : 2 * total]
        assert second == first

        # Clients ask for three serials, one after the other, each half a pass ahead of
        # where the token is (overdue: past their refresh point, ~15 signatures before
        # their turn). An asked one is signed next, after at most the pre-signature in
        # flight and the ones asked before it, ahead of every response nobody asked for.
        # Where "next" starts is where the ask reached the responder: between the trace
        # read before the request and the one after its answer (on a loaded box a request
        # can take as long as several signatures; a fixed starting point raced it).
        before = len(signed_serials(trace))
        asked: list[int] = []
        windows: list[tuple[int, int]] = []
        for i in range(3):
            sent_at = len(signed_serials(trace))
            ahead = (sent_at + total // 2) % total
            serial = next(s for s in first[ahead:] + first[:ahead] if s not in asked)
            status, _, body = http(
                r.url + "/ocsp", request_for(devpki, serial),
                {"Content-Type": "application/ocsp-request"},
            )  # fmt: skip
            assert status == 200 and ocsp.load_der_ocsp_response(body).response_status.value == 0
            asked.append(serial)
            windows.append((sent_at, len(signed_serials(trace)) + 2 + i))
        out = openssl_ocsp(
            "-url", r.url + "/ocsp", "-issuer", str(devpki.ca_pem), "-serial", hex(asked[0]),
            "-VAfile", str(devpki.ocsp_pem), "-CAfile", str(devpki.ca_pem),
        )  # fmt: skip
        assert out.verified and re.search(r": (good|revoked)\n", out.output), out.output
        wait_until(
            lambda: len(signed_serials(trace)) >= windows[-1][1] + 12, "the next signatures",
            timeout=60,
        )  # fmt: skip
        signed = signed_serials(trace)
        for serial, (sent_at, latest) in zip(asked, windows, strict=True):
            at = signed.index(serial, sent_at)
            assert at <= latest, (serial, sent_at, at, latest, signed[sent_at : latest + 8])
        after = signed[before:]
        rest = [s for s in after if s not in asked]
        order = [s for s in first if s not in asked]
        start = order.index(rest[0])
        cycle = order[start:] + order[:start]  # the others: oldest first, pass after pass
        assert rest == (cycle * (len(rest) // len(cycle) + 1))[: len(rest)]

        health = [x for x in r.output().splitlines() if "pre-signing root" in x]
        assert any("responses to sign" in x for x in health), r.output()
    finally:
        r.stop()
    assert "Traceback" not in r.output()
