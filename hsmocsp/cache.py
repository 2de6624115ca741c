"""Signed-response cache with request coalescing.

A token-class HSM signs a handful of responses per second, so the design is:
sign each (issuer, serial, CertID hash) once per validity window and serve the
bytes many times. The cache key is the DER of the CertID as the client sent it:
that is exactly what makes the response bytes differ (the response echoes the
CertID, including its hash algorithm).

Three rules keep it correct:

* an entry is served until its ``next_update``; from its ``refresh_at`` on, it
  is still served but a background refresh is started (once);
* concurrent misses for one key wait on a single producer (coalescing); every
  waiter gets its own Deferred, so a client that disconnects (Klein cancels the
  handler) never cancels the shared signing;
* :meth:`invalidate` drops entries for serials whose status changed *and* marks
  producers already in flight for them as stale, so a signature started before
  a revocation was loaded is thrown away and redone rather than cached or served.

Values the ``transient`` predicate picks (answers for serials the source does not
know: anyone can ask for any number of them) live apart, in a small LRU of
``max_transient`` entries: never persisted (``on_store``), never sent to
observers (the fronts' copies), so a flood of random serials leaves memory and
disk flat while the answers of real certificates stay cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from hsmocsp.inflight import ObservableDeferred


class Expiring(Protocol):
    @property
    def refresh_at(self) -> float: ...

    @property
    def expires_at(self) -> float: ...


V = TypeVar("V", bound=Expiring)


class CacheObserver(Protocol[V]):  # type: ignore[misc]
    """Told of every change to the entries (replicas in other processes follow these)."""

    def stored(self, key: bytes, serial: int, value: V) -> None: ...

    def dropped(self, key: bytes) -> None: ...

    def invalidated(self, serials: frozenset[int] | None) -> None: ...


@dataclass
class _Flight(Generic[V]):
    """A value being produced for one key; ``stale`` once its serial was invalidated."""

    serial: int
    result: ObservableDeferred[V]
    stale: bool = False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale_served: int = 0
    coalesced: int = 0
    invalidated: int = 0
    refreshes: int = 0
    transient_evicted: int = 0


class ResponseCache(Generic[V]):
    """In-memory map ``key -> value`` with coalescing producers and invalidation by serial.

    ``now`` is the clock (``reactor.seconds``) so tests drive time with ``task.Clock``.
    ``on_store`` is called with every value produced (persistence hooks in there).
    """

    def __init__(
        self,
        now: Callable[[], float],
        max_entries: int = 1_000_000,
        on_store: Callable[[bytes, int, V], None] | None = None,
        *,
        transient: Callable[[V], bool] | None = None,
        max_transient: int = 10_000,
    ) -> None:
        self._now = now
        self._max = max_entries
        self._entries: dict[bytes, tuple[int, V]] = {}
        self._is_transient = transient
        self._max_transient = max(1, max_transient)
        self._transient: OrderedDict[bytes, tuple[int, V]] = OrderedDict()
        self._by_serial: dict[int, set[bytes]] = {}
        self._flights: dict[bytes, _Flight[V]] = {}
        self.on_store = on_store
        self.observers: list[CacheObserver[V]] = []
        self.stats = CacheStats()
        # Demand, for pre-signing (hsmocsp.presign): told once per lasting key a client
        # asks for (``on_first_request``), and asked to take over the refresh of an entry served
        # past its refresh point (``refresher`` returns True when it does), so that a
        # slow token's time goes where clients need it, in the pre-signer's order.
        self.on_first_request: Callable[[bytes, int], None] | None = None
        self.refresher: Callable[[bytes, int], bool] | None = None
        self._requested: set[bytes] = set()

    def _hit(self, key: bytes) -> tuple[int, V] | None:
        hit = self._entries.get(key)
        if hit is None:
            hit = self._transient.get(key)
            if hit is not None:
                self._transient.move_to_end(key)
        return hit

    def current(self, key: bytes) -> V | None:
        """The value stored for ``key`` (even if expired), or None."""
        hit = self._hit(key)
        return None if hit is None else hit[1]

    def entry(self, key: bytes) -> tuple[int, V] | None:
        """``(serial, value)`` of the lasting (not transient) entry for ``key``, even an
        expired one; None if there is none. A dict lookup, nothing more."""
        return self._entries.get(key)

    def count_hits(self, n: int) -> None:
        """Answers served from this cache's values elsewhere (the HTTP fronts' hot caches,
        a pre-signed handle's lookups), counted with the hits of :meth:`get`."""
        self.stats.hits += n

    def items(self) -> list[tuple[bytes, int, V]]:
        """Every lasting entry as ``(key, serial, value)`` (a copy; expired ones included;
        transient ones not: they are what observers never see)."""
        return [(key, serial, value) for key, (serial, value) in self._entries.items()]

    def keys(self) -> list[bytes]:
        """The keys of every lasting entry (a copy: cheap to walk while entries change)."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries) + len(self._transient)

    def holds(self, key: bytes) -> bool:
        """True when ``key`` has a lasting (not transient) entry, even an expired one."""
        return key in self._entries

    def transient_entries(self) -> int:
        return len(self._transient)

    def peek(self, key: bytes) -> V | None:
        """The stored value, if still valid now, without counting or refreshing."""
        hit = self._hit(key)
        if hit is None or self._now() >= hit[1].expires_at:
            return None
        return hit[1]

    def get(self, key: bytes, serial: int, produce: Callable[[], Deferred[V]]) -> Deferred[V] | V:
        """Return the value for ``key`` (the bare value on a hit, so the hot path
        allocates no Deferred), or a Deferred that fires when ``produce`` has made one."""
        hit = self._entries.get(key)
        if hit is not None and key not in self._requested:
            self._first_request(key, serial)
        if hit is None and self._transient:
            hit = self._hit(key)
        if hit is not None:
            value = hit[1]
            now = self._now()
            if now < value.refresh_at:
                self.stats.hits += 1
                return value
            if now < value.expires_at:
                self.stats.stale_served += 1
                if key not in self._flights and (
                    self.refresher is None or not self.refresher(key, serial)
                ):
                    self.stats.refreshes += 1
                    self._start(key, serial, produce)
                return value
            self._drop(key)
        self.stats.misses += 1
        flight = self._flights.get(key)
        if flight is None:
            return self._start(key, serial, produce)
        self.stats.coalesced += 1
        return flight.result.observe()

    def refresh(
        self, key: bytes, serial: int, produce: Callable[[], Deferred[V]]
    ) -> Deferred[V] | None:
        """Produce a new value for ``key`` now, the current one still served meanwhile.

        For pre-signing, which must count what it starts: the Deferred fires when the
        new value is stored (or fails); None when a producer is already running.
        """
        if key in self._flights:
            return None
        self.stats.refreshes += 1
        return self._start(key, serial, produce)

    def put(self, key: bytes, serial: int, value: V) -> None:
        """Store a value made elsewhere (pre-signing, loading the persistent store)."""
        if key in self._flights:
            return
        self._store(key, serial, value, notify=False)

    def in_flight(self) -> int:
        return len(self._flights)

    def requested(self, key: bytes) -> bool:
        """Whether a client asked for ``key`` (through :meth:`get`) while it had a lasting
        entry, since the set was last trimmed (bounded: cleared at ``max_entries``; a
        flood of serials nobody issued never enters it)."""
        return key in self._requested

    def _first_request(self, key: bytes, serial: int) -> None:
        if len(self._requested) >= self._max:
            self._requested.clear()
        self._requested.add(key)
        if self.on_first_request is not None:
            self.on_first_request(key, serial)

    def invalidate(self, serials: Iterable[int] | None) -> None:
        """Forget everything about ``serials`` (None: about every serial)."""
        wanted = None if serials is None else frozenset(serials)
        for observer in self.observers:
            observer.invalidated(wanted)
        if wanted is None:
            self.stats.invalidated += len(self._entries) + len(self._transient)
            self._entries.clear()
            self._by_serial.clear()
            self._transient.clear()
            for flight in self._flights.values():
                flight.stale = True
            return
        for serial in wanted:
            for key in self._by_serial.pop(serial, ()):
                if self._entries.pop(key, None) is not None:
                    self.stats.invalidated += 1
        if self._transient:
            gone = [k for k, (serial, _) in self._transient.items() if serial in wanted]
            for key in gone:
                del self._transient[key]
            self.stats.invalidated += len(gone)
        for flight in self._flights.values():
            if flight.serial in wanted:
                flight.stale = True

    # --- internals -----------------------------------------------------------------

    def _start(
        self, key: bytes, serial: int, produce: Callable[[], Deferred[V]]
    ) -> Deferred[V]:
        """Produce a value for ``key`` (again, while the serial turns stale meanwhile),
        store it, and return the first observer's Deferred for it.

        Shared through :class:`~hsmocsp.inflight.ObservableDeferred`: every waiter
        has its own Deferred, registered before production starts (a producer may
        fire synchronously: file signer, cached source status), and a failed
        background refresh nobody waits for is dropped there; the old entry keeps
        being served until it expires.
        """
        produced: Deferred[V] = Deferred()
        flight: _Flight[V] = _Flight(serial=serial, result=ObservableDeferred(produced))
        self._flights[key] = flight
        first = flight.result.observe()

        def done(result: V | Failure) -> None:
            if flight.stale and not isinstance(result, Failure):
                # The status changed while we were signing: redo with fresh data.
                flight.stale = False
                attempt(produce)
                return
            del self._flights[key]
            if isinstance(result, Failure):
                produced.errback(result)
                return
            self._store(key, serial, result, notify=True)
            produced.callback(result)

        def attempt(make: Callable[[], Deferred[V]]) -> None:
            try:
                d = make()
            except Exception:
                d = Deferred()
                d.errback(Failure())
            d.addBoth(done)

        attempt(produce)
        return first

    def _store(self, key: bytes, serial: int, value: V, notify: bool) -> None:
        if self._is_transient is not None and self._is_transient(value):
            if key in self._entries:
                self._drop(key)  # it was known, now it is not: observers forget it
            self._transient[key] = (serial, value)
            self._transient.move_to_end(key)
            while len(self._transient) > self._max_transient:
                self._transient.popitem(last=False)
                self.stats.transient_evicted += 1
            return
        self._transient.pop(key, None)
        if key not in self._entries and len(self._entries) >= self._max:
            self._evict()
        self._entries[key] = (serial, value)
        self._by_serial.setdefault(serial, set()).add(key)
        if notify and self.on_store is not None:
            self.on_store(key, serial, value)
        for observer in self.observers:
            observer.stored(key, serial, value)

    def _drop(self, key: bytes) -> None:
        if self._transient.pop(key, None) is not None:
            return
        hit = self._entries.pop(key, None)
        if hit is not None:
            for observer in self.observers:
                observer.dropped(key)
            keys = self._by_serial.get(hit[0])
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_serial[hit[0]]

    def _evict(self) -> None:
        """Drop expired entries; if none, the oldest tenth (dict order = insertion order)."""
        now = self._now()
        expired = [k for k, (_, v) in self._entries.items() if v.expires_at <= now]
        if not expired:
            expired = list(self._entries)[: max(1, self._max // 10)]
        for key in expired:
            self._drop(key)
