"""TokenPool's pipelining and binary frames against a real SoftHSM2 token.

A worker holds up to ``pipeline`` requests: the first runs, the others wait in
its pipe. These tests pin what that must not change: a dead worker fails only
the request it was running, cancelled and timed-out requests leave the stream in
order, and the waiting ones count as queued.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from twisted.internet import defer

from hsmocsp.errors import SignerError, SignerUnavailable
from hsmocsp.health import State
from hsmocsp.signing.pool import KeyRef, TokenPool

try:
    from tests.integration.softhsm_helpers import softhsm_available
except ImportError:  # tests/ not a package: rootdir-less "prepend" import mode
    from softhsm_helpers import (  # type: ignore[no-redef,import-not-found,unused-ignore]
        softhsm_available,
    )

from tests.integration.test_pkcs11_pool import expect, gone, started_pool
from tests.integration.test_pkcs11_pool import make_pool as _make_pool
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not softhsm_available(), reason="softhsm2/pkcs11-tool not installed"),
]

RSA = KeyRef(label="rsa")
EC = KeyRef(key_id=b"\x02")


def make_pool(**kwargs: Any) -> TokenPool:
    """One worker unless a test asks for more: pipelining is per worker."""
    return _make_pool(**{"workers": 1, **kwargs})


def verify_rsa(public: Any, signature: bytes, data: bytes) -> None:
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


@pytest_twisted.ensureDeferred
async def test_many_concurrent_signatures_each_match_their_data(token: Path) -> None:
    async with started_pool(make_pool(workers=2)) as pool:
        rsa_public = serialization.load_der_public_key(await pool.public_key(RSA))
        ec_public = serialization.load_der_public_key(await pool.public_key(EC))
        assert isinstance(ec_public, ec.EllipticCurvePublicKey)
        data = [os.urandom(50 + i) for i in range(60)]
        pending = [
            pool.sign(
                RSA if i % 2 else EC,
                "CKM_SHA256_RSA_PKCS" if i % 2 else "CKM_ECDSA",
                d if i % 2 else hashlib.sha256(d).digest(),
            )
            for i, d in enumerate(data)
        ]
        results = await defer.gatherResults(pending)
        for i, (d, signature) in enumerate(zip(data, results, strict=True)):
            if i % 2:
                verify_rsa(rsa_public, signature, d)
            else:
                assert len(signature) == 64  # raw r || s
        assert pool.busy() == 0 and pool.queue_depth() == 0


@pytest_twisted.ensureDeferred
async def test_dead_worker_retries_running_request_and_requeues_the_next(token: Path) -> None:
    async with started_pool(make_pool(pipeline=2)) as pool:
        public = serialization.load_der_public_key(await pool.public_key(RSA))
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        running = pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"first")
        waiting = pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"second")
        queued = pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"third")
        # One running, one in the worker's pipe, one in the pool's queue.
        assert pool.busy() == 1 and pool.queue_depth() == 2
        os.kill(pid, signal.SIGKILL)
        # All three on the replacement, in order: the running one once more (signing
        # is idempotent), the others as they were never started.
        verify_rsa(public, await running, b"first")
        verify_rsa(public, await waiting, b"second")
        verify_rsa(public, await queued, b"third")
        (new_pid,) = pool.worker_pids()
        assert new_pid != pid


@pytest_twisted.ensureDeferred
async def test_cancelled_pipelined_request_does_not_shift_replies(token: Path) -> None:
    async with started_pool(make_pool(pipeline=2)) as pool:
        public = serialization.load_der_public_key(await pool.public_key(RSA))
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        first = pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"first")
        second = pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"second")
        third = pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"third")
        assert pool.queue_depth() == 2
        second.cancel()
        await expect(second, defer.CancelledError)
        assert pool.queue_depth() == 1
        os.kill(pid, signal.SIGCONT)
        verify_rsa(public, await first, b"first")
        verify_rsa(public, await third, b"third")
        verify_rsa(public, await pool.sign(RSA, "CKM_SHA256_RSA_PKCS", b"4"), b"4")
        assert pool.worker_pids() == [pid]  # the dropped reply did not cost the worker


@pytest_twisted.ensureDeferred
async def test_hung_worker_times_out_running_and_waiting_requests(token: Path) -> None:
    async with started_pool(make_pool(pipeline=2, sign_timeout=1.0)) as pool:
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        running = pool.sign(EC, "CKM_ECDSA", b"\x01" * 32)
        waiting = pool.sign(EC, "CKM_ECDSA", b"\x02" * 32)
        queued = pool.sign(EC, "CKM_ECDSA", b"\x03" * 32)
        for d, where in ((running, "in the HSM"), (waiting, "waiting"), (queued, "waiting")):
            err = await expect(d, SignerUnavailable)
            assert "timed out" in str(err) and where in str(err)
        await wait_for(lambda: gone(pid), "hung worker killed")
        # The replacement may take longer than the 1 s timeout to start on a loaded box.
        await wait_for(lambda: pool.health().state is State.READY, "replacement up")
        assert len(await pool.sign(EC, "CKM_ECDSA", b"\x04" * 32)) == 64


@pytest_twisted.ensureDeferred
async def test_pipeline_of_one_queues_in_the_pool(token: Path) -> None:
    async with started_pool(make_pool(pipeline=1, max_queue=1)) as pool:
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        accepted = [pool.sign(EC, "CKM_ECDSA", b"\x01" * 32) for _ in range(2)]
        assert pool.busy() == 1 and pool.queue_depth() == 1
        err = await expect(pool.sign(EC, "CKM_ECDSA", b"\x01" * 32), SignerUnavailable)
        assert "queue full" in str(err)
        os.kill(pid, signal.SIGCONT)
        for d in accepted:
            await d


@pytest_twisted.ensureDeferred
async def test_mechanism_without_binary_code_is_refused_by_the_worker(token: Path) -> None:
    async with started_pool(make_pool()) as pool:
        err = await expect(pool.sign(RSA, "CKM_MD5_RSA_PKCS", b"x"), SignerError)
        assert "not allowed" in str(err)
        await pool.check()
