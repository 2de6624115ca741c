"""TokenPool and Pkcs11Signer against a real SoftHSM2 token in a temp dir."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from twisted.internet import defer

from hsmocsp.errors import SignerError, SignerUnavailable
from hsmocsp.health import State
from hsmocsp.signing.algorithms import (
    ECDSA_WITH_SHA256_DER,
    ECDSA_WITH_SHA384_DER,
    SHA256_WITH_RSA_DER,
)
from hsmocsp.signing.pkcs11 import Pkcs11Signer
from hsmocsp.signing.pool import KeyRef, TokenPool
from tests.factories import token_pool
from tests.integration.conftest import SOFTHSM_PIN
from tests.waiting import wait_for

try:
    from tests.integration.softhsm_helpers import (
        SOFTHSM_MODULE,
        softhsm_available,
    )
except ImportError:  # tests/ not a package: rootdir-less "prepend" import mode
    from softhsm_helpers import (  # type: ignore[no-redef,import-not-found,unused-ignore]
        SOFTHSM_MODULE,
        softhsm_available,
    )

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not softhsm_available(), reason="softhsm2/pkcs11-tool not installed"),
]

PIN = SOFTHSM_PIN  # the conftest token fixture's
DATA = b"tbsResponseData stand-in \x00\x01\x02" * 20


def make_pool(**kwargs: Any) -> TokenPool:
    """A pool on the conftest token ``T``; ``kwargs``: token config fields, ``pin``..."""
    pool: TokenPool = token_pool(**kwargs)
    return pool


@contextlib.asynccontextmanager
async def started_pool(pool: TokenPool) -> AsyncIterator[TokenPool]:
    """``pool`` started, and stopped however the test ends."""
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def expect(d: defer.Deferred[Any], exc_type: type[Exception]) -> Exception:
    try:
        await d
    except exc_type as err:
        return err
    raise AssertionError(f"expected {exc_type.__name__}")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("key", "alg_der", "curve"),
    [
        (KeyRef(label="rsa"), SHA256_WITH_RSA_DER, None),
        (KeyRef(key_id=b"\x02"), ECDSA_WITH_SHA256_DER, ec.SECP256R1),
        (KeyRef(label="p384", key_id=b"\x03"), ECDSA_WITH_SHA384_DER, ec.SECP384R1),
    ],
)
async def test_signatures_verify_against_token_public_key(
    token: Path, key: KeyRef, alg_der: bytes, curve: type[ec.EllipticCurve] | None
) -> None:
    async with started_pool(make_pool()) as pool:
        signer = Pkcs11Signer(pool, key)
        await signer.start()
        assert signer.signature_algorithm_der == alg_der
        spki = await pool.public_key(key)
        public = serialization.load_der_public_key(spki)
        assert public == signer.public_key()
        for _ in range(4):  # both workers, cached handles
            signature = await signer.sign(DATA)
            if curve is None:
                assert isinstance(public, rsa.RSAPublicKey)
                public.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())
            else:
                assert isinstance(public, ec.EllipticCurvePublicKey)
                assert isinstance(public.curve, curve)
                public.verify(signature, DATA, ec.ECDSA(signer.algorithm.digest))
        await pool.check()


@pytest_twisted.ensureDeferred
async def test_key_by_label_and_by_id_are_the_same(token: Path) -> None:
    async with started_pool(make_pool(workers=1)) as pool:
        by_label = await pool.public_key(KeyRef(label="p256"))
        by_id = await pool.public_key(KeyRef(key_id=b"\x02"))
        assert by_label == by_id
        err = await expect(pool.public_key(KeyRef(label="nope")), SignerError)
        assert "nope" in str(err)
        # A bad request does not cost the worker.
        await pool.check()


@pytest_twisted.ensureDeferred
async def test_pin_not_in_worker_cmdline_or_environment(
    token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_TOKEN_PIN", PIN)
    async with started_pool(make_pool(workers=1, pin_env="TEST_TOKEN_PIN")) as pool:
        (pid,) = pool.worker_pids()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except PermissionError:
            # Not root: a non-dumpable worker's /proc files belong to root, so nobody
            # else can read its environment either (see test_core_dumps).
            return
        assert PIN.encode() not in cmdline
        assert not [v for v in environ if v.startswith(b"TEST_TOKEN_PIN=")]
        assert f"SOFTHSM2_CONF={token}".encode() in environ


@pytest_twisted.ensureDeferred
async def test_wrong_pin_is_signer_error_without_pin(token: Path) -> None:
    pool = make_pool(pin="98765432")
    err = await expect(pool.start(), SignerError)
    assert "98765432" not in str(err)
    assert "wrong PIN" in str(err)
    assert "'T'" in str(err) and SOFTHSM_MODULE in str(err)
    assert pool.worker_pids() == []
    assert "98765432" not in repr(pool)


@pytest_twisted.ensureDeferred
async def test_missing_token_and_module(token: Path, tmp_path: Path) -> None:
    err = await expect(make_pool(token_label="absent").start(), SignerError)
    assert "'absent'" in str(err) and "'T'" in str(err)
    missing = str(tmp_path / "libnothing.so")
    err = await expect(make_pool(module=Path(missing)).start(), SignerError)
    assert missing in str(err)
    not_a_module = tmp_path / "garbage.so"
    not_a_module.write_bytes(b"not an ELF file")
    err = await expect(make_pool(module=not_a_module).start(), SignerError)
    assert str(not_a_module) in str(err)
    assert PIN not in str(err)


@pytest_twisted.ensureDeferred
async def test_killed_worker_in_flight_is_signed_by_the_replacement(token: Path) -> None:
    async with started_pool(make_pool(workers=1)) as pool:
        signer = Pkcs11Signer(pool, KeyRef(label="rsa"))
        await signer.start()
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # freeze it so the next request is surely in flight
        in_flight = signer.sign(DATA)
        await wait_for(lambda: pool.busy() == 1, "request in flight")
        os.kill(pid, signal.SIGKILL)
        # Retried once, on the replacement that is already starting.
        await in_flight
        await signer.sign(DATA)
        (new_pid,) = pool.worker_pids()
        assert new_pid != pid


@pytest_twisted.ensureDeferred
async def test_worker_killed_between_signs(token: Path) -> None:
    async with started_pool(make_pool(workers=2)) as pool:
        signer = Pkcs11Signer(pool, KeyRef(key_id=b"\x02"))
        await signer.start()
        old = set(pool.worker_pids())
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: old.isdisjoint(pool.worker_pids()), "old workers gone")
        for _ in range(4):
            await signer.sign(DATA)
        assert len(pool.worker_pids()) == 2


@pytest_twisted.ensureDeferred
async def test_hung_worker_times_out_and_is_replaced(token: Path) -> None:
    async with started_pool(make_pool(workers=1, sign_timeout=1.0)) as pool:
        signer = Pkcs11Signer(pool, KeyRef(label="p256"))
        await signer.start()
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # a hung HSM call
        err = await expect(signer.sign(DATA), SignerUnavailable)
        assert "timed out" in str(err)
        await wait_for(lambda: gone(pid), "hung worker killed")
        # The replacement's start (a Python process, a login) can take more than this
        # test's 1 s timeout on a loaded box: wait until it is up, then sign.
        await wait_for(lambda: pool.health().state is State.READY, "replacement up")
        await signer.sign(DATA)


@pytest_twisted.ensureDeferred
async def test_queue_overflow_sheds_load(token: Path) -> None:
    async with started_pool(make_pool(workers=1, max_queue=2)) as pool:
        signer = Pkcs11Signer(pool, KeyRef(label="p256"))
        await signer.start()
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        accepted = [signer.sign(DATA) for _ in range(3)]  # 1 in flight + 2 queued
        assert pool.busy() == 1 and pool.queue_depth() == 2
        rejected = signer.sign(DATA)
        assert rejected.called  # at once, no waiting
        err = await expect(rejected, SignerUnavailable)
        assert "queue full" in str(err)
        os.kill(pid, signal.SIGCONT)
        for d in accepted:
            await d
        assert pool.queue_depth() == 0 and pool.busy() == 0


@pytest_twisted.ensureDeferred
async def test_cancelled_request_leaves_queue(token: Path) -> None:
    async with started_pool(make_pool(workers=1)) as pool:
        signer = Pkcs11Signer(pool, KeyRef(label="p256"))
        await signer.start()
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        first = signer.sign(DATA)
        queued = signer.sign(DATA)
        assert pool.queue_depth() == 1
        queued.cancel()
        await expect(queued, defer.CancelledError)
        assert pool.queue_depth() == 0
        os.kill(pid, signal.SIGCONT)
        await first


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_children_and_fails_later_requests(token: Path) -> None:
    pool = make_pool(workers=3)
    await pool.start()
    pids = pool.worker_pids()
    assert len(pids) == 3
    await pool.stop()
    assert all(gone(pid) for pid in pids)
    assert not [p for p in _children() if p in pids]
    await expect(pool.sign(KeyRef(label="rsa"), "CKM_SHA256_RSA_PKCS", DATA), SignerUnavailable)


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                found.append(int(entry))
    return found
