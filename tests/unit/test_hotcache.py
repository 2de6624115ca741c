"""The bounded hot cache of processes that serve but do not sign (fronts, server replicas)."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from hsmocsp.handle import SignedResponse
from hsmocsp.hotcache import HotCache, RequestCache, RequestKeys, max_age_for, request_key
from hsmocsp.ocsp.request import parse_request
from tests.unit.test_responder import request_for

T0 = 1_750_000_000.0


def response(
    n: int = 0, *, refresh_in: float = 50.0, valid_for: float = 100.0, cacheable: bool = True
) -> SignedResponse:
    return SignedResponse(
        der=b"resp-%d" % n, produced_at=T0, this_update=T0, next_update=T0 + valid_for,
        refresh_at=T0 + refresh_in, etag=f'"{n}"', cacheable=cacheable,
    )  # fmt: skip


def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


def test_lookup_counts_hits_and_misses() -> None:
    cache: HotCache[SignedResponse] = HotCache(clock().seconds, max_entries=10)
    value = response()
    cache.put(b"k", 1, value)
    assert cache.lookup(b"k") is value
    assert cache.lookup(b"other") is None
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_bounded_least_recently_used_first_out() -> None:
    cache: HotCache[SignedResponse] = HotCache(clock().seconds, max_entries=3)
    for n in range(3):
        cache.put(b"k%d" % n, n, response(n))
    assert cache.lookup(b"k0") is not None  # k0 used: k1 is now the oldest
    cache.put(b"k3", 3, response(3))
    assert len(cache) == 3 and cache.stats.evicted == 1
    assert b"k1" not in cache and b"k0" in cache
    for n in range(4, 1000):
        cache.put(b"k%d" % n, n, response(n))
    assert len(cache) == 3
    assert cache.stats.evicted == 997
    # The serial index follows evictions: nothing left about serials no longer held.
    assert set(cache._by_serial) == {997, 998, 999}


def test_replacing_a_key_keeps_one_entry() -> None:
    cache: HotCache[SignedResponse] = HotCache(clock().seconds, max_entries=3)
    cache.put(b"k", 1, response(1))
    newer = response(2)
    cache.put(b"k", 1, newer)
    assert len(cache) == 1 and cache.lookup(b"k") is newer


def test_invalidate_by_serial_and_all() -> None:
    cache: HotCache[SignedResponse] = HotCache(clock().seconds, max_entries=10)
    cache.put(b"sha1-of-5", 5, response(1))
    cache.put(b"sha256-of-5", 5, response(2))  # two CertID hash variants, one serial
    cache.put(b"sha1-of-6", 6, response(3))
    cache.invalidate(frozenset({5, 99}))
    assert cache.lookup(b"sha1-of-5") is None and cache.lookup(b"sha256-of-5") is None
    assert cache.lookup(b"sha1-of-6") is not None
    assert cache.stats.invalidated == 2
    cache.invalidate(None)
    assert len(cache) == 0 and cache.stats.invalidated == 3
    assert cache.lookup(b"sha1-of-6") is None


def test_refresh_point_expiry_and_nonce_answers_are_not_served() -> None:
    c = clock()
    cache: HotCache[SignedResponse] = HotCache(c.seconds, max_entries=10)
    cache.put(b"nonce", 1, response(cacheable=False))
    assert len(cache) == 0  # never kept: it could never be served
    cache.put(b"k", 2, response(refresh_in=50, valid_for=100))
    c.advance(49.5)
    assert cache.lookup(b"k") is not None
    c.advance(0.5)  # at the refresh point: the signer answers (and refreshes)
    assert cache.lookup(b"k") is None
    assert b"k" in cache  # kept until it expires (the next put replaces it)
    c.advance(50)
    assert cache.lookup(b"k") is None
    assert b"k" not in cache  # expired: dropped
    cache.put(b"late", 3, response())  # expired already: not kept
    assert len(cache) == 0


def test_a_value_past_its_certificate_is_not_served() -> None:
    import dataclasses

    c = clock()
    cache: HotCache[SignedResponse] = HotCache(c.seconds, max_entries=10)
    value = dataclasses.replace(response(), cert_not_after=T0 + 10)
    cache.put(b"k", 1, value)
    c.advance(10)
    assert cache.lookup(b"k") is None


def test_max_age_for() -> None:
    value = response(valid_for=100)
    assert max_age_for(value, T0, None) == 100
    assert max_age_for(value, T0 + 30.5, None) == 69
    assert max_age_for(value, T0, 60) == 60
    assert max_age_for(value, T0 + 200, 60) == 0


def test_request_key() -> None:
    plain = request_for(7)
    assert request_key(plain, "echo") == parse_request(plain).cert_ids[0].der
    with_nonce = request_for(7, nonce=True)
    assert request_key(with_nonce, "echo") is None  # the nonce must be echoed: signer
    assert request_key(with_nonce, "ignore") == parse_request(plain).cert_ids[0].der
    assert request_key(b"\x30\x03abc", "echo") is None


def test_request_memo_holds_only_answered_requests_and_stays_bounded() -> None:
    c = clock()
    cache: RequestCache[SignedResponse] = RequestCache(c.seconds, "echo", max_entries=50,
                                                       max_memo=20)  # fmt: skip
    known = request_for(1)
    key = request_key(known, "echo")
    assert key is not None
    cache.cache.put(key, 1, response())
    assert cache.find(known) == (key, cache.cache.lookup(key))
    assert len(cache.keys) == 1
    # A flood of random bytes and of serials nobody holds: parsed, answered None, not kept.
    for n in range(500):
        assert cache.find(os.urandom(40))[1] is None
        assert cache.find(request_for(1000 + n))[1] is None
    assert len(cache.keys) == 1
    # Answerable requests fill it up to its bound, no further.
    for n in range(100):
        req = request_for(2000 + n)
        k = request_key(req, "echo")
        assert k is not None
        cache.cache.put(k, 2000 + n, response(n))
        assert cache.find(req)[1] is not None
        assert len(cache.keys) <= 20


def test_request_keys_remember_skips_the_parse() -> None:
    keys = RequestKeys("echo", max_entries=2)
    keys.remember(b"not a request", b"key")
    assert keys.key(b"not a request") == b"key"
    assert keys.key(b"other") is None


def test_at_least_one_entry() -> None:
    with pytest.raises(ValueError):
        HotCache(clock().seconds, max_entries=0)
