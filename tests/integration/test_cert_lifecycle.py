"""Responder-certificate lifecycle with real parts: ``openssl ca`` renews the delegated OCSP
signer certificate for the same SoftHSM key, a real ``twistd hsmocsp`` restarts or gets a
real SIGHUP, and ``openssl ocsp`` verifies what it answers afterwards.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hsmocsp.devpki.opensslca import DevPki, issue_ocsp_signer, regen_crl, self_sign_root
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, http, openssl_ocsp
from tests.waiting import wait_until


def _config(dev: DevPki, work: Path, cert: Path, presign: bool = False) -> Path:
    cfg = level1_config(dev, work)
    text = cfg.read_text().replace(f"responder_cert: {dev.ocsp_pem}", f"responder_cert: {cert}")
    cfg.write_text(("" if presign else "presign_rate: 0\n") + text)
    return cfg


def _request(dev: DevPki) -> bytes:
    leaf = x509.load_pem_x509_certificate(dev.good_pem.read_bytes())
    ca = x509.load_pem_x509_certificate(dev.ca_pem.read_bytes())
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, hashes.SHA1()).build()
    return req.public_bytes(serialization.Encoding.DER)


def _answer(r: Responder, dev: DevPki) -> ocsp.OCSPResponse:
    status, _, body = http(
        r.url + "/ocsp", _request(dev), {"Content-Type": "application/ocsp-request"}
    )
    assert status == 200
    return ocsp.load_der_ocsp_response(body)


def _embedded(r: Responder, dev: DevPki) -> x509.Certificate:
    resp = _answer(r, dev)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert len(resp.certificates) == 1
    return resp.certificates[0]


def _verify(r: Responder, dev: DevPki, cert: Path) -> str:
    result = openssl_ocsp(
        "-url", r.url + "/ocsp", "-issuer", str(dev.ca_pem), "-cert", str(dev.good_pem),
        "-no_nonce", "-VAfile", str(cert), "-CAfile", str(dev.ca_pem),
    )  # fmt: skip
    assert result.verified, result.output
    assert f"{dev.good_pem}: good" in result.output
    return result.output


def _stored_with(work: Path, cert_der: bytes) -> bool:
    """True once the store holds a response of handle root carrying ``cert_der``."""
    db = work / "data" / "responses.sqlite"
    if not db.exists():
        return False
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            rows = conn.execute("SELECT der FROM responses WHERE handle = 'root'").fetchall()
        except sqlite3.OperationalError:
            return False
    return any(cert_der in bytes(der) for (der,) in rows)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_restart_after_renewal_never_serves_the_expired_certificate(
    devpki: DevPki, tmp_path: Path
) -> None:
    """The issue's report: responses stored with the old certificate came back after a
    restart and were served with it, expired ("certificate has expired" in openssl)."""
    cert = tmp_path / "ocsp-signer.pem"
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(days=20)
    issue_ocsp_signer(devpki, devpki.ocsp_key_label, "lifecycle signer", cert, not_after=soon)
    cfg = _config(devpki, tmp_path, cert)
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start()
    assert r.proc is not None
    try:
        wait_until(lambda: "(warning at 30 days)" in r.output(), "the expiry warning")
        # A certificate about to expire (loaded by SIGHUP: no start-up to wait for).
        ends = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=8)
        issue_ocsp_signer(devpki, devpki.ocsp_key_label, "lifecycle signer", cert, not_after=ends)
        old = _load(cert)
        r.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: _embedded(r, devpki) == old, "a response with the short-lived certificate"
        )
        # nextUpdate is capped at the certificate's notAfter.
        next_update = _answer(r, devpki).next_update_utc
        assert next_update is not None and next_update <= old.not_valid_after_utc
        old_der = old.public_bytes(serialization.Encoding.DER)
        wait_until(lambda: _stored_with(tmp_path, old_der), "the response to be stored")
    finally:
        r.stop()
    # Renewal for the same HSM key while the responder is down; the old one then expires.
    issue_ocsp_signer(devpki, devpki.ocsp_key_label, "lifecycle signer", cert)
    new = _load(cert)
    assert new != old and new.public_key() == old.public_key()
    wait_until(
        lambda: datetime.now(UTC) > ends + timedelta(seconds=1), "the old certificate to expire"
    )
    r2 = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start()
    try:
        # The very first answer already carries the renewed certificate, and verifies.
        assert _embedded(r2, devpki) == new
        _verify(r2, devpki, cert)
    finally:
        r2.stop()


def test_sighup_renewal_resigns_and_a_bad_file_is_refused(devpki: DevPki, tmp_path: Path) -> None:
    cert = tmp_path / "ocsp-signer.pem"
    issue_ocsp_signer(devpki, devpki.ocsp_key_label, "lifecycle signer", cert)
    first = _load(cert)
    r = Responder(
        config=_config(devpki, tmp_path, cert, presign=True), env=dev_env(devpki),
        workdir=tmp_path,
    ).start()  # fmt: skip
    assert r.proc is not None
    try:
        _verify(r, devpki, cert)
        assert _embedded(r, devpki) == first
        issue_ocsp_signer(devpki, devpki.ocsp_key_label, "lifecycle signer", cert)
        second = _load(cert)
        r.proc.send_signal(signal.SIGHUP)
        # Re-signed with the renewed certificate ahead of everything else.
        wait_until(
            lambda: _embedded(r, devpki) == second, "a response with the renewed certificate"
        )
        _verify(r, devpki, cert)
        # A bad file (not a certificate) and a certificate for another key are refused:
        # the current one stays, and one line says why.
        good_pem = cert.read_bytes()
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
        r.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "not reloaded" in r.output(), "the refusal to be logged")
        assert _embedded(r, devpki) == second
        other = tmp_path / "other-key.pem"
        issue_ocsp_signer(devpki, devpki.ocsp_ec_key_label, "lifecycle other key", other)
        cert.write_bytes(other.read_bytes())
        r.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: "does not match the signer's public key" in r.output(),
            "the key mismatch to be logged",
        )
        assert _embedded(r, devpki) == second
        cert.write_bytes(good_pem)
        _verify(r, devpki, cert)
        assert r.alive()
    finally:
        r.stop()


def test_sighup_reloads_the_ca_certificate_and_crl_with_start_up_checks(
    devpki: DevPki, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(devpki.ca_pem.read_bytes())
    cfg = level1_config(devpki, tmp_path, poll=3600)  # only SIGHUP makes it look
    cfg.write_text(cfg.read_text().replace(f"issuer: {devpki.ca_pem}", f"issuer: {ca}"))
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start()
    assert r.proc is not None
    try:
        assert http(r.url + "/ca/root.der")[2] == devpki.ca_der.read_bytes()
        # A renewed CA certificate (same name, same HSM key) and a new CRL.
        self_sign_root(devpki, ca, days=4000)
        renewed = _load(ca)
        assert renewed != _load(devpki.ca_pem)
        regen_crl(devpki)
        r.proc.send_signal(signal.SIGHUP)
        der = renewed.public_bytes(serialization.Encoding.DER)
        wait_until(lambda: http(r.url + "/ca/root.der")[2] == der, "the renewed CA certificate")
        wait_until(
            lambda: http(r.url + "/crl/root.crl")[2] == devpki.crl_der.read_bytes(),
            "the new CRL",
        )
        # The responder certificate chains to the renewed CA certificate just as well.
        result = openssl_ocsp(
            "-url", r.url + "/ocsp", "-issuer", str(ca), "-cert", str(devpki.good_pem),
            "-no_nonce", "-VAfile", str(devpki.ocsp_pem), "-CAfile", str(ca),
        )  # fmt: skip
        assert result.verified and "good" in result.output, result.output
        # Another CA's certificate in the file is refused: the served one stays.
        ca.write_bytes(devpki.ocsp_pem.read_bytes())
        r.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "handles.root.issuer" in r.output(), "the refusal to be logged")
        assert "not a renewal of the served CA" in r.output()
        assert http(r.url + "/ca/root.der")[2] == der
        assert r.alive()
    finally:
        r.stop()


def _metric(r: Responder, name: str) -> float:
    for line in http(r.url + "/metrics")[2].decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_overdue_crl_degrades_the_handle_and_a_new_one_restores_it(
    devpki: DevPki, tmp_path: Path
) -> None:
    """Seen in the issue: an expired CRL went unnoticed (ready, no warning)."""
    pem, der = tmp_path / "crl.pem", tmp_path / "crl.der"
    regen_crl(devpki, pem=pem, der=der, valid_seconds=4)
    next_update = x509.load_der_x509_crl(der.read_bytes()).next_update_utc
    assert next_update is not None
    cfg = level1_config(devpki, tmp_path, poll=3600)
    cfg.write_text(cfg.read_text().replace(f"crl: {devpki.crl_der}", f"crl: {der}"))
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path).start()
    assert r.proc is not None
    try:
        assert _metric(r, 'hsmocsp_crl_next_update_timestamp_seconds{handle="root"}') == (
            next_update.timestamp()
        )
        assert _metric(r, 'hsmocsp_responder_cert_expiry_timestamp_seconds{handle="root"}') == (
            _load(devpki.ocsp_pem).not_valid_after_utc.timestamp()
        )
        wait_until(lambda: http(r.url + "/readyz/root")[0] == 503, "the CRL to be overdue")
        body = json.loads(http(r.url + "/readyz/root")[2])
        assert body["state"] == "degraded" and "CRL past its nextUpdate" in body["reason"]
        assert http(r.url + "/readyz")[0] == 200  # degraded still takes traffic
        assert _metric(r, 'hsmocsp_handle_state{handle="root",state="degraded"}') == 1
        wait_until(lambda: "the CRL is past its nextUpdate" in r.output(), "the warning")
        _verify(r, devpki, devpki.ocsp_pem)  # answers go on, from the index
        # A new CRL, and SIGHUP (the poll is an hour): ready again, said once.
        regen_crl(devpki, pem=pem, der=der)
        r.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: http(r.url + "/readyz/root")[0] == 200, "the new CRL")
        wait_until(lambda: "handle root: degraded -> ready" in r.output(), "the state change line")
        out = r.output()
        assert out.count("handle root: the CRL is past its nextUpdate") == 1
        assert out.count("handle root: ready -> degraded") <= 1  # (overdue before its start?)
        assert out.count("handle root: degraded -> ready") == 1
    finally:
        r.stop()
