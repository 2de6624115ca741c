"""The signer side of RedisStore without a Redis (a fake connection): what is written
in which order when a revocation races a batch in flight, and what a failed batch puts
back. (tests/integration/test_redis_store.py runs the same against a real Redis.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hsmocsp.cache import ResponseCache
from hsmocsp.config import RedisAddress, StoreConfig
from hsmocsp.errors import StoreUnavailable
from hsmocsp.handle import SignedResponse
from hsmocsp.stores.redis import RedisStore, parse_invalidation


class FakeProto:
    open = True

    def __init__(self) -> None:
        self.sent: list[tuple[Sequence[Any], Deferred[list[Any]]]] = []

    def pipeline(self, commands: Sequence[Any], timeout: float | None = None) -> Deferred[Any]:
        d: Deferred[list[Any]] = Deferred()
        self.sent.append((list(commands), d))
        return d

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        return self.pipeline([args]).addCallback(lambda replies: replies[0])

    def answer_all(self) -> None:
        while self.sent:
            commands, d = self.sent.pop(0)
            if not d.called:
                d.callback([1] * len(commands))


def response(serial: int, clock: Clock, status: str = "good") -> SignedResponse:
    now = clock.seconds()
    return SignedResponse(
        der=b"0" + bytes([serial]), produced_at=now, this_update=now, next_update=now + 600,
        refresh_at=now + 300, etag="e", cacheable=True, status_key=status,
    )  # fmt: skip


def made() -> tuple[RedisStore, Clock, FakeProto]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = RedisStore(
        StoreConfig(kind="redis", address=RedisAddress("127.0.0.1", 1)), clock
    )
    proto = FakeProto()
    store._writer.get = lambda: succeed(proto)  # type: ignore[method-assign,assignment,return-value]
    store.start()
    return store, clock, proto


def test_revocation_during_a_failed_batch_is_never_undone() -> None:
    store, clock, proto = made()
    cache: ResponseCache[SignedResponse] = ResponseCache(clock.seconds)
    cache.observers.append(store.observer("root"))
    cache.put(b"k1", 1, response(1, clock))
    cache.put(b"k2", 2, response(2, clock))
    clock.advance(0.05)
    (commands, batch), = proto.sent
    assert [c[0] for c in commands] == ["HSET", "EXPIREAT", "EXPIREAT"] * 2
    # Serial 1 is revoked while its "good" is being written; then the write fails.
    cache.invalidate([1])
    batch.errback(Failure(StoreUnavailable("connection lost")))
    proto.sent.clear()
    assert store.write_errors == 1 and store.pending == 1  # serial 2 kept, serial 1 not
    clock.advance(0.1)  # the retry: the deletion and its message first, then serial 2
    deletion = proto.sent[0][0]
    assert deletion == [("DEL", b"hsmocsp:r:root:1")]
    proto.sent[0][1].callback([1])
    published = proto.sent[1][0]
    assert published == [("PUBLISH", b"hsmocsp:inv", b"root 1")]
    proto.sent[1][1].callback([1])
    rewrite = proto.sent[2][0]
    assert rewrite[0] == ("HSET", b"hsmocsp:r:root:2", rewrite[0][2], rewrite[0][3])
    proto.answer_all()
    assert store.pending == 0 and store.health().ready and store.written == 1


def test_queued_responses_of_a_revoked_serial_are_dropped() -> None:
    store, clock, proto = made()
    record = store.recorder("root")
    record(b"k1", 1, response(1, clock))
    record(b"k1-sha256", 1, response(1, clock))
    record(b"k3", 3, response(3, clock))
    store.forget("root", frozenset({1}))
    clock.advance(0)
    assert proto.sent[0][0] == [("DEL", b"hsmocsp:r:root:1")]
    proto.answer_all()
    proto.answer_all()
    assert store.written == 1  # serial 3 only


def test_transient_and_uncacheable_never_queued() -> None:
    from dataclasses import replace

    store, clock, _ = made()
    record = store.recorder("root")
    record(b"u", 5, response(5, clock, "unknown"))
    record(b"n", 6, replace(response(6, clock), cacheable=False))
    record(b"s", 7, replace(response(7, clock), status_key=""))
    assert store.pending == 0


def test_invalidation_messages() -> None:
    assert parse_invalidation(b"root 1a 2b") == ("root", frozenset({0x1A, 0x2B}))
    assert parse_invalidation(b"root all") == ("root", None)
    assert parse_invalidation(b"root zz") == ("root", None)  # unreadable: all of it
    assert parse_invalidation(b"") is None
    assert parse_invalidation(b"\xff") is None
