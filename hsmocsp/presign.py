"""Pre-signing: sign every known serial in the background, at a bounded rate.

A token-class HSM signs a handful of responses per second; if the first client
to ask about a serial had to wait for the HSM, a burst of new clients would
queue behind it. So on start and on every source change, the handle's known
serials are signed ahead of demand through the handle's own cache (so a live
miss for the same key coalesces with the pre-signing, never signs twice).

Live misses jump the queue: pre-signing only starts a signature when the
signer has no request waiting, and keeps at most ``concurrency`` of its own in
flight, so a live request waits for at most that many signatures.

Responses age too: after a sweep, another one starts every half of the window
between an entry's refresh point and its expiry (``validity * (1 -
refresh_fraction) / 2``), so every known serial is signed again after its
refresh point and well before its nextUpdate, whether or not anyone asked for
it; a sweep signs only entries past their refresh point.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hsmocsp.ocsp.request import make_cert_id
from hsmocsp.ocsp.response import issuer_hashes
from hsmocsp.responder import Handle, SignedResponse

log = Logger()

#: Serials looked at per call (most are fresh, cost ~3 us each on the reactor): keeps
#: a sweep over a large index to a few milliseconds per 0.1 s tick.
EXAMINE_PER_CALL = 2_000


class Presigner:
    """Keeps a handle's cache filled for every serial its source knows."""

    def __init__(
        self,
        handle: Handle,
        *,
        clock: Any,
        rate: float = 50.0,
        concurrency: int = 1,
        hashes: Iterable[str] = ("sha1",),
        signer_backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self.handle = handle
        self.rate = rate
        self.concurrency = concurrency
        self.hashes = tuple(hashes)
        self._clock = clock
        self._backlog = signer_backlog
        self._urgent: deque[int] = deque()
        self._sweep: Iterator[tuple[x509.Certificate, int]] | None = None
        self._in_flight = 0
        self._loop: LoopingCall | None = None
        self.signed = 0
        self.failed = 0
        self._tokens = 0.0
        self._last = clock.seconds()
        self._pumping = False
        self._again = False
        self._issuer_hashes: dict[tuple[x509.Certificate, str], tuple[bytes, bytes]] = {}
        self.sweeps = 0
        self.resweep_interval = max(1.0, handle.validity * (1.0 - handle.refresh_fraction) / 2.0)
        self._next_sweep_at: float | None = None
        handle.source.on_change(self._changed)

    def start(self) -> None:
        if self.rate <= 0:
            return
        self._restart_sweep()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(0.1, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def pending(self) -> bool:
        return bool(self._urgent) or self._sweep is not None or self._in_flight > 0

    def _changed(self, serials: frozenset[int] | None) -> None:
        # Changed serials first (their cached bytes were just dropped), then a new sweep
        # for anything that appeared without being reported.
        if serials is not None:
            self._urgent.extend(serials)
        self._restart_sweep()

    def _restart_sweep(self) -> None:
        source = self.handle.source
        self.sweeps += 1
        self._next_sweep_at = None

        def walk() -> Iterator[tuple[x509.Certificate, int]]:
            for issuer in source.issuers():
                for serial in source.known_serials(issuer):
                    yield issuer, serial

        self._sweep = walk()

    def _next(self) -> tuple[x509.Certificate, int] | None:
        while self._urgent:
            serial = self._urgent.popleft()
            issuers = self.handle.source.issuers()
            if issuers:
                return issuers[0], serial
        if self._sweep is not None:
            item = next(self._sweep, None)
            if item is not None:
                return item
            self._sweep = None
            self._next_sweep_at = self._clock.seconds() + self.resweep_interval
        return None

    def _tick(self) -> None:
        if (
            self._sweep is None
            and self._next_sweep_at is not None
            and self._clock.seconds() >= self._next_sweep_at
        ):
            self._restart_sweep()
        self._pump()

    def _pump(self) -> None:
        """Start signatures while the rate, the concurrency and the live backlog allow.

        Called every tick and whenever a signature finishes, so pre-signing keeps the
        workers busy at up to ``rate`` per second instead of one signature per tick.
        Re-entrant calls (a signer that answers synchronously) just ask for another loop.
        """
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._fill()
        finally:
            self._pumping = False

    def _fill(self) -> None:
        now = self._clock.seconds()
        burst = max(1.0, self.rate * 0.1)
        self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        examined = 0
        while (
            self._tokens >= 1
            and self._in_flight < self.concurrency
            and self._backlog() == 0
            and examined < EXAMINE_PER_CALL
        ):
            item = self._next()
            if item is None:
                return
            examined += 1
            issuer, serial = item
            for alg in self.hashes:
                if self._sign(issuer, serial, alg):
                    self._tokens -= 1

    def _hashes(self, issuer: x509.Certificate, alg: str) -> tuple[bytes, bytes]:
        key = (issuer, alg)
        hit = self._issuer_hashes.get(key)
        if hit is None:
            hit = self._issuer_hashes[key] = issuer_hashes(issuer, alg)
        return hit

    def _sign(self, issuer: x509.Certificate, serial: int, alg: str) -> bool:
        """Start signing ``serial`` unless a fresh response is already cached."""
        name_hash, key_hash = self._hashes(issuer, alg)
        cid = make_cert_id(alg, name_hash, key_hash, serial)
        cached = self.handle.cache.peek(cid.der)
        if cached is not None and self._clock.seconds() < cached.refresh_at:
            return False

        def produce() -> Deferred[SignedResponse]:
            return self.handle.produce_single(cid, issuer)

        # Past its refresh point: refresh through a counted Deferred (cache.get would
        # start it in the background, uncounted, and a sweep would flood the signer).
        result = (
            self.handle.cache.refresh(cid.der, serial, produce)
            if cached is not None
            else self.handle.cache.get(cid.der, serial, produce)
        )
        if not isinstance(result, Deferred):
            return False
        self._in_flight += 1

        def done(outcome: SignedResponse | Any) -> None:
            self._in_flight -= 1
            if isinstance(outcome, SignedResponse):
                self.signed += 1
            else:
                self.failed += 1
            if self._loop is not None and self._loop.running:
                self._pump()

        result.addBoth(done)
        return True
