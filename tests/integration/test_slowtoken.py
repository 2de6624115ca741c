"""The smart-card-like PKCS#11 module (bench/slowtoken.c) in front of a real SoftHSM2 token.

What must hold for it to stand in for a Nitrokey HSM 2: it is a real module that
PyKCS11 loads through the signing pool like any vendor module; its signatures
verify; and no two calls ever run at the same time, across the workers'
processes, while each signature takes at least the configured latency.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer

from bench import slowtoken
from hsmocsp.signing.pkcs11 import Pkcs11Signer
from hsmocsp.signing.pool import KeyRef
from tests.factories import token_pool
from tests.integration.conftest import SOFTHSM_PIN
from tests.integration.softhsm_helpers import softhsm_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not softhsm_available(), reason="softhsm2/pkcs11-tool not installed"),
]

DATA = b"tbsResponseData stand-in" * 20


@pytest_twisted.ensureDeferred
async def test_slow_module_serialises_every_call_across_processes(
    token: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = slowtoken.build()
    trace = tmp_path / "trace"
    for name, value in slowtoken.env(
        sign_ms=20, login_ms=30, lock=tmp_path / "lock", trace=trace
    ).items():
        monkeypatch.setenv(name, value)  # the workers inherit the environment
    pool = token_pool(module=module, pin=SOFTHSM_PIN, workers=2)
    await pool.start()
    try:
        signer = Pkcs11Signer(pool, KeyRef(label="p256"))
        await signer.start()
        public = signer.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        signatures = await defer.gatherResults([signer.sign(DATA) for _ in range(12)])
        for signature in signatures:
            public.verify(signature, DATA, ec.ECDSA(signer.algorithm.digest))
        pids = set(pool.worker_pids())
    finally:
        await pool.stop()
    calls = sorted(slowtoken.read_trace(trace), key=lambda row: row[2])
    assert {pid for pid, *_ in calls} >= pids and len(pids) == 2  # both workers went through it
    signs = [row for row in calls if row[1] == slowtoken.C_SIGN and row[3] - row[2] >= 20e6]
    logins = [row for row in calls if row[1] == slowtoken.C_LOGIN]
    assert len(signs) == 12  # every signature (not the length queries) took >= 20 ms
    assert len(logins) == 2 and all(end - start >= 30e6 for _, _, start, end in logins)
    for before, after in itertools.pairwise(calls):
        assert before[3] <= after[2], f"calls overlap: {before} and {after}"


def test_build_is_cached_by_source_hash(tmp_path: Path) -> None:
    first = slowtoken.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert slowtoken.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert first.name.startswith("slowtoken-") and first.suffix == ".so"
