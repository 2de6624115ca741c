"""How late does the reactor get while signing on an HSM? Processes vs a thread.

A 1 ms timer re-arms itself and records how late each tick fires while RSA
signatures run continuously on a SoftHSM token made in a temp dir:

* ``idle``   - no signing, the floor;
* ``pool``   - TokenPool worker processes (what hsmocsp does);
* ``thread`` - PyKCS11 called in reactor threads via deferToThread (what it
  does not do: PyKCS11 holds the GIL through C_Sign, so the reactor stalls).

Usage: .venv/bin/python bench/reactor_lateness.py [--seconds 5] [--key rsa:4096]
Prints max/p99/median timer lateness and signatures per second for each mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twisted.internet import defer, reactor, task, threads  # noqa: E402

from hsmocsp.config import Secret, TokenConfig  # noqa: E402
from hsmocsp.signing.pkcs11 import Pkcs11Signer  # noqa: E402
from hsmocsp.signing.pool import KeyRef, TokenPool  # noqa: E402
from tests.integration.softhsm_helpers import (  # noqa: E402
    SOFTHSM_MODULE,
    gen_keypair,
    init_token,
)

PIN = "1234"
TICK = 0.001
DATA = b"x" * 600  # about the size of a tbsResponseData


class Lateness:
    """A self re-arming 1 ms timer; records how late each tick was."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._due = 0.0
        self._call: Any = None

    def start(self) -> None:
        self.samples = []
        self._due = time.monotonic() + TICK
        self._call = reactor.callLater(TICK, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.samples.append(max(0.0, now - self._due))
        self._due = now + TICK
        self._call = reactor.callLater(TICK, self._tick)

    def stop(self) -> dict[str, float]:
        self._call.cancel()
        s = sorted(self.samples)
        return {
            "ticks": len(s),
            "max_ms": round(s[-1] * 1000, 2),
            "p99_ms": round(s[int(len(s) * 0.99) - 1] * 1000, 2),
            "median_ms": round(statistics.median(s) * 1000, 3),
        }


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def drive(sign: Any, seconds: float, in_flight: int) -> dict[str, float]:
    """Keep ``in_flight`` signatures going for ``seconds``; measure lateness meanwhile."""
    meter = Lateness()
    count = 0
    stop_at = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            await sign(DATA)
            count += 1

    meter.start()
    started = time.monotonic()
    if in_flight:
        await defer.gatherResults([defer.Deferred.fromCoroutine(loop()) for _ in range(in_flight)])
    else:
        await sleep(seconds)
    elapsed = time.monotonic() - started
    result = meter.stop()
    result["sig_per_s"] = round(count / elapsed, 1)
    return result


class ThreadSigner:
    """PyKCS11 in reactor threads, one session per thread (the design we rejected)."""

    def __init__(self, label: str, ec: bool) -> None:
        import PyKCS11

        self._pkcs11 = PyKCS11
        self._lib = PyKCS11.PyKCS11Lib()
        self._lib.load(SOFTHSM_MODULE)
        self._slot = self._lib.getSlotList(tokenPresent=True)[0]
        self._label = label
        self._ec = ec
        self._local = threading.local()

    def _session(self) -> Any:
        p = self._pkcs11
        if not hasattr(self._local, "session"):
            session = self._lib.openSession(self._slot, p.CKF_SERIAL_SESSION)
            try:
                session.login(PIN)
            except p.PyKCS11Error as err:
                if err.value != p.CKR_USER_ALREADY_LOGGED_IN:
                    raise
            (key,) = session.findObjects(
                [(p.CKA_CLASS, p.CKO_PRIVATE_KEY), (p.CKA_LABEL, self._label)]
            )
            self._local.session, self._local.key = session, key
        return self._local.session, self._local.key

    def _sign(self, data: bytes) -> bytes:
        session, key = self._session()
        p = self._pkcs11
        if self._ec:  # as Pkcs11Signer does: digest here, CKM_ECDSA on the token
            data = hashlib.sha256(data).digest()
            mech = p.Mechanism(p.CKM_ECDSA, None)
        else:
            mech = p.Mechanism(p.CKM_SHA256_RSA_PKCS, None)
        return bytes(session.sign(key, data, mech))

    def sign(self, data: bytes) -> defer.Deferred[bytes]:
        return threads.deferToThread(self._sign, data)


async def main(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {
        "key": args.key,
        "seconds": args.seconds,
        "workers": args.workers,
        "in_flight": args.in_flight,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="lateness-") as tmp:
        conf = init_token(tmp, "T", PIN, "5678")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        t0 = time.monotonic()
        gen_keypair(conf, "bench", "01", args.key)
        print(f"key {args.key} generated in {time.monotonic() - t0:.1f} s", file=sys.stderr)

        results["idle"] = await drive(None, args.seconds, 0)
        print("idle  ", results["idle"], file=sys.stderr)

        token = TokenConfig(
            name="bench", module=Path(SOFTHSM_MODULE), token_label="T", slot=None,
            pin=Secret(), workers=args.workers, max_queue=1000, sign_timeout=10.0,
        )  # fmt: skip
        pool = TokenPool(token, PIN, reactor=reactor)
        await pool.start()
        signer = Pkcs11Signer(pool, KeyRef(label="bench"))
        await signer.start()
        results["pool"] = await drive(signer.sign, args.seconds, args.in_flight)
        print("pool  ", results["pool"], file=sys.stderr)
        await pool.stop()

        reactor.suggestThreadPoolSize(args.workers)  # type: ignore[attr-defined]
        thread_signer = ThreadSigner("bench", ec=args.key.lower().startswith("ec"))
        results["thread"] = await drive(thread_signer.sign, args.seconds, args.in_flight)
        print("thread", results["thread"], file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--key", default="rsa:4096", help="pkcs11-tool key type")
    parser.add_argument("--workers", type=int, default=2, help="processes / threads")
    parser.add_argument("--in-flight", type=int, default=4, help="concurrent sign requests")
    options = parser.parse_args()
    task.react(lambda _reactor: defer.Deferred.fromCoroutine(main(options)))
