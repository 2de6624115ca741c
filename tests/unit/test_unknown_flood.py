"""Floods of serials the source does not know (#9 item 7).

The bound: answers ``unknown`` live in their own LRU of ``max_unknown_cached``
entries per handle (default 10,000), never in the main cache, never in the store,
never pushed to the HTTP fronts. So a flood of random serials costs at most that
many responses of memory per handle and no disk, however long it lasts; known
serials keep their cache entries through it.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from hsmocsp.cache import ResponseCache
from hsmocsp.handle import SignedResponse
from hsmocsp.status import CertStatus
from hsmocsp.stores.sqlite import ResponseStore
from tests.factories import handle as make_handle
from tests.unit.test_responder import make, parsed, request_for, resolve


class FrontFeed:
    """A cache observer like the fronts' feed: what would be pushed to a front."""

    def __init__(self) -> None:
        self.pushed: list[int] = []

    def stored(self, key: bytes, serial: int, value: Any) -> None:
        self.pushed.append(serial)

    def dropped(self, key: bytes) -> None:
        pass

    def invalidated(self, serials: frozenset[int] | None) -> None:
        pass


def _flooded(tmp_path: Path, max_unknown: int, flood: int) -> tuple[Any, ...]:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    handle.cache = cache = ResponseCache(
        clock.seconds, transient=SignedResponse.is_unknown, max_transient=max_unknown
    )
    source.on_change(cache.invalidate)
    store = ResponseStore(tmp_path / "r.sqlite", clock, run_in_thread=maybeDeferred)
    cache.on_store = store.recorder(handle.name, handle.key_hash)
    front = FrontFeed()
    cache.observers.append(front)
    store.start()
    resolve(handle.respond_der(request_for(1)))  # a known serial, cached and stored
    rng = random.Random(9)
    serials = [rng.getrandbits(64) | 1 << 70 for _ in range(flood)]
    for serial in serials:
        assert parsed(resolve(handle.respond_der(request_for(serial)))).certificate_status.name == (
            "UNKNOWN"
        )
        clock.advance(0.01)
    clock.advance(2)
    return handle, source, signer, cache, store, front.pushed, serials


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT count(*) FROM responses").fetchone()[0]
        return count


def test_unknown_answers_stay_in_a_small_lru_and_out_of_the_store(tmp_path: Path) -> None:
    handle, _source, signer, cache, store, stored, serials = _flooded(tmp_path, 50, 400)
    assert len(cache) == 1 + 50  # the known serial + the bound
    assert cache.transient_entries() == 50
    assert _rows(tmp_path / "r.sqlite") == 1  # only the known serial
    assert stored == [1]  # fronts never got an unknown answer
    # The known serial is still a cache hit after the flood.
    calls = signer.calls
    resolve(handle.respond_der(request_for(1)))
    assert signer.calls == calls
    # The most recent unknowns are still answered from the LRU without signing...
    resolve(handle.respond_der(request_for(serials[-1])))
    assert signer.calls == calls
    # ...the oldest were evicted and are signed again.
    resolve(handle.respond_der(request_for(serials[0])))
    assert signer.calls == calls + 1
    _stop(store)


def test_serial_becoming_known_drops_its_unknown_answer(tmp_path: Path) -> None:
    handle, source, _signer, cache, store, _stored, serials = _flooded(tmp_path, 50, 60)
    serial = serials[-1]
    source.set(serial, CertStatus.good())  # issued now: the index reload names it
    answer = parsed(resolve(handle.respond_der(request_for(serial))))
    assert answer.certificate_status.name == "GOOD"
    assert cache.transient_entries() == 49
    store.flush()
    assert _rows(tmp_path / "r.sqlite") == 2
    cache.invalidate(None)  # a full reload forgets the unknowns too
    assert cache.transient_entries() == 0 and len(cache) == 0
    _stop(store)


def test_store_never_records_unknown_even_without_the_split_cache(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, _, _ = make(clock)  # the handle's own default cache
    store = ResponseStore(tmp_path / "r.sqlite", clock, run_in_thread=maybeDeferred)
    handle.cache.on_store = store.recorder(handle.name, handle.key_hash)
    for serial in (1, 2, 77, 78, 79):
        resolve(handle.respond_der(request_for(serial)))
    store.flush()
    assert _rows(tmp_path / "r.sqlite") == 2
    assert handle.cache.transient_entries() == 3
    _stop(store)


def _stop(store: ResponseStore) -> None:
    done: list[object] = []
    d: Deferred[None] = store.stop()
    d.addBoth(done.append)
    assert done == [None]


def test_handle_keeps_the_cache_it_is_given_even_empty() -> None:
    """An empty ResponseCache is falsy (it has a length): ``cache or default`` dropped the
    configured one, so max_cached and max_unknown_cached never applied."""
    clock = Clock()
    clock.advance(1_750_000_000)
    handle, source, signer = make(clock)
    given: ResponseCache[SignedResponse] = ResponseCache(clock.seconds, max_entries=5)
    again = make_handle(
        source=source, signer=signer, cache=given, responder_cert=handle.responder_cert,
        validity=60, clock=clock,
    )  # fmt: skip
    assert again.cache is given
