"""data_dir on a real filesystem that fills up, under a real twistd (#9 item 6).

A 1 MB tmpfs is mounted for the store (root only: skipped where mounting is not
allowed; tests/unit/test_store.py makes SQLite itself full with ``max_page_count``
and always runs). Responses signed while the disk is full must be written once
space is back, the failure must be counted and logged once, and nothing may end
the write loop.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, http, wait_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (tests/unit/test_store.py covers SQLITE_FULL)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = bytes(4096)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as err:
                assert err.errno == 28, err  # ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


def _rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count: int = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
        return count


def _metric(r: Responder, name: str) -> float:
    for line in http(r.url + "/metrics")[2].decode().splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _ask(
    r: Responder, path: str, cert: Path, issuer: Path, algorithm: hashes.HashAlgorithm
) -> None:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    ca = x509.load_pem_x509_certificate(issuer.read_bytes())
    der = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, algorithm).build()
    status, _, body = http(
        r.url + path,
        der.public_bytes(serialization.Encoding.DER),
        {"Content-Type": "application/ocsp-request"},
    )
    assert status == 200
    assert ocsp.load_der_ocsp_response(body).response_status is ocsp.OCSPResponseStatus.SUCCESSFUL


def test_full_disk_then_space_back(devpki: DevPki, tmp_path: Path, small_disk: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = level1_config(devpki, work)
    data = small_disk / "data"
    cfg.write_text("presign_rate: 0\n" + cfg.read_text().replace(str(work / "data"), str(data)))
    db = data / "responses.sqlite"
    r = Responder(config=cfg, env=dev_env(devpki), workdir=work).start()
    try:
        _ask(r, "/ocsp", devpki.good_pem, devpki.ca_pem, hashes.SHA1())
        wait_until(lambda: _rows(db) == 1, "the first row")
        filler = _fill(small_disk)
        asked = 0
        for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
            for path in ("/ocsp", "/ec/ocsp"):
                for cert in (devpki.good_pem, devpki.revoked_pem):
                    _ask(r, path, cert, devpki.ca_pem, algorithm)
                    asked += 1
        errors = 'hsmocsp_store_write_errors_total{store="sqlite"}'
        wait_until(lambda: _metric(r, errors) >= 2, "failed writes")
        assert _metric(r, 'hsmocsp_store_pending_rows{store="sqlite"}') == asked
        assert _metric(r, 'hsmocsp_store_ready{store="sqlite"}') == 0
        # Every handle is degraded (answers still flow: /readyz stays 200) with the reason.
        code, _, body = http(r.url + "/readyz")
        states = json.loads(body)["handles"]
        assert code == 200 and {s["state"] for s in states.values()} == {"degraded"}, states
        assert all("store: cannot write" in s["reason"] for s in states.values()), states
        assert _rows(db) == 1
        assert r.alive()
        filler.unlink()
        wait_until(
            lambda: _rows(db) == 1 + asked, "the rows signed while the disk was full", timeout=60
        )
        assert _metric(r, 'hsmocsp_store_pending_rows{store="sqlite"}') == 0
        assert _metric(r, 'hsmocsp_store_ready{store="sqlite"}') == 1
        wait_until(lambda: json.loads(http(r.url + "/readyz")[2])["state"] == "ready", "ready")
    finally:
        r.stop()
    out = r.output()
    # The store says it once; each handle's state-change line repeats the reason once.
    own = [line for line in out.splitlines() if "cannot write" in line and "handle " not in line]
    assert len(own) == 1, out
    assert out.count("writing again") == 1, out
    assert "Unhandled error" not in out and "Traceback" not in out, out
