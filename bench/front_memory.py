"""Memory of one HTTP front (``http_workers``) with many responses in the main cache.

Issue #11: a front used to hold a full copy of every handle's cache (measured ~2.6 KB
per entry per front). This starts a real front process (``python -m hsmocsp.web.front_process``)
from a real :class:`~hsmocsp.web.front_pool.FrontPool` whose one handle holds ``--entries``
signed responses (synthetic bytes of ``--der-size``, the size of a dev PKI response
with its responder certificate), and reads the front's VmRSS:

* ``idle``: once it listens and the main process has sent what it sends unasked
  (today's code: a snapshot of every entry; settled when RSS stops growing);
* ``asked``: after ``--requests`` distinct CertIDs were asked of the front, each on a
  new connection (a miss the front relays to a stub main-process socket, then asks
  the main process for that entry).

Prints one JSON line. Not a test: ``python -m bench.front_memory``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import time
from http.client import HTTPConnection
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from twisted.internet import reactor as _reactor
from twisted.internet import task, threads
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory, Protocol

from hsmocsp.cache import ResponseCache
from hsmocsp.devpki.bao import free_port
from hsmocsp.handle import SignedResponse
from hsmocsp.ocsp.request import parse_request
from hsmocsp.web.front_pool import FrontPool
from hsmocsp.web.limits import HttpLimits
from hsmocsp.web.metrics import Metrics

reactor: Any = _reactor
NAME_HASH = bytes(range(20))
KEY_HASH = bytes(range(20, 40))


class _Handle:
    """What FrontPool reads of a handle."""

    def __init__(self, cache: ResponseCache[SignedResponse]) -> None:
        self.name = "bench"
        self.path = "/ocsp"
        self.max_age = None
        self.nonce_policy = "echo"
        self.cache = cache

    def on_certificate_change(self, listener: Any) -> None:
        pass

    def count_hits(self, n: int) -> None:
        self.cache.stats.hits += n


class _Stub(Protocol):
    """The main process's private socket, answering anything relayed with a 404."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
        self.transport.loseConnection()


def request(serial: int) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        NAME_HASH, KEY_HASH, serial, hashes.SHA1()
    )
    return builder.build().public_bytes(Encoding.DER)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def ask(port: int, der: bytes) -> None:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/ocsp", der, {"Content-Type": "application/ocsp-request"})
        conn.getresponse().read()
    finally:
        conn.close()


async def settle(pid: int, quiet: float = 3.0, timeout: float = 300.0) -> int:
    """VmRSS once it has not grown for ``quiet`` seconds."""
    last, since, deadline = rss_kib(pid), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        await task.deferLater(reactor, 0.5, lambda: None)
        now = rss_kib(pid)
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return last


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cache: ResponseCache[SignedResponse] = ResponseCache(reactor.seconds)
    now = reactor.seconds()
    requests = [request(n) for n in range(args.requests)]
    keys = [parse_request(r).cert_ids[0].der for r in requests]
    for n in range(args.entries):
        key = keys[n] if n < len(keys) else parse_request(request(n)).cert_ids[0].der
        der = os.urandom(args.der_size)
        cache.put(key, n, SignedResponse(
            der=der, produced_at=now, this_update=now, next_update=now + 86400,
            refresh_at=now + 43200, etag=f'"{n:032x}"', cacheable=True, status_key="good",
        ))  # fmt: skip
    work = tempfile.mkdtemp(prefix="front-memory-")
    backend = os.path.join(work, "backend.sock")
    reactor.listenUNIX(backend, Factory.forProtocol(_Stub))
    handle = _Handle(cache)
    port = free_port()
    extra: dict[str, Any] = {}
    if "hot_cache_entries" in inspect.signature(FrontPool).parameters:
        extra["hot_cache_entries"] = args.hot_cache_entries
    pool = FrontPool(reactor, [handle], Metrics([]), count=1, host="127.0.0.1",  # type: ignore[list-item]
                     port=port, backend=backend, limits=HttpLimits(), **extra)  # fmt: skip
    pool.startService()
    deadline = time.monotonic() + 60
    while pool.starting() is not None:
        if time.monotonic() > deadline:
            raise RuntimeError("the front did not listen")
        await task.deferLater(reactor, 0.1, lambda: None)
    (front,) = pool.fronts.values()
    pid = front.pid
    assert pid is not None
    idle = await settle(pid)
    started = time.monotonic()
    if requests:
        await threads.deferToThread(lambda: [ask(port, r) for r in requests])
        await threads.deferToThread(lambda: [ask(port, r) for r in requests])  # hits now
    asked = await settle(pid)
    took = time.monotonic() - started
    stopped: Deferred[None] = pool.stopService()
    await stopped
    return {
        "entries": args.entries, "der_size": args.der_size, "requests": args.requests,
        "hot_cache_entries": extra.get("hot_cache_entries"),
        "front_rss_idle_mib": round(idle / 1024, 1), "front_rss_asked_mib": round(asked / 1024, 1),
        "requests_seconds": round(took, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--der-size", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--hot-cache-entries", type=int, default=100_000)
    args = parser.parse_args()
    result: dict[str, Any] = {}

    def done(value: dict[str, Any]) -> None:
        result.update(value)
        reactor.stop()

    def failed(failure: Any) -> None:
        failure.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run(args)).addCallbacks(done, failed))
    reactor.run()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
