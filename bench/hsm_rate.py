"""The raw signing rate of a SoftHSM key: PyKCS11 ``C_Sign`` in a tight loop.

This is the ceiling for hsmocsp's cache-miss path with the same key and the same
number of processes: hsmocsp's workers do exactly this call (``CKM_SHA256_RSA_PKCS``
on a ~600-byte tbsResponseData for RSA keys) plus framing and IPC. Each process opens
its own session and logs in once, like a worker does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import PyKCS11

DATA = b"x" * 600  # about the size of a tbsResponseData


@dataclass(frozen=True)
class HsmKey:
    """Where the key is; ``pin`` is passed to child processes in memory only."""

    module: str
    softhsm_conf: str
    token_label: str
    key_label: str
    pin: str

    def __repr__(self) -> str:  # never show the PIN
        return f"HsmKey({self.token_label!r}, {self.key_label!r})"


def _sign_loop(key: HsmKey, seconds: float, start_at: float, out: mp.Queue[int]) -> None:
    os.environ["SOFTHSM2_CONF"] = key.softhsm_conf
    lib = PyKCS11.PyKCS11Lib()
    lib.load(key.module)
    slot = next(
        s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == key.token_label
    )  # fmt: skip
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
    session.login(key.pin)
    handle = session.findObjects(
        [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, key.key_label)]
    )[0]
    mech = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS, None)
    session.sign(handle, DATA, mech)  # warm
    while time.monotonic() < start_at:
        time.sleep(0.005)
    end = start_at + seconds
    n = 0
    while time.monotonic() < end:
        session.sign(handle, DATA, mech)
        n += 1
    out.put(n)
    session.closeSession()


def signing_rate(key: HsmKey, processes: int, seconds: float) -> float:
    """Signatures per second summed over ``processes`` concurrent signing loops."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue[int] = ctx.Queue()
    start_at = time.monotonic() + 2.0  # all processes logged in before the clock starts
    procs = [
        ctx.Process(target=_sign_loop, args=(key, seconds, start_at, queue))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        counts = [queue.get(timeout=seconds + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return sum(counts) / seconds
