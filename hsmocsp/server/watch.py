"""How long a server replica may trust its hot cache: the invalidation subscription.

The signer publishes the serials whose status changed (a revocation loaded) after it
deleted their stored responses; every server drops them from its hot cache when the
message arrives. The bound of issue #11 ("no server answers ``good`` for a serial
later than 1 s after the signer loaded its revocation") holds as long as messages
arrive. When the subscription is down, they may not; so:

* while the subscription is live, hot-cache answers are served as they are;
* when it is lost (the store says so: ``on_subscription(False)``), an answer is served
  from the hot cache only within ``bound`` seconds of being re-checked against the
  store or the signer (each server handle keeps those times, :class:`Rechecks`); the
  first request after that re-checks it (one re-check per key at a time). What was
  held before the loss is re-checked at once: the store notices a dead connection up
  to its ping interval + timeout late, and that delay already spends the bound;
* when it is back (``on_subscription(True)``), the messages of the gap are lost: every
  hot cache is emptied, and lookups that began before are not cached (:attr:`epoch`).

The store must notice a dead subscriber connection itself within the bound (RedisStore
pings the subscribed connection every ``store.timeout``/2 and gives up after
``store.timeout``: 0.75 s with the default 0.5 s), or the gap between the loss and its
notice is not covered: see docs/design-replicas.md, section "Server role".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from twisted.logger import Logger

from hsmocsp.health import READY, Health, State

log = Logger()

__all__ = ["DEFAULT_BOUND", "Invalidated", "InvalidationWatch", "Rechecks"]

#: Seconds after the signer loaded a revocation within which no server may answer ``good``.
DEFAULT_BOUND = 1.0


class Invalidated(Protocol):
    """What the watch tells of invalidations (a :class:`~hsmocsp.server.handle.ServerHandle`)."""

    @property
    def name(self) -> str: ...

    def invalidate(self, serials: frozenset[int] | None) -> None: ...


class InvalidationWatch:
    """The state of the store's invalidation subscription, for every handle of a server.

    Its two methods are the listeners given to ``SharedStore.subscribe``.
    """

    def __init__(self, now: Callable[[], float], bound: float = DEFAULT_BOUND) -> None:
        self._now = now
        self.bound = bound
        self.live = False
        #: Increased each time the subscription is (re-)established.
        self.epoch = 0
        self._lost_at: float | None = None
        self._handles: dict[str, Invalidated] = {}
        self.messages = 0

    def watch(self, handles: Iterable[Invalidated]) -> None:
        for handle in handles:
            self._handles[handle.name] = handle

    def on_invalidate(self, handle: str, serials: frozenset[int] | None) -> None:
        """A message from the signer: ``serials`` of ``handle`` changed (None: all)."""
        self.messages += 1
        target = self._handles.get(handle)
        if target is not None:
            target.invalidate(serials)

    def on_subscription(self, live: bool) -> None:
        """The store established (True) or lost (False) the subscription."""
        if live:
            self.epoch += 1
            was_lost = self._lost_at is not None
            self.live = True
            self._lost_at = None
            for target in self._handles.values():
                target.invalidate(None)  # what was published meanwhile is lost
            if was_lost:
                log.info("invalidations: subscribed again; hot caches emptied")
            return
        if self.live:
            log.warn(
                "invalidations: subscription lost; hot-cache answers are re-checked "
                "against the store or the signer every {bound:g} s until it is back",
                bound=self.bound,
            )
        self.live = False
        if self._lost_at is None:
            self._lost_at = self._now()

    def trusted_until(self) -> float:
        """Until when a hot-cache entry held before the loss may be served without a
        re-check (infinite while live; before the first subscription: never)."""
        if self.live:
            return float("inf")
        if self._lost_at is None:
            return float("-inf")
        # Not + bound: the store noticed the loss up to its ping interval + timeout after
        # the last message could arrive, which already spends the bound.
        return self._lost_at

    def health(self) -> Health:
        if self.live:
            return READY
        if self._lost_at is None and self.epoch == 0:
            why = "not subscribed yet"
        else:
            why = "subscription lost"
        return Health(
            State.DEGRADED,
            f"invalidations: {why} (hot-cache answers re-checked every {self.bound:g} s)",
        )


class Rechecks:
    """When each key was last confirmed against the store or the signer while the
    subscription was down; only the last ``bound`` seconds matter, so it stays small
    (at most the keys confirmed in that window, ``max_entries`` anyway)."""

    def __init__(self, bound: float, max_entries: int) -> None:
        self.bound = bound
        self.max_entries = max(1, max_entries)
        self._at: OrderedDict[bytes, float] = OrderedDict()

    def confirmed(self, key: bytes, now: float) -> None:
        self._at.pop(key, None)
        self._at[key] = now
        while self._at:
            first, at = next(iter(self._at.items()))
            if now - at <= self.bound and len(self._at) <= self.max_entries:
                break
            del self._at[first]

    def fresh(self, key: bytes, now: float) -> bool:
        at = self._at.get(key)
        return at is not None and now - at <= self.bound

    def forget(self, serial_keys: Iterable[bytes] | None = None) -> None:
        if serial_keys is None:
            self._at.clear()
            return
        for key in serial_keys:
            self._at.pop(key, None)

    def __len__(self) -> int:
        return len(self._at)
