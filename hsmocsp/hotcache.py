"""A bounded hot cache of signed responses, for processes that do not sign.

The main process's :class:`~hsmocsp.cache.ResponseCache` holds every response it
signed (a million entries is normal). A process that only *serves* answers (an
``http_workers`` front, a ``role: server`` replica) must not hold a copy of all
of them: memory would grow with the number of such processes, 2.6 KB per entry
per process as measured before this module (issue #11). It keeps instead the
answers its clients actually ask for, up to ``max_entries``, least recently used
first out, and asks its source (the main process, the shared store) for the rest.

What it serves is deliberately narrower than what the main cache serves: never
an answer past its ``refresh_at`` (the signer refreshes only what it sees asked
for, so a request past that point goes to it), never one made for a nonce, never
an expired one. A revocation reaches it as :meth:`HotCache.invalidate` by serial
(the by-serial index makes that a few dict operations) or for everything.

Also here, once, for every process that answers:

* :class:`RequestKeys`: the DER of a whole request -> the cache key (the CertID's
  DER) it asks about, bounded, remembered only for requests that were answered
  (a flood of random bytes or random serials must not grow it);
* :func:`max_age_for`: the ``Cache-Control: max-age`` of a response (RFC 5019
  section 6.2), used by the main process, the fronts and the server replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from hsmocsp.errors import HsmOcspError
from hsmocsp.ocsp.request import parse_request

__all__ = [
    "DEFAULT_ENTRIES",
    "DEFAULT_MEMO",
    "HotCache",
    "HotCacheStats",
    "RequestCache",
    "RequestKeys",
    "Servable",
    "max_age_for",
    "request_key",
    "servable",
]

#: ``hot_cache_entries`` when the configuration does not say.
DEFAULT_ENTRIES = 100_000
#: Request bytes remembered per handle (each a few hundred bytes).
DEFAULT_MEMO = 100_000


class Servable(Protocol):
    """What the hot cache reads of a value (:class:`~hsmocsp.handle.SignedResponse`)."""

    @property
    def next_update(self) -> float: ...

    @property
    def refresh_at(self) -> float: ...

    @property
    def expires_at(self) -> float: ...

    @property
    def cacheable(self) -> bool: ...


V = TypeVar("V", bound=Servable)


def max_age_for(response: Servable, now: float, max_age: float | None) -> int:
    """Seconds a client or HTTP cache may keep ``response`` (``Cache-Control: max-age``):
    until its nextUpdate, at most the handle's ``max_age``, never negative."""
    remaining = response.next_update - now
    if max_age is not None:
        remaining = min(remaining, max_age)
    return max(0, int(remaining))


def servable(value: Servable, now: float) -> bool:
    """Whether a process that does not sign may answer with ``value`` now: made without a
    nonce, before its refresh point (so the signer sees the demand and refreshes it), not
    expired."""
    return value.cacheable and now < value.refresh_at and now < value.expires_at


@dataclass
class HotCacheStats:
    hits: int = 0
    misses: int = 0
    evicted: int = 0
    invalidated: int = 0


