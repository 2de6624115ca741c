"""``make run-replicas``'s Redis (hsmocsp.devpki.redisdev.DevRedis) on a real redis-server,
and bench.replicas's small RESP reader against it (binary values, which redis-cli's output
cannot carry)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.replicas import Report, Row, format_table, parse_args, resp_command
from hsmocsp.devpki.redisdev import DevRedis, answers_ping
from hsmocsp.devpki.tools import DevPkiError

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def test_dev_redis_lives_in_its_directory(tmp_path: Path) -> None:
    # A short path: a Unix socket's path is limited to 107 bytes.
    redis = DevRedis(tmp_path / "redis").start()
    try:
        assert redis.address == f"unix:{tmp_path / 'redis' / 'redis.sock'}"
        assert (tmp_path / "redis").stat().st_mode & 0o077 == 0
        assert answers_ping(redis.socket)
        value = bytes(range(256)) + b"\r\n\x00"
        assert resp_command(redis.socket, b"HSET", b"k", b"f", value) == 1
        assert resp_command(redis.socket, b"HVALS", b"k") == [value]
        assert resp_command(redis.socket, b"HGET", b"k", b"nope") is None
        # No TCP port: the config says port 0.
        assert "port 0" in redis.config.read_text().splitlines()
        with pytest.raises(DevPkiError, match="already answers"):
            DevRedis(tmp_path / "redis").start()
    finally:
        redis.stop()
    assert not answers_ping(redis.socket)
    assert (tmp_path / "redis" / "dump.rdb").is_file()  # saved on SIGTERM
    again = DevRedis(tmp_path / "redis").start()  # and read back at the next start
    try:
        assert resp_command(again.socket, b"HLEN", b"k") == 1
    finally:
        again.stop()


def test_bench_replicas_options_and_table() -> None:
    args = parse_args(["--quick"])
    assert (args.duration, args.serials, args.store_responses) == (2.0, 2_000, 100_000)
    assert args.memory_hot == 5_000
    report = Report(2.0, 32, 1)
    report.rows += [
        Row("single process (role all) cached POST", 40_000.0, 0.7, 1.2),
        Row("server replica cached POST, hot-cache hit", 30_000.0, 0.9, 1.5),
        Row("revocation seen by every replica (s)", 0.42, note="x"),
    ]
    table = format_table(report)
    assert "hot-cache hit / single process cached POST: 0.75x" in table
    assert "0.42" in table
