"""A flood of random serials against a real twistd (#9 item 7): memory and disk stay flat.

``make reliability`` only (a minute of signing). The bound tested: with
``max_unknown_cached: 1000``, once the LRU is full, neither the main process nor
the HTTP front grows by more than a few MB however many more random serials come,
and the SQLite file does not grow at all. (Before: every unknown answer was cached
and stored; a 10-minute soak grew the main process 70 -> 550 MB and SQLite to 365 MB.)
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from hsmocsp.devpki.opensslca import DevPki
from hsmocsp.ocsp.response import issuer_hashes
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder

pytestmark = pytest.mark.reliability

FLOOD_SECONDS = float(os.environ.get("HSMOCSP_FLOOD_SECONDS", "60"))
BOUND = 1000


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [
        int(line.split()[0]) for line in out.splitlines() if "hsmocsp.web.front_process" in line
    ]


def _size(data: Path) -> int:
    return sum(p.stat().st_size for p in data.glob("responses.sqlite*"))


def test_random_serial_flood_keeps_memory_and_disk_flat(devpki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(devpki, tmp_path)
    text = cfg.read_text().replace("    validity: 3600\n", f"    validity: 3600\n"
                                   f"    max_unknown_cached: {BOUND}\n")  # fmt: skip
    cfg.write_text("presign_rate: 0\n" + text)
    r = Responder(config=cfg, env=dev_env(devpki), workdir=tmp_path, extra_args=("--workers", "2"))
    r.start()
    try:
        assert r.proc is not None
        main = r.proc.pid
        fronts = _children(main)
        ca = x509.load_pem_x509_certificate(devpki.ca_pem.read_bytes())
        name_hash, key_hash = issuer_hashes(ca, "sha1")
        rng = random.Random(7)
        conns = [HTTPConnection("127.0.0.1", r.port, timeout=30) for _ in range(8)]

        def ask(serial: int) -> None:
            # Several connections: SO_REUSEPORT spreads them over the main process and
            # the front (which relays what it cannot answer).
            conn = conns[serial % len(conns)]
            der = (
                ocsp.OCSPRequestBuilder()
                .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
                .build()
                .public_bytes(Encoding.DER)
            )
            conn.request("POST", "/ocsp", der, {"Content-Type": "application/ocsp-request"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200
            assert ocsp.load_der_ocsp_response(body).certificate_status is (
                ocsp.OCSPCertStatus.UNKNOWN
            )

        for _ in range(3 * BOUND):  # fill the LRU and let allocations settle
            ask(rng.getrandbits(120))
        base_main, base_fronts = _rss_kb(main), [_rss_kb(p) for p in fronts]
        base_disk = _size(tmp_path / "data")
        asked = 0
        end = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < end:
            ask(rng.getrandbits(120))
            asked += 1
        grown_main = _rss_kb(main) - base_main
        grown_fronts = [_rss_kb(p) - b for p, b in zip(fronts, base_fronts, strict=True)]
        grown_disk = _size(tmp_path / "data") - base_disk
        print(f"flood: {asked} random serials in {FLOOD_SECONDS:g} s after {3 * BOUND} warm-up;"
              f" main RSS {base_main} kB +{grown_main} kB, fronts {base_fronts} kB"
              f" +{grown_fronts} kB, SQLite +{grown_disk} bytes")  # fmt: skip
        assert asked > 2 * BOUND, "too few requests to show anything"
        # Unbounded, each answer kept costs ~2 KB: `asked` of them would be 10+ MB.
        assert grown_main < 8 * 1024
        assert all(g < 8 * 1024 for g in grown_fronts)
        assert grown_disk == 0
    finally:
        r.stop()