class HotCache(Generic[V]):
    """``key -> value`` (key: the CertID's DER), at most ``max_entries``, LRU order.

    ``now`` is the clock (``reactor.seconds``; ``task.Clock`` in tests).
    """

    def __init__(self, now: Callable[[], float], max_entries: int = DEFAULT_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("a hot cache holds at least one entry")
        self._now = now
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[int, V]] = OrderedDict()
        self._by_serial: dict[int, set[bytes]] = {}
        self.stats = HotCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def lookup(self, key: bytes) -> V | None:
        """The value to answer with now, or None (not held, not cacheable, past its
        refresh point or expired: the caller asks the signer). Counted as a hit or miss."""
        hit = self._entries.get(key)
        if hit is None:
            self.stats.misses += 1
            return None
        value = hit[1]
        if not servable(value, self._now()):
            self.stats.misses += 1
            if self._now() >= value.expires_at:
                self.drop(key)  # worthless now: make room
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: bytes, serial: int, value: V) -> None:
        """Hold ``value`` for ``key`` (replacing what was there), evicting the least
        recently used entry when full. A value that could never be served (a nonce's,
        an expired one) is not kept."""
        self.drop(key)
        if not value.cacheable or self._now() >= value.expires_at:
            return
        while len(self._entries) >= self.max_entries:
            old_key, (old_serial, _) = self._entries.popitem(last=False)
            self._unindex(old_key, old_serial)
            self.stats.evicted += 1
        self._entries[key] = (serial, value)
        self._by_serial.setdefault(serial, set()).add(key)

    def drop(self, key: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._unindex(key, old[0])

    def invalidate(self, serials: Iterable[int] | None) -> None:
        """Forget every answer about ``serials`` (None: every answer)."""
        if serials is None:
            self.stats.invalidated += len(self._entries)
            self._entries.clear()
            self._by_serial.clear()
            return
        for serial in serials:
            for key in self._by_serial.pop(serial, ()):
                if self._entries.pop(key, None) is not None:
                    self.stats.invalidated += 1

    def _unindex(self, key: bytes, serial: int) -> None:
        keys = self._by_serial.get(serial)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_serial[serial]


def request_key(der: bytes, nonce_policy: str) -> bytes | None:
    """The cache key of a request a cached answer may answer (one CertID; no nonce, or a
    nonce the handle ignores), else None (malformed, several CertIDs, a nonce to echo:
    the signer answers those)."""
    try:
        request = parse_request(der)
    except HsmOcspError:
        return None
    if len(request.cert_ids) != 1:
        return None
    if request.nonce is not None and nonce_policy != "ignore":
        return None
    return request.cert_ids[0].der


class RequestKeys:
    """Request bytes -> cache key, for one handle: a repeated request costs a dict lookup
    instead of a parse (a few microseconds).

    Bounded by ``max_entries`` (cleared when full: cheaper than LRU bookkeeping on the hot
    path, and refilled by the next requests). Only :meth:`remember` adds, and the caller
    calls it only for requests it answered: bytes nobody can answer (garbage, random
    serials) are parsed each time and never held.
    """

    def __init__(self, nonce_policy: str, max_entries: int = DEFAULT_MEMO) -> None:
        self.nonce_policy = nonce_policy
        self.max_entries = max(1, max_entries)
        self._keys: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, der: bytes) -> bytes | None:
        """The cache key these bytes ask about (remembered, or parsed now), or None."""
        key = self._keys.get(der)
        if key is not None:
            return key
        return request_key(der, self.nonce_policy)

    def remember(self, der: bytes, key: bytes) -> None:
        if der in self._keys:
            return
        if len(self._keys) >= self.max_entries:
            self._keys.clear()
        self._keys[der] = key


class RequestCache(Generic[V]):
    """A :class:`HotCache` and its :class:`RequestKeys`: request bytes in, answer out.

    What fronts and server replicas hold per handle. :meth:`find` returns the key too,
    so that a miss can be asked for (a front asks the main process, a server the store).
    """

    def __init__(
        self,
        now: Callable[[], float],
        nonce_policy: str,
        max_entries: int = DEFAULT_ENTRIES,
        max_memo: int = DEFAULT_MEMO,
    ) -> None:
        self.cache: HotCache[V] = HotCache(now, max_entries)
        self.keys = RequestKeys(nonce_policy, max_memo)

    def find(self, der: bytes) -> tuple[bytes | None, V | None]:
        """``(key, answer)``: key None when no cached answer could ever do (malformed,
        nonce, several CertIDs); answer None on a miss."""
        key = self.keys.key(der)
        if key is None:
            return None, None
        value = self.cache.lookup(key)
        if value is not None:
            self.keys.remember(der, key)
        return key, value
