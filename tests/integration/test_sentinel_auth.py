"""RedisStore discovery through sentinels that require authentication themselves
(``requirepass`` / an ACL user in sentinel.conf), and through sentinels over TLS:
real ``redis-sentinel`` processes (tests/redisfixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from hsmocsp.config import RedisAddress, Secret, StoreConfig, StoreTLSConfig
from hsmocsp.errors import StoreUnavailable
from hsmocsp.health import State
from hsmocsp.stores.redis import RedisStore
from tests.integration.test_redis_store import fetched, response, until
from tests.redisfixtures import MASTER_NAME, SentinelSet, Stores, TlsFiles, start_sentinel_set

reactor: Any = _reactor

SENTINEL_PW = "sentinel-secret-pw"
REDIS_PW = "redis-secret-pw"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[SentinelSet]:
    """A primary (requirepass), a replica and one sentinel with its own requirepass."""
    watched = start_sentinel_set(
        tmp_path / "guarded", password=REDIS_PW, sentinel_password=SENTINEL_PW
    )
    try:
        yield watched
    finally:
        watched.stop()


def sentinel_cfg(watched: SentinelSet, tmp_path: Path, **kw: Any) -> StoreConfig:
    pw = tmp_path / "redis-pw"
    pw.write_text(REDIS_PW + "\n")
    return StoreConfig(
        kind="redis",
        sentinels=tuple(RedisAddress("127.0.0.1", s.port) for s in watched.sentinels),
        master_name=MASTER_NAME,
        password=Secret(file=pw),
        timeout=0.5,
        **kw,
    )


async def a_reactor_turn() -> None:
    """Lets the discovery connections just aborted finish closing (one reactor turn)."""
    await task.deferLater(reactor, 0, lambda: None)


def assert_secret_free(*texts: str) -> None:
    for text in texts:
        assert SENTINEL_PW not in text and REDIS_PW not in text and "wrong-pw" not in text


@pytest_twisted.ensureDeferred
async def test_sentinel_with_requirepass_and_password_file(
    guarded: SentinelSet, tmp_path: Path, stores: Stores
) -> None:
    spw = tmp_path / "sentinel-pw"
    spw.write_text(SENTINEL_PW + "\n")
    cfg = sentinel_cfg(guarded, tmp_path, sentinel_password=Secret(file=spw))
    signer = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(signer)
    signer.start()
    reader = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(reader)
    signer.recorder("root")(b"k", 7, response(7))
    await until(lambda: signer.written == 1, "written to the primary the sentinel named")
    got = await reader.fetch("root", b"k", 7)
    assert got is not None and got.der == response(7).der
    primary = guarded.primary()
    assert signer.connector.current == RedisAddress("127.0.0.1", primary.port)
    assert signer.health().state is State.READY


@pytest_twisted.ensureDeferred
async def test_sentinel_acl_user_with_password_env(
    tmp_path: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched = start_sentinel_set(
        tmp_path / "acl", password=REDIS_PW, sentinel_password=SENTINEL_PW
    )
    try:
        # An ACL user on the running sentinel (Redis 6.2+ sentinels take ACL SETUSER),
        # with a password other than the default user's.
        sentinel = watched.sentinels[0]
        sentinel.cmd("ACL", "SETUSER", "discover", "on", ">acl-" + SENTINEL_PW, "+@all")
        monkeypatch.setenv("HSMOCSP_TEST_SENTINEL_PW", "acl-" + SENTINEL_PW)
        cfg = sentinel_cfg(
            watched,
            tmp_path,
            sentinel_username="discover",
            sentinel_password=Secret(env="HSMOCSP_TEST_SENTINEL_PW"),
        )
        store = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
        stores.made.append(store)
        store.recorder("root")(b"k", 8, response(8))
        store.start()
        await until(lambda: store.written == 1, "written after an ACL login to the sentinel")
        # Only the ACL user's password is configured: the default user's was not sent.
        assert store.connector.current == RedisAddress("127.0.0.1", watched.primary_port())
    finally:
        for s in stores.made:
            await s.stop()
        stores.made.clear()
        watched.stop()


@pytest_twisted.ensureDeferred
async def test_sentinel_wanting_auth_without_credentials_is_a_clear_error(
    guarded: SentinelSet, tmp_path: Path, stores: Stores
) -> None:
    # Only the primary's password is configured (what worked before sentinels asked
    # for one): the error names the sentinel and the keys to set, at once, no hang.
    cfg = sentinel_cfg(guarded, tmp_path)
    store = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(store)
    err = await fetched(store, "root", b"k", 1)
    assert isinstance(err, StoreUnavailable), err
    sentinel = guarded.sentinels[0].address
    assert f"sentinel {sentinel}: requires authentication" in str(err), err
    assert "store.sentinel_password_file" in str(err)
    assert_secret_free(str(err), str(store.health()))
    await a_reactor_turn()


@pytest_twisted.ensureDeferred
async def test_sentinel_refusing_the_password_names_the_sentinel(
    guarded: SentinelSet, tmp_path: Path, stores: Stores
) -> None:
    spw = tmp_path / "sentinel-pw"
    spw.write_text("wrong-pw\n")
    cfg = sentinel_cfg(guarded, tmp_path, sentinel_password=Secret(file=spw))
    store = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(store)
    store.recorder("root")(b"k", 2, response(2))
    store.start()
    await until(lambda: store.write_errors >= 1, "a failed write")
    err = await fetched(store, "root", b"k", 2)
    assert isinstance(err, StoreUnavailable), err
    sentinel = guarded.sentinels[0].address
    assert f"sentinel {sentinel}: AUTH refused" in str(err), err
    assert "WRONGPASS" in str(err)
    health = store.health()
    assert health.state is State.DEGRADED
    assert_secret_free(str(err), str(health))
    # The primary's password is not sent to the sentinel in its place.
    log = guarded.sentinels[0].log.read_text(errors="replace")
    assert_secret_free(log)
    await a_reactor_turn()


@pytest_twisted.ensureDeferred
async def test_tls_to_the_sentinels(
    redis_tls: TlsFiles, tmp_path: Path, stores: Stores
) -> None:
    watched = start_sentinel_set(
        tmp_path / "tls", password=REDIS_PW, sentinel_password=SENTINEL_PW, tls=redis_tls
    )
    try:
        spw = tmp_path / "sentinel-pw"
        spw.write_text(SENTINEL_PW)
        cfg = sentinel_cfg(
            watched,
            tmp_path,
            sentinel_password=Secret(file=spw),
            tls=StoreTLSConfig(
                ca_file=redis_tls.ca,
                cert_file=redis_tls.client_cert,
                key_file=redis_tls.client_key,
                server_name=None,
            ),
        )
        store = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
        stores.made.append(store)
        store.recorder("root")(b"k", 9, response(9))
        store.start()
        await until(lambda: store.written == 1, "written over TLS after TLS discovery")
        primary = watched.primary()
        clients = primary.cmd("CLIENT", "LIST").decode()
        assert "name=hsmocsp-signer" in clients
        # Discovery itself went over TLS: the sentinels have no plain port at all.
        assert watched.sentinels[0].tls is redis_tls
    finally:
        for s in stores.made:
            await s.stop()
        stores.made.clear()
        watched.stop()


@pytest_twisted.ensureDeferred
async def test_a_password_for_a_sentinel_that_wants_none_is_refused_without_echo(
    redis_sentinel: SentinelSet, tmp_path: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis answers "ERR AUTH <password> called without any password configured": the
    # placeholder, not the password; the store reports that and no secret.
    monkeypatch.setenv("HSMOCSP_TEST_SENTINEL_PW", SENTINEL_PW)
    cfg = StoreConfig(
        kind="redis",
        sentinels=tuple(RedisAddress("127.0.0.1", s.port) for s in redis_sentinel.sentinels),
        master_name=MASTER_NAME,
        sentinel_password=Secret(env="HSMOCSP_TEST_SENTINEL_PW"),
        timeout=0.5,
    )
    store = RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    stores.made.append(store)
    err = await fetched(store, "root", b"k", 1)
    assert isinstance(err, StoreUnavailable), err
    sentinel = redis_sentinel.sentinels[0].address
    assert f"sentinel {sentinel}: AUTH refused: ERR AUTH <password> called without" in str(err)
    assert_secret_free(str(err), str(store.health()))
    await a_reactor_turn()


def test_a_missing_sentinel_password_is_a_configuration_error(tmp_path: Path) -> None:
    from hsmocsp.errors import ConfigError

    cfg = StoreConfig(
        kind="redis",
        sentinels=(RedisAddress("127.0.0.1", 26379),),
        master_name=MASTER_NAME,
        sentinel_password=Secret(file=tmp_path / "absent"),
    )
    with pytest.raises(ConfigError) as info:
        RedisStore.from_config(cfg, reactor, "hsmocsp.yaml")
    assert info.value.key == "store.sentinel_password"
