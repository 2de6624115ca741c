"""End to end: twistd hsmocsp + SoftHSM keys + OpenSSL CA files + the real `openssl ocsp`."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.x509.oid import OCSPExtensionOID

from hsmocsp.devpki.opensslca import DevPki, issue_leaf, regen_crl, revoke
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, http, openssl_ocsp, wait_until


def _check(
    r: Responder, dev: DevPki, *args: str, path: str = "/ocsp", responder_cert: Path | None = None
) -> str:
    """Run `openssl ocsp` against the responder, verifying with -VAfile and -CAfile."""
    result = openssl_ocsp(
        "-url", r.url + path, "-issuer", str(dev.ca_pem), *args,
        "-VAfile", str(responder_cert or dev.ocsp_pem), "-CAfile", str(dev.ca_pem),
    )  # fmt: skip
    assert result.verified, result.output
    return result.output


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


@pytest.mark.parametrize("path,signer", [("/ocsp", "rsa"), ("/ec/ocsp", "ec")])
def test_good_revoked_unknown_by_post(
    responder: Responder, devpki: DevPki, path: str, signer: str
) -> None:
    rcert = devpki.ocsp_pem if signer == "rsa" else devpki.ocsp_ec_pem
    out = _check(responder, devpki, "-cert", str(devpki.good_pem), path=path, responder_cert=rcert)
    assert f"{devpki.good_pem}: good" in out
    out = _check(
        responder, devpki, "-cert", str(devpki.revoked_pem), path=path, responder_cert=rcert
    )
    assert f"{devpki.revoked_pem}: revoked" in out
    assert "Reason: keyCompromise" in out
    out = _check(responder, devpki, "-serial", "0x7E57AB1E", path=path, responder_cert=rcert)
    assert "0x7E57AB1E: unknown" in out


def test_delegated_chain_verifies_with_cafile_only(responder: Responder, devpki: DevPki) -> None:
    """No -VAfile: openssl must accept the responder cert through the CA and its EKU."""
    result = openssl_ocsp(
        "-url", responder.url + "/ocsp", "-issuer", str(devpki.ca_pem),
        "-cert", str(devpki.good_pem), "-CAfile", str(devpki.ca_pem),
    )  # fmt: skip
    assert result.verified, result.output
    assert f"{devpki.good_pem}: good" in result.output


def test_several_cert_ids_and_sha256(responder: Responder, devpki: DevPki) -> None:
    out = _check(
        responder, devpki, "-sha256", "-cert", str(devpki.good_pem),
        "-cert", str(devpki.revoked_pem), "-serial", "0x0BADC0DE",
    )  # fmt: skip
    assert f"{devpki.good_pem}: good" in out
    assert f"{devpki.revoked_pem}: revoked" in out
    assert "0x0BADC0DE: unknown" in out


def test_nonce_echoed_and_verified(responder: Responder, devpki: DevPki, tmp_path: Path) -> None:
    resp = tmp_path / "resp.der"
    out = _check(responder, devpki, "-cert", str(devpki.good_pem), "-respout", str(resp))
    assert "WARNING: no nonce" not in out
    assert "nonce" not in out.lower() or "verify error" not in out.lower()
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert any(ext.oid == OCSPExtensionOID.NONCE for ext in parsed.extensions)


@pytest.mark.parametrize("size", [1, 32, 33, 128, 129])
def test_rfc9654_nonce_lengths_live(
    responder: Responder, devpki: DevPki, tmp_path: Path, size: int
) -> None:
    """RFC 9654: a live responder echoes nonces of 1..128 octets (openssl checks the echo
    with -reqin/-respin), and answers malformedRequest above 128."""
    from cryptography.hazmat.primitives import hashes, serialization

    leaf = x509.load_pem_x509_certificate(devpki.good_pem.read_bytes())
    ca = x509.load_pem_x509_certificate(devpki.ca_pem.read_bytes())
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, ca, hashes.SHA1())
        .add_extension(x509.OCSPNonce(os.urandom(size)), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    status, _, body = http(responder.url + "/ocsp", data=request,
                           headers={"Content-Type": "application/ocsp-request"})  # fmt: skip
    assert status == 200
    parsed = ocsp.load_der_ocsp_response(body)
    if size > 128:
        assert parsed.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        return
    (tmp_path / "req.der").write_bytes(request)
    (tmp_path / "resp.der").write_bytes(body)
    result = openssl_ocsp(
        "-reqin", str(tmp_path / "req.der"), "-respin", str(tmp_path / "resp.der"),
        "-VAfile", str(devpki.ocsp_pem), "-CAfile", str(devpki.ca_pem),
    )  # fmt: skip
    assert result.verified, result.output
    assert "Nonce Verify error" not in result.output and "WARNING" not in result.output


def _get(
    r: Responder, dev: DevPki, req: Path, path: str, quote: str
) -> tuple[int, dict[str, str], bytes]:
    b64 = base64.b64encode(req.read_bytes()).decode()
    if quote == "escaped":
        tail = urllib.parse.quote(b64, safe="")
    elif quote == "raw":
        tail = b64
    elif quote == "unpadded-doubleslash":
        tail = "/" + b64.rstrip("=")
    else:
        raise AssertionError(quote)
    return http(f"{r.url}{path}/{tail}")


@pytest.mark.parametrize("quote", ["escaped", "raw", "unpadded-doubleslash"])
def test_get_verified_by_openssl(
    responder: Responder, devpki: DevPki, tmp_path: Path, quote: str
) -> None:
    req, resp = tmp_path / "req.der", tmp_path / "resp.der"
    # Find a serial whose base64 contains '/' or '+' so the escaping matters.
    made = openssl_ocsp(
        "-issuer", str(devpki.ca_pem), "-cert", str(devpki.revoked_pem), "-no_nonce",
        "-reqout", str(req),
    )  # fmt: skip
    assert made.returncode == 0, made.output
    status, headers, body = _get(responder, devpki, req, "/ocsp", quote)
    assert status == 200
    assert headers["Content-Type"] == "application/ocsp-response"
    assert "max-age=" in headers["Cache-Control"] and "public" in headers["Cache-Control"]
    assert headers["ETag"] and headers["Last-Modified"] and headers["Expires"]
    resp.write_bytes(body)
    result = openssl_ocsp(
        "-respin", str(resp), "-reqin", str(req), "-issuer", str(devpki.ca_pem),
        "-cert", str(devpki.revoked_pem), "-VAfile", str(devpki.ocsp_pem),
        "-CAfile", str(devpki.ca_pem),
    )  # fmt: skip
    assert result.verified, result.output
    assert "revoked" in result.output and "keyCompromise" in result.output
    # Same request again: same bytes from the cache, and If-None-Match gives 304.
    status2, headers2, body2 = _get(responder, devpki, req, "/ocsp", quote)
    assert (status2, body2) == (200, body)
    b64 = urllib.parse.quote(base64.b64encode(req.read_bytes()).decode(), safe="")
    status3, _, body3 = http(
        f"{responder.url}/ocsp/{b64}", headers={"If-None-Match": headers2["ETag"]}
    )
    assert (status3, body3) == (304, b"")


def _ocsp_status(body: bytes) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(body).response_status


def _post(
    r: Responder, body: bytes, ctype: str = "application/ocsp-request", path: str = "/ocsp"
) -> tuple[int, dict[str, str], bytes]:
    return http(r.url + path, data=body, headers={"Content-Type": ctype})


def test_bad_input(responder: Responder, devpki: DevPki, tmp_path: Path) -> None:
    req = tmp_path / "req.der"
    openssl_ocsp("-issuer", str(devpki.ca_pem), "-cert", str(devpki.good_pem), "-reqout", str(req))
    good_req = req.read_bytes()
    malformed = ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    for body in (b"", os.urandom(64), good_req[:-7], good_req + b"\x00"):
        status, headers, resp = _post(responder, body)
        assert status == 200
        assert _ocsp_status(resp) == malformed
        assert "no-cache" in headers["Cache-Control"]
    assert _post(responder, b"\x30" * 20_000)[0] == 413
    assert _post(responder, good_req, ctype="text/plain")[0] == 415
    assert http(responder.url + "/ocsp", data=good_req, method="PUT")[0] == 405
    status, _, resp = http(responder.url + "/ocsp/!!!not-base64!!!")
    assert status == 200 and _ocsp_status(resp) == malformed
    # A CA we do not serve: unauthorized.
    foreign = tmp_path / "foreign.der"
    made = openssl_ocsp("-issuer", str(devpki.good_pem), "-serial", "0x01", "-reqout", str(foreign))
    assert made.returncode == 0, made.output
    assert _ocsp_status(_post(responder, foreign.read_bytes())[2]) == (
        ocsp.OCSPResponseStatus.UNAUTHORIZED
    )
    # Unsupported CertID hash (MD5): malformedRequest, and the server still answers.
    md5 = tmp_path / "md5.der"
    openssl_ocsp("-md5", "-issuer", str(devpki.ca_pem), "-serial", "0x01", "-reqout", str(md5))
    assert _ocsp_status(_post(responder, md5.read_bytes())[2]) == malformed
    assert responder.alive()
    assert "good" in _check(responder, devpki, "-cert", str(devpki.good_pem))


def test_published_ca_and_crl(responder: Responder, devpki: DevPki) -> None:
    status, headers, body = http(responder.url + "/ca/root.der")
    assert status == 200 and headers["Content-Type"] == "application/pkix-cert"
    assert body == devpki.ca_der.read_bytes()
    status, headers, body = http(responder.url + "/crl/root.crl")
    assert status == 200 and headers["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(body)
    assert crl.get_revoked_certificate_by_serial_number(_serial(devpki.revoked_pem)) is not None
    assert http(responder.url + "/ca/")[0] == 404  # no directory listing


def test_probes(responder: Responder) -> None:
    assert http(responder.url + "/healthz")[0] == 200
    status, _, body = http(responder.url + "/readyz")
    assert status == 200 and b'"ready": true' in body
    status, _, body = http(responder.url + "/metrics")
    assert status == 200 and b"hsmocsp_responses_total" in body


def test_reload_sees_revocation_without_restart(
    devpki: DevPki, tmp_path: Path, responder: Responder
) -> None:
    leaf = issue_leaf(devpki, "reload-me")

    def answer(expect: str) -> str | None:
        out = _check(responder, devpki, "-cert", str(leaf), "-no_nonce")
        return out if f"{leaf}: {expect}" in out else None

    # Wait until the responder has loaded the new index (the leaf stops being unknown).
    wait_until(lambda: answer("good"), "the new leaf to be good", timeout=20)
    revoke(devpki, leaf, "superseded")
    regen_crl(devpki)
    out = wait_until(lambda: answer("revoked"), "the revocation", timeout=20)
    assert "Reason: superseded" in out


def test_sighup_makes_sources_look_now(devpki: DevPki, tmp_path: Path) -> None:
    """Polling once an hour: only SIGHUP (systemctl reload) can show the revocation."""
    r = Responder(config=level1_config(devpki, tmp_path, poll=3600), env=dev_env(devpki),
                  workdir=tmp_path).start()  # fmt: skip
    try:
        leaf = issue_leaf(devpki, "hup-me")
        assert f"{leaf}: unknown" in _check(r, devpki, "-cert", str(leaf), "-no_nonce")
        assert r.proc is not None

        def answer(expect: str) -> bool:
            return f"{leaf}: {expect}" in _check(r, devpki, "-cert", str(leaf), "-no_nonce")

        r.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: answer("good"), "SIGHUP to load the new leaf", timeout=20)
        revoke(devpki, leaf, "keyCompromise")
        r.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: answer("revoked"), "SIGHUP to load the revocation", timeout=20)
        assert r.alive() and "SIGHUP: every source looks for new data now" in r.output()
    finally:
        r.stop()


def test_config_error_names_key_and_exits(devpki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(devpki, tmp_path, extra="  broken:\n    path: /x\n")
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start(wait_ready=False)
    assert r.proc is not None
    code = r.proc.wait(60)
    assert code != 0
    assert "handles.broken.source" in r.output() and "is required" in r.output()
    assert "Traceback" not in r.output()


def test_wrong_pin_fails_start_without_leaking(devpki: DevPki, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("99887766\n")
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(devpki.pin_file), str(pin)))
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start(wait_ready=False)
    assert r.proc is not None
    code = r.proc.wait(60)
    assert code == 77, r.output()  # the unit's RestartPreventExitStatus=77: no second try
    assert "99887766" not in r.output()
    assert "cannot start" in r.output()


def _metric(r: Responder, name: str) -> float:
    _, _, body = http(r.url + "/metrics")
    for line in body.decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _stored_rows(data: Path) -> int:
    db = data / "responses.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count: int = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
        return count


def test_restart_serves_stored_responses_without_signing(devpki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text("presign_rate: 0\n" + cfg.read_text())
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start()
    try:
        assert "good" in _check(r, devpki, "-cert", str(devpki.good_pem), "-no_nonce")
        assert _metric(r, 'hsmocsp_signatures_total{handle="root"}') == 1
        wait_until(lambda: _stored_rows(tmp_path / "data") == 1, "the store's flush")
    finally:
        assert r.stop() in (0, -15)  # twistd re-raises SIGTERM after a clean shutdown
        assert "Main loop terminated" in r.output()
    r2 = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start()
    try:
        assert _metric(r2, 'hsmocsp_cache_entries{handle="root"}') == 1
        out = _check(r2, devpki, "-cert", str(devpki.good_pem), "-no_nonce")
        assert f"{devpki.good_pem}: good" in out
        assert _metric(r2, 'hsmocsp_signatures_total{handle="root"}') == 0
    finally:
        r2.stop()
