"""One handle path of a server replica: hot cache, then the shared store, then the signer.

A ``role: server`` process holds no key, no status source and no PIN. For each
configured handle path it answers a plain OCSP request (one CertID, no nonce to echo)

1. from its bounded hot cache (:class:`~hsmocsp.hotcache.HotCache`), if the
   invalidation subscription lets it trust the entry (:mod:`hsmocsp.server.watch`);
2. else from the shared store (``store.fetch``), keeping what it finds;
3. else by forwarding the request bytes to the signer (:mod:`hsmocsp.server.forward`),
   keeping the answer when it is cacheable (:mod:`hsmocsp.server.answers`).

Concurrent misses for one CertID share one lookup (:class:`~hsmocsp.inflight.OnePerKey`).
A lookup during which the serial was invalidated, or the subscription re-established,
is redone rather than cached (it may have read the response the revocation replaced).
Requests with a nonce to echo, or several CertIDs, are always forwarded and never
cached; a malformed request is answered ``malformedRequest`` here, never forwarded.
When the store has nothing and the signer does not answer, the client gets
``tryLater`` (:class:`~hsmocsp.errors.SignerUnavailable`); a signer answering garbage
gets it ``internalError``, logged once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import StoredValueError, StoreUnavailable
from hsmocsp.handle import SignedResponse
from hsmocsp.health import READY, Health, State, log_handle_change
from hsmocsp.hotcache import HotCache, RequestKeys
from hsmocsp.inflight import OnePerKey
from hsmocsp.ocsp.request import parse_request
from hsmocsp.server.answers import BadAnswer, read_answer
from hsmocsp.server.forward import SignerLink
from hsmocsp.server.watch import InvalidationWatch, Rechecks

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from hsmocsp.config import HandleConfig
    from hsmocsp.ocsp.types import CertID
    from hsmocsp.stores import SharedStore

log = Logger()

__all__ = ["ServerHandle", "ServerStats"]

#: A stored response past its refresh point (the signer has not re-signed it yet) is
#: served for this long before the store is asked again.
STALE_RECHECK = 5.0
#: Lookups redone at most this often when invalidations keep arriving meanwhile.
MAX_ATTEMPTS = 3


@dataclass
class ServerStats:
    """What a server handle counts (read at scrape time by the metrics)."""

    store_hits: int = 0
    store_misses: int = 0
    store_errors: int = 0
    forwarded: int = 0
    forward_errors: int = 0
    invalidated: int = 0
    rechecks: int = 0


class ServerHandle:
    """A handle path served from the hot cache, the shared store and the signer."""

    def __init__(
        self,
        config: HandleConfig,
        *,
        store: SharedStore,
        signer: SignerLink,
        watch: InvalidationWatch,
        clock: IReactorTime,
        hot_entries: int = 100_000,
        store_timeout: float = 1.0,
    ) -> None:
        """``config`` is the handle's entry of ``handles:`` (validated when it was read;
        its signer and source are the signer's business, not read here); ``hot_entries``
        and ``store_timeout`` come from the replica's top-level settings
        (``hot_cache_entries``, ``store.timeout``); ``clock`` gives the time and bounds
        each store fetch."""
        self.config = config
        self.name = config.name
        self.path = config.path
        self.max_age = config.max_age
        self.nonce_policy: str = config.nonce
        self.store = store
        self.signer = signer
        self.watch = watch
        self._clock = clock
        self._now = clock.seconds
        self.store_timeout = store_timeout
        self.hot: HotCache[SignedResponse] = HotCache(self._now, hot_entries)
        self.keys = RequestKeys(self.nonce_policy)
        self.rechecks = Rechecks(watch.bound, hot_entries)
        self.stats = ServerStats()
        self._lookups: OnePerKey[bytes, SignedResponse] = OnePerKey()
        self._looking: dict[bytes, int] = {}  # key -> serial, while a lookup runs
        self._stale: set[bytes] = set()  # looked-up keys whose serial was invalidated meanwhile
        self._health: Health | None = None

    # The HTTP layer's published-file routes are the signer's: a server forwards them
    # (hsmocsp.service.server), so it declares none of its own here.
    publish_ca: str | None = None
    publish_crl: str | None = None

    # --- answering ----------------------------------------------------------------------

    def cached_response(self, der: bytes) -> SignedResponse | None:
        """The hot cache's answer, if it may be trusted now; never starts a lookup."""
        key = self.keys.key(der)
        if key is None or not self._trusted(key):
            return None
        value = self.hot.lookup(key)
        if value is not None:
            self.keys.remember(der, key)
        return value

    def respond_der(self, der: bytes) -> Deferred[SignedResponse] | SignedResponse:
        """Answer request bytes (malformed ones raise MalformedRequest here)."""
        request = parse_request(der)
        if len(request.cert_ids) != 1 or (
            request.nonce is not None and self.nonce_policy != "ignore"
        ):
            return self._forward(der, None)  # the signer echoes the nonce; never kept
        cid = request.cert_ids[0]
        key = cid.der
        if self._trusted(key):
            value = self.hot.lookup(key)
            if value is not None:
                self.keys.remember(der, key)
                return value
        return self._lookups.run(key, lambda: Deferred.fromCoroutine(self._look_up(cid, der)))

    def _trusted(self, key: bytes) -> bool:
        now = self._now()
        return now < self.watch.trusted_until() or self.rechecks.fresh(key, now)

    async def _look_up(self, cid: CertID, der: bytes) -> SignedResponse:
        """The store's answer, else the signer's; kept in the hot cache unless the serial
        was invalidated (or the subscription came back) while it was looked up."""
        key = cid.der
        value: SignedResponse | None = None
        for _ in range(MAX_ATTEMPTS):
            epoch = self.watch.epoch
            self._looking[key] = cid.serial
            self._stale.discard(key)
            try:
                value = await self._from_store(cid)
                if value is None:
                    value = await self._forward(der, cid)
            finally:
                self._looking.pop(key, None)
            if key in self._stale or epoch != self.watch.epoch:
                self._stale.discard(key)
                continue  # it may predate the change: look again
            self._keep(key, cid.serial, value)
            return value
        assert value is not None
        return value  # invalidated every time: answer the last, keep nothing

    async def _from_store(self, cid: CertID) -> SignedResponse | None:
        """The stored response, or None (not stored, expired, or the store cannot be
        asked now: then the signer is)."""
        fetch = self.store.fetch(self.name, cid.der, cid.serial)
        fetch.addTimeout(self.store_timeout, self._clock)
        try:
            value = await fetch
        except (StoreUnavailable, StoredValueError, CancelledError, TimeoutError):
            # Down, slow, failing over, or a value it cannot read: counted here, said
            # once in the log by the store (its health says why); the signer is asked.
            self.stats.store_errors += 1
            return None
        now = self._now()
        if value is None or now >= value.expires_at or not value.cacheable:
            self.stats.store_misses += 1
            return None
        self.stats.store_hits += 1
        if now >= value.refresh_at:
            # Due for re-signing, not re-signed yet: serve it (it is valid), look again soon.
            value = dataclasses.replace(
                value, refresh_at=min(now + STALE_RECHECK, value.expires_at)
            )
        return value

    def _forward(self, der: bytes, cid: CertID | None) -> Deferred[SignedResponse]:
        """Ask the signer; its answer as a SignedResponse, or the mapped error."""
        self.stats.forwarded += 1
        d = self.signer.post_ocsp(self.path, der)

        def read(answer: object) -> SignedResponse:
            from hsmocsp.server.forward import SignerAnswer

            assert isinstance(answer, SignerAnswer)
            try:
                value = read_answer(answer, cid, self._now())
            except BadAnswer as err:
                self.stats.forward_errors += 1
                raise self.signer.garbage(str(err), self.path) from err
            self.signer.answered_well()
            return value

        def failed(failure: Failure) -> Failure:
            self.stats.forward_errors += 1
            return failure

        return d.addCallbacks(read, failed)

    def _keep(self, key: bytes, serial: int, value: SignedResponse) -> None:
        if not value.cacheable or value.is_unknown():
            # ``unknown`` answers are not kept (as the signer keeps them apart and never
            # stores them): a flood of random serials must not evict the hot answers, and
            # a certificate issued a moment ago must not stay ``unknown`` here.
            return
        self.hot.put(key, serial, value)
        if not self.watch.live:
            self.rechecks.confirmed(key, self._now())
            self.stats.rechecks += 1

    # --- invalidation -------------------------------------------------------------------

    def invalidate(self, serials: frozenset[int] | None) -> None:
        """The signer published a change of these serials (None: of every serial)."""
        before = self.hot.stats.invalidated
        self.hot.invalidate(serials)
        self.stats.invalidated += self.hot.stats.invalidated - before
        if serials is None:
            self.rechecks.forget()
            self._stale.update(self._looking)
            return
        self._stale.update(k for k, s in self._looking.items() if s in serials)

    # --- HTTP headers, health -----------------------------------------------------------

    def now(self) -> float:
        return self._now()

    def health(self) -> Health:
        """Ready when the store and the signer answer and invalidations arrive; degraded
        with the reason when one of them does not; failed when neither the store nor
        the signer can be asked (only what the hot cache holds could be answered, for
        at most the revocation bound). A change of state is logged once."""
        store = self.store.health()
        signer = self.signer.health()
        reasons = [
            f"store: {store.reason or store.state.label}" if not store.ready else "",
            signer.reason if not signer.ready else "",
        ]
        if not store.ready and not signer.ready:
            health = Health(State.FAILED, "; ".join(reasons))
        elif not store.ready or not signer.ready:
            health = Health(State.DEGRADED, "".join(reasons))
        else:
            health = READY
        watch = self.watch.health()
        if not watch.ready and health.state is State.READY:
            health = watch
        elif not watch.ready and health.state is State.DEGRADED:
            health = Health(State.DEGRADED, f"{health.reason}; {watch.reason}")
        previous, self._health = self._health, health
        log_handle_change(log, self.name, previous, health)
        return health
