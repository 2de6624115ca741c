"""RedisStore (hsmocsp/stores/redis.py) against real redis-server / redis-sentinel
processes: what a signer writes a second store reads back byte-exact, TTL = nextUpdate,
invalidations delete and publish, Redis down/slow/back, Sentinel failover, TLS + ACL."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from hsmocsp.config import RedisAddress, Secret, StoreConfig, StoreTLSConfig
from hsmocsp.errors import StoreUnavailable
from hsmocsp.handle import SignedResponse
from hsmocsp.health import State
from hsmocsp.stores.codec import encode
from hsmocsp.stores.redis import RedisStore, field_of, response_key
from tests.conftest import LoggedErrors
from tests.redisfixtures import (
    MASTER_NAME,
    RedisFactory,
    RedisServer,
    SentinelSet,
    Stores,
    TlsFiles,
)

reactor: Any = _reactor


def response(serial: int, status: str = "good", life: float = 3600, **kw: Any) -> SignedResponse:
    now = time.time()
    return SignedResponse(
        der=b"\x30\x03\x0a\x01" + bytes([serial % 256]) + b"signed",
        produced_at=int(now),
        this_update=int(now),
        next_update=int(now) + life,
        refresh_at=int(now) + life / 2,
        etag=f'"{serial:x}"',
        cacheable=True,
        status_key=status,
        **kw,
    )


def cfg_for(server: RedisServer, **kw: Any) -> StoreConfig:
    return StoreConfig(
        kind="redis", address=RedisAddress("127.0.0.1", server.port), timeout=0.3, **kw
    )


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


async def fetched(store: RedisStore, handle: str, key: bytes, serial: int) -> Any:
    try:
        return await store.fetch(handle, key, serial)
    except StoreUnavailable as err:
        return err


@pytest_twisted.ensureDeferred
async def test_written_then_read_back_byte_exact_with_ttl(
    redis_server: RedisServer, stores: Stores
) -> None:
    signer = stores(cfg_for(redis_server))
    server = stores(cfg_for(redis_server), start=False)
    record = signer.recorder("root")
    good, revoked = response(0x1A), response(0x2B, "revoked:1700000000:1", life=600)
    record(b"certid-1a", 0x1A, good)
    record(b"certid-1a-sha256", 0x1A, replace(good, etag='"other"'))
    record(b"certid-2b", 0x2B, revoked)
    # Never stored: unknown serials, uncacheable (nonce) answers, already expired ones.
    record(b"certid-unknown", 0x3C, response(0x3C, "unknown"))
    record(b"certid-nonce", 0x4D, replace(response(0x4D), cacheable=False))
    record(b"certid-old", 0x5E, response(0x5E, life=-10))
    await until(lambda: signer.written == 3, "three responses written")
    assert signer.pending == 0 and signer.health().state is State.READY

    assert await server.fetch("root", b"certid-1a", 0x1A) == good
    assert await server.fetch("root", b"certid-2b", 0x2B) == revoked
    assert await server.fetch("root", b"certid-unknown", 0x3C) is None
    assert await server.fetch("root", b"certid-nonce", 0x4D) is None
    assert await server.fetch("other-handle", b"certid-1a", 0x1A) is None
    # The layout of REPLICAS.md, byte for byte: one hash per (handle, serial).
    assert response_key("hsmocsp:", "root", 0x2B) == b"hsmocsp:r:root:2b"
    stored = redis_server.cmd("HGET", "hsmocsp:r:root:2b", field_of(b"certid-2b"))
    assert stored == encode(revoked)
    assert redis_server.cmd("HLEN", "hsmocsp:r:root:1a") == 2
    assert sorted(redis_server.cmd("KEYS", "*")) == [
        b"hsmocsp:r:root:1a", b"hsmocsp:r:root:2b", b"hsmocsp:signer",  # + the writer's marker
    ]
    # TTL: the latest nextUpdate in the hash, never shortened by an earlier one.
    assert redis_server.cmd("EXPIRETIME", "hsmocsp:r:root:2b") == int(revoked.next_update)
    later = replace(good, next_update=good.next_update + 500)
    record(b"certid-1a-sha384", 0x1A, later)
    await until(lambda: signer.written == 4, "the later response")
    record(b"certid-1a-sha512", 0x1A, replace(good, next_update=good.next_update - 500))
    await until(lambda: signer.written == 5, "the earlier response")
    assert redis_server.cmd("EXPIRETIME", "hsmocsp:r:root:1a") == int(later.next_update)


@pytest_twisted.ensureDeferred
async def test_forget_deletes_and_publishes(redis_server: RedisServer, stores: Stores) -> None:
    signer = stores(cfg_for(redis_server))
    server = stores(cfg_for(redis_server), start=False)
    seen: list[tuple[str, frozenset[int] | None]] = []
    states: list[bool] = []
    server.subscribe(lambda handle, serials: seen.append((handle, serials)), states.append)
    await until(lambda: states == [True], "subscribed")
    record = signer.recorder("root")
    for serial in (1, 2, 3):
        record(b"k%d" % serial, serial, response(serial))
    await until(lambda: signer.written == 3, "written")
    record(b"k1", 1, response(1, "good"))  # queued, then the serial is revoked: never written
    signer.forget("root", frozenset({1, 2}))
    await until(lambda: seen == [("root", frozenset({1, 2}))], "the invalidation")
    assert await server.fetch("root", b"k1", 1) is None
    assert await server.fetch("root", b"k2", 2) is None
    assert await server.fetch("root", b"k3", 3) is not None
    signer.forget("root", None)
    await until(lambda: seen[-1] == ("root", None), "invalidate all")
    assert redis_server.cmd("KEYS", "*") == [b"hsmocsp:signer"]
    assert signer.written == 3


@pytest_twisted.ensureDeferred
async def test_redis_down_then_back(
    redis_server: RedisServer, stores: Stores, logged_errors: LoggedErrors
) -> None:
    from twisted.logger import globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "hsmocsp.stores.redis":
            from twisted.logger import formatEvent

            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        signer = stores(cfg_for(redis_server, max_pending=50), max_backoff=0.2)
        server = stores(cfg_for(redis_server), start=False)
        states: list[bool] = []
        seen: list[tuple[str, frozenset[int] | None]] = []
        server.subscribe(lambda h, s: seen.append((h, s)), states.append)
        await until(lambda: states == [True], "subscribed")
        record = signer.recorder("root")
        record(b"k0", 0, response(0))
        await until(lambda: signer.written == 1, "first write")
        redis_server.stop()
        await until(lambda: states == [True, False], "the subscription seen lost")
        for serial in range(1, 61):
            record(b"k%d" % serial, serial, response(serial))
        signer.forget("root", frozenset({0}))  # a revocation while Redis is down
        await until(lambda: signer.write_errors >= 3, "failed writes")
        assert signer.pending == 50 and signer.dropped == 10  # bounded: newest kept
        health = signer.health()
        assert health.state is State.DEGRADED and "cannot write" in health.reason
        assert isinstance(await fetched(server, "root", b"k0", 0), StoreUnavailable)
        assert server.health().state is State.DEGRADED
        redis_server.start()  # empty: it kept nothing
        # Before the reactor runs again (the signer cannot act meanwhile): a stale copy of
        # the revoked serial, and a listener on the invalidation channel.
        redis_server.cmd("HSET", "hsmocsp:r:root:0", "stale", "good")
        listener = redis_server.subscribe("hsmocsp:inv")
        await until(lambda: signer.pending == 0 and signer.health().ready, "caught up")
        await until(lambda: states[-1] is True, "re-subscribed")
        assert signer.written == 51
        assert await server.fetch("root", b"k60", 60) is not None
        assert await server.fetch("root", b"k10", 10) is None  # dropped from the full queue
        assert server.health().ready
        cannot = [line for line in lines if "cannot write" in line]
        again = [line for line in lines if "writing again" in line]
        assert len(cannot) == 1 and len(again) == 1, lines
        assert len([line for line in lines if "cannot read" in line]) == 1, lines
        # The revocation made while Redis was down reached it once it came back: the
        # serial's hash is deleted and the invalidation published.
        assert redis_server.cmd("EXISTS", "hsmocsp:r:root:0") == 0
        from twisted.internet.threads import deferToThread

        assert await deferToThread(listener.next, 5) == b"root 0"
        listener.close()
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_slow_redis_fails_reads_fast(redis_server: RedisServer, stores: Stores) -> None:
    server = stores(cfg_for(redis_server), start=False)
    signer = stores(cfg_for(redis_server))
    signer.recorder("root")(b"k", 7, response(7))
    await until(lambda: signer.written == 1, "written")
    assert await server.fetch("root", b"k", 7) is not None  # connected
    redis_server.cmd("CLIENT", "PAUSE", 1500, "ALL")
    got = await fetched(server, "root", b"k", 7)
    # It did not wait for the 1.5 s pause: it gave up after its 0.3 s timeout.
    assert isinstance(got, StoreUnavailable) and "no answer within 0.3 s" in str(got)
    # Once the pause is over, reads work again by themselves.
    answers: list[Any] = []
    deadline = time.monotonic() + 15
    while not answers or isinstance(answers[-1], StoreUnavailable):
        assert time.monotonic() < deadline, answers
        answers.append(await fetched(server, "root", b"k", 7))
        await task.deferLater(reactor, 0.05, lambda: None)
    assert answers[-1] == await server.fetch("root", b"k", 7)
    assert server.health().ready


@pytest_twisted.ensureDeferred
async def test_unreadable_value_is_a_miss(redis_server: RedisServer, stores: Stores) -> None:
    server = stores(cfg_for(redis_server), start=False)
    redis_server.cmd("HSET", "hsmocsp:r:root:9", field_of(b"k"), b"\x07garbage")
    assert await server.fetch("root", b"k", 9) is None
    assert server.stats.bad_values == 1


@pytest_twisted.ensureDeferred
async def test_sentinel_failover(redis_sentinel: SentinelSet, stores: Stores) -> None:
    cfg = StoreConfig(
        kind="redis",
        sentinels=tuple(RedisAddress("127.0.0.1", s.port) for s in redis_sentinel.sentinels),
        master_name=MASTER_NAME,
        timeout=0.3,
    )
    signer = stores(cfg, max_backoff=0.2)
    server = stores(cfg, start=False)
    record = signer.recorder("root")
    record(b"k1", 1, response(1))
    await until(lambda: signer.written == 1, "written to the first primary")
    assert await server.fetch("root", b"k1", 1) is not None
    old = redis_sentinel.primary()
    first = await server.fetch("root", b"k1", 1)
    assert old.pipeline([("HSET", "hsmocsp:probe", "x", "1"), ("WAIT", 1, 2000)])[1] == 1
    old.kill()
    record(b"k2", 2, response(2))
    # While the sentinels fail over, every read is the right answer or "unavailable"
    # (the server then forwards to the signer): never another response, never a hang.
    answers: list[Any] = []
    failing_over = _failover(redis_sentinel, old.port)
    while not failing_over.called:
        answers.append(await fetched(server, "root", b"k1", 1))
        await task.deferLater(reactor, 0.02, lambda: None)
    new = await failing_over
    assert all(a == first or isinstance(a, StoreUnavailable) for a in answers), answers
    await until(lambda: signer.written == 2, "written to the promoted replica", timeout=30)
    assert new.cmd("HEXISTS", "hsmocsp:r:root:2", field_of(b"k2")) == 1
    assert signer.connector.current == RedisAddress("127.0.0.1", new.port)
    value: Any = None
    deadline = time.monotonic() + 30
    while value is None or isinstance(value, StoreUnavailable):
        assert time.monotonic() < deadline, value
        value = await fetched(server, "root", b"k2", 2)
        await task.deferLater(reactor, 0.05, lambda: None)
    assert value.der == response(2).der
    assert await server.fetch("root", b"k1", 1) == first
    # The old primary comes back as a replica: writes never go there (ROLE checked).
    old.start()
    record(b"k3", 3, response(3))
    await until(lambda: signer.written == 3, "written after the old primary returned")
    assert new.cmd("HEXISTS", "hsmocsp:r:root:3", field_of(b"k3")) == 1


def _failover(sentinels: SentinelSet, old_port: int) -> Any:
    from twisted.internet.threads import deferToThread

    return deferToThread(sentinels.wait_failover, old_port)


@pytest_twisted.ensureDeferred
async def test_tls_and_acl_user_with_password_file(
    redis_factory: RedisFactory, redis_tls: TlsFiles, tmp_path: Path, stores: Stores
) -> None:
    server = redis_factory(
        password="admin-pw",
        acl=[
            "user hsmocsp on >user-pw ~hsmocsp:* &hsmocsp:* resetchannels &hsmocsp:*"
            " +@read +@write +@pubsub +@connection +role +scan"
        ],
        tls=redis_tls,
    )
    pw = tmp_path / "redis-password"
    pw.write_text("user-pw\n")
    cfg = StoreConfig(
        kind="redis",
        address=RedisAddress("127.0.0.1", server.port),
        username="hsmocsp",
        password=Secret(file=pw),
        tls=StoreTLSConfig(
            ca_file=redis_tls.ca,
            cert_file=redis_tls.client_cert,
            key_file=redis_tls.client_key,
            server_name=None,
        ),
        timeout=0.5,
    )
    signer = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(signer)
    signer.start()
    reader = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(reader)
    signer.recorder("root")(b"k", 5, response(5))
    await until(lambda: signer.written == 1, "written over TLS as the ACL user")
    assert await reader.fetch("root", b"k", 5) is not None
    clients = server.cmd("CLIENT", "LIST").decode()
    assert "user=hsmocsp" in clients and "name=hsmocsp-signer" in clients
    # A wrong password is refused with Redis's reason, and the password is in no message.
    pw.write_text("wrong-pw")
    wrong = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(wrong)
    err = await fetched(wrong, "root", b"k", 5)
    assert isinstance(err, StoreUnavailable) and "WRONGPASS" in str(err)
    assert "wrong-pw" not in str(err) and "wrong-pw" not in str(wrong.health())
    # A server certificate from another CA is refused.
    other = make_other_ca(tmp_path)
    bad = stores(replace(cfg, tls=replace(cfg.tls, ca_file=other)), start=False,  # type: ignore[type-var]
                 password="user-pw")
    err = await fetched(bad, "root", b"k", 5)
    assert isinstance(err, StoreUnavailable)


def make_other_ca(tmp_path: Path) -> Path:
    from tests.redisfixtures import make_tls_files

    return make_tls_files(tmp_path / "other-ca").ca


@pytest_twisted.ensureDeferred
async def test_an_idle_signer_notices_redis_down_and_back(
    redis_server: RedisServer, stores: Stores
) -> None:
    signer = stores(cfg_for(redis_server), start=False, max_backoff=0.2)
    signer.recorder("root")  # a writer
    signer.start()
    await until(lambda: signer.connected, "connected at start, nothing signed yet")
    redis_server.stop()
    await until(lambda: not signer.health().ready, "degraded while idle")
    assert not signer.connected and "cannot write" in signer.health().reason
    redis_server.start()
    await until(lambda: signer.health().ready and signer.connected, "ready again")


@pytest_twisted.ensureDeferred
async def test_unix_socket(redis_factory: RedisFactory, tmp_path: Path, stores: Stores) -> None:
    sock = tmp_path / "redis.sock"
    redis_factory(extra=[f"unixsocket {sock}", "unixsocketperm 700"])
    cfg = StoreConfig(kind="redis", address=RedisAddress(unix=sock), timeout=0.3)
    signer, reader = stores(cfg), stores(cfg, start=False)
    signer.recorder("root")(b"k", 1, response(1))
    await until(lambda: signer.written == 1, "written over the socket")
    assert (await reader.fetch("root", b"k", 1)) is not None


@pytest_twisted.ensureDeferred
async def test_a_stalled_subscription_is_noticed_and_made_again(
    redis_server: RedisServer, stores: Stores
) -> None:
    import threading

    server = stores(cfg_for(redis_server), start=False)
    signer = stores(cfg_for(redis_server))
    signer.recorder("root")
    states: list[bool] = []
    seen: list[tuple[str, frozenset[int] | None]] = []
    server.subscribe(lambda h, s: seen.append((h, s)), states.append)
    await until(lambda: states == [True], "subscribed")
    # Redis answers nobody for 2 s: the connection is up, the subscription is not live.
    stall = threading.Thread(target=redis_server.cmd, args=("DEBUG", "SLEEP", 2))
    stall.start()
    try:
        await until(lambda: states == [True, False], "the stalled subscription noticed")
        assert server.health().state is State.DEGRADED
        assert "not subscribed" in server.health().reason
    finally:
        from twisted.internet.threads import deferToThread

        await deferToThread(stall.join)
    await until(lambda: states == [True, False, True], "subscribed again")
    signer.forget("root", frozenset({0x99}))
    await until(lambda: seen == [("root", frozenset({0x99}))], "an invalidation delivered")
    assert server.health().ready


@pytest_twisted.ensureDeferred
async def test_database_and_key_prefix(redis_server: RedisServer, stores: Stores) -> None:
    signer = stores(cfg_for(redis_server, database=3, key_prefix="ocsp/"))
    signer.recorder("root")(b"k", 0xAB, response(0xAB))
    await until(lambda: signer.written == 1, "written")
    keys = redis_server.pipeline([("SELECT", 3), ("KEYS", "*")])[1]
    assert sorted(keys) == [b"ocsp/r:root:ab", b"ocsp/signer"]
    assert redis_server.cmd("KEYS", "*") == []  # nothing in database 0


@pytest_twisted.ensureDeferred
async def test_redis_back_empty_gets_everything_held_again(
    redis_server: RedisServer, stores: Stores
) -> None:
    from hsmocsp.cache import ResponseCache

    cache: ResponseCache[SignedResponse] = ResponseCache(reactor.seconds)
    signer = stores(cfg_for(redis_server), start=False, max_backoff=0.2)
    cache.observers.append(signer.observer("root", cache))
    signer.start()
    for serial in (1, 2, 3):
        cache.put(b"k%d" % serial, serial, response(serial))
    await until(lambda: signer.written == 3, "written")
    assert signer.resyncs == 1  # a fresh Redis: nothing to write yet, the marker set
    redis_server.stop()
    redis_server.start()  # without its data
    cache.invalidate([2])  # revoked meanwhile: must not come back from the resync
    await until(lambda: signer.resyncs == 2 and signer.written == 5, "written again")
    assert redis_server.cmd("EXISTS", "hsmocsp:r:root:1", "hsmocsp:r:root:3") == 2
    assert redis_server.cmd("EXISTS", "hsmocsp:r:root:2") == 0
    redis_server.cmd("HSET", "hsmocsp:r:root:9", "x", "y")  # a Redis that kept its data:
    signer._writer.drop("test")  # a new connection finds the marker, writes nothing again
    await until(lambda: signer._writer.connected, "reconnected")
    await signer.flush()
    assert signer.resyncs == 2 and signer.written == 5


@pytest_twisted.ensureDeferred
async def test_stop_fires_once_every_connection_is_closed(redis_server: RedisServer) -> None:
    """Seen as leftover ``connectionLost`` calls on the real reactor after every test here
    (tests/conftest.py): stop() aborted its connections and fired at once, before the
    reactor had closed them."""
    store = RedisStore(cfg_for(redis_server), reactor)
    store.start()
    states: list[bool] = []
    store.subscribe(lambda handle, serials: None, states.append)
    store.recorder("root")(b"certid", 0x1A, response(0x1A))
    await until(lambda: states == [True] and store.written == 1, "subscribed and written")
    assert await store.fetch("root", b"certid", 0x1A) is not None  # the reader connects too
    before = set(reactor.getDelayedCalls())
    await store.stop()
    left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    assert left == [], [c.func for c in left]
    assert not store.connected
