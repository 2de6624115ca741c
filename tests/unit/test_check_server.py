"""``hsmocsp check`` with ``role: server`` against fakes of Redis and of the signer:
which lines, which reasons, which exit status (the real processes:
tests/integration/test_check_server.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from hsmocsp.cli import main
from hsmocsp.cli.checkserver import Client, check_signer, check_store, run_server_check
from hsmocsp.config import Config, load_config
from hsmocsp.errors import StoreUnavailable
from hsmocsp.stores.resp import Arg, Reply, ReplyError
from tests.unit.test_config_store import REDIS, folder, write

__all__ = ["folder"]

SERVER = REDIS + "role: server\nsigner_url: http://127.0.0.1:8080\n"


class FakeRedis:
    """A Redis of keys only: PING, GET, SCAN (one key per round)."""

    def __init__(self, keys: dict[bytes, bytes], ping: Reply = "PONG") -> None:
        self.keys = keys
        self.ping = ping
        self.aborted = False

    def execute(self, *args: Arg, timeout: float | None = None) -> Deferred[Reply]:
        command = str(args[0])
        if command == "PING":
            return succeed(self.ping)
        if command == "GET":
            return succeed(self.keys.get(str(args[1]).encode()))
        assert command == "SCAN"
        cursor = int(args[1])
        names = sorted(k for k in self.keys if k.startswith(str(args[3])[:-1].encode()))
        nxt = cursor + 1 if cursor + 1 < len(names) else 0
        return succeed([str(nxt).encode(), names[cursor : cursor + 1]])

    def abort(self, why: str) -> None:
        self.aborted = True


def connected(redis: FakeRedis) -> Any:
    async def connect() -> Client:
        return redis

    return connect


def run(coroutine: Any) -> Any:
    result: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(result.append)
    assert result, "the check waited on something"
    return result[0]


def server_config(folder: Path) -> Config:
    return load_config(write(folder, SERVER))


SIGNED = {
    b"hsmocsp:signer": b"1764680000",
    b"hsmocsp:r:root:1a": b"x",
    b"hsmocsp:r:root:1b": b"x",
    b"hsmocsp:r:other:1": b"x",
}


def test_store_with_a_signers_marker_is_ok_and_counts_what_is_held(folder: Path) -> None:
    cfg = server_config(folder)
    redis = FakeRedis(dict(SIGNED))
    ok, text = run(check_store(cfg, connected(redis)))
    assert ok, text
    assert "answers PING" in text and "marker hsmocsp:signer set at 2025-12-02" in text
    assert f"responses held: {cfg.handles[0].name} 2" in text
    assert "not in this configuration: other" in text
    assert redis.aborted


def test_store_without_the_marker_fails_and_says_why(folder: Path) -> None:
    ok, text = run(check_store(server_config(folder), connected(FakeRedis({b"a": b"b"}))))
    assert not ok
    assert "no key hsmocsp:signer" in text and "key_prefix" in text


def test_store_not_answering_pong_fails(folder: Path) -> None:
    redis = FakeRedis(dict(SIGNED), ping=ReplyError("NOAUTH Authentication required."))
    ok, text = run(check_store(server_config(folder), connected(redis)))
    assert not ok and "NOAUTH" in text


def test_store_unreachable_fails_with_the_reason(folder: Path) -> None:
    async def connect() -> Client:
        raise StoreUnavailable("redis 127.0.0.1:6380: cannot connect: Connection refused")

    ok, text = run(check_store(server_config(folder), connect))
    assert not ok and "Connection refused" in text


def test_signer_readyz() -> None:
    def answering(code: int, body: bytes) -> Any:
        async def get(url: str) -> tuple[int, bytes]:
            assert url == "http://s:8080/readyz"
            return code, body

        return get

    async def refused(url: str) -> tuple[int, bytes]:
        raise ConnectionRefusedError("Connection was refused by other side: 111")

    assert run(check_signer("http://s:8080", answering(200, b"ready\n"))) == (
        True,
        "http://s:8080/readyz answered 200",
    )
    ok, text = run(check_signer("http://s:8080", answering(503, b"starting\nmore")))
    assert not ok and text == "http://s:8080/readyz answered HTTP 503: starting"
    ok, text = run(check_signer("http://s:8080", refused))
    assert not ok and "no answer" in text and "refused" in text


def test_every_check_gets_its_line_and_any_failure_exits_1(folder: Path) -> None:
    cfg = server_config(folder)

    async def down(url: str) -> tuple[int, bytes]:
        raise ConnectionRefusedError()

    async def up(url: str) -> tuple[int, bytes]:
        return 200, b""

    out = io.StringIO()
    assert run(run_server_check(None, cfg, out, connected(FakeRedis({})), down)) == 1
    lines = out.getvalue().splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        ["configuration", "ok"], ["store", "FAILED"], ["signer", "FAILED"],
    ]  # fmt: skip
    out = io.StringIO()
    assert run(run_server_check(None, cfg, out, connected(FakeRedis(dict(SIGNED))), up)) == 0
    assert [line.split(": ")[1] for line in out.getvalue().splitlines()] == ["ok"] * 3


def test_cli_configuration_errors_exit_78_naming_file_and_key(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(folder, REDIS + "role: server\n")  # no signer_url
    assert main(["check", "--config", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert "signer_url" in err and str(cfg) in err and "required" in err
    # --role server instead of the file's role: the same requirement.
    cfg = write(folder, REDIS)
    assert main(["check", "--config", str(cfg), "--role", "server"]) == 78
    assert "--role server" in capsys.readouterr().err


def test_cli_missing_store_password_file_exits_78(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(folder, SERVER.replace(
        "address: 127.0.0.1:6380\n", "address: 127.0.0.1:6380\n  password_file: nope\n"
    ))  # fmt: skip
    assert main(["check", "--config", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert "store.password" in err and "Traceback" not in err
