"""The Redis fixtures other tests build on: start, stop/start on the same port, SIGKILL,
password, TLS with a client certificate, and a Sentinel failover."""

from __future__ import annotations

import pytest

from tests.redisfixtures import RedisFactory, RedisServer, RespError, SentinelSet, TlsFiles


def test_down_and_back_on_the_same_port(redis_server: RedisServer) -> None:
    assert redis_server.cmd("SET", "k", "v") == "OK"
    port = redis_server.port
    redis_server.stop()
    with pytest.raises(OSError):
        redis_server.cmd("PING", timeout=1)
    redis_server.start()
    assert redis_server.port == port and redis_server.cmd("PING") == "PONG"
    assert redis_server.cmd("GET", "k") is None  # no persistence: a fresh empty Redis


def test_password_acl_and_tls(redis_factory: RedisFactory, redis_tls: TlsFiles) -> None:
    server = redis_factory(
        password="adminpw",
        acl=["user hsmocsp on >userpw ~hsmocsp:* &hsmocsp:* +@all"],
        tls=redis_tls,
    )
    assert server.cmd("PING") == "PONG"  # over TLS, as the default user
    anonymous = RedisServer(server.directory, port=server.port, tls=redis_tls)
    with pytest.raises(RespError, match="NOAUTH"):
        anonymous.cmd("GET", "x")


def test_sentinel_failover(redis_sentinel: SentinelSet) -> None:
    primary = redis_sentinel.primary()
    assert primary.role() == "master"
    assert primary.pipeline([("SET", "hsmocsp:x", "1"), ("WAIT", 1, 2000)]) == ["OK", 1]
    old = primary.port
    primary.kill()
    promoted = redis_sentinel.wait_failover(old)
    assert promoted.port != old and promoted.cmd("GET", "hsmocsp:x") == b"1"
