"""The ``store:`` block, ``role``, ``signer_url``, ``hot_cache_entries`` and ``--role``
(issue #11): every error names the file and the dotted key, no secret is echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from hsmocsp.config import RedisAddress, Secret, StoreConfig, load_config
from hsmocsp.errors import ConfigError
from tests.unit.test_config import BASE, folder
from tests.unit.test_config import write as write_base

__all__ = ["folder"]  # the fixture, re-used

REDIS = BASE + """
store:
  kind: redis
  address: 127.0.0.1:6380
"""


def write(folder: Path, text: str) -> Path:
    """BASE (formatted) followed by ``text`` as it is (it may hold YAML braces)."""
    assert text.startswith(BASE)
    cfg = write_base(folder, BASE)
    cfg.write_text(cfg.read_text() + text[len(BASE) :])
    return cfg


def error_of(folder: Path, text: str, role: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(folder, text), role=role)
    assert str(folder / "hsmocsp.yaml") in str(info.value)
    return info.value


def test_defaults_are_today_one_box(folder: Path) -> None:
    cfg = load_config(write(folder, BASE))
    assert cfg.role == "all" and cfg.signer_url is None and cfg.hot_cache_entries == 100_000
    assert cfg.store == StoreConfig() and cfg.store.kind == "sqlite"


def test_full_redis_block(folder: Path) -> None:
    (folder / "ca.crt").write_text("x")
    cfg = load_config(write(folder, BASE + """
role: server
signer_url: http://127.0.0.1:8080/
hot_cache_entries: 5000
store:
  kind: redis
  sentinels: [10.0.0.1:26379, "[::1]", sentinel-2]
  master_name: hsmocsp
  database: 3
  key_prefix: "ocsp:"
  username: hsmocsp
  password_file: secret/redis
  timeout: 0.25
  max_pending: 10
  tls: {ca_file: ca.crt, server_name: redis.example}
"""))
    assert cfg.role == "server" and cfg.signer_url == "http://127.0.0.1:8080"
    assert cfg.hot_cache_entries == 5000
    s = cfg.store
    assert s.kind == "redis" and s.address is None and s.master_name == "hsmocsp"
    assert s.sentinels == (
        RedisAddress("10.0.0.1", 26379), RedisAddress("::1", 26379),
        RedisAddress("sentinel-2", 26379),
    )
    assert str(s.sentinels[1]) == "[::1]:26379"
    assert (s.database, s.key_prefix, s.username, s.timeout, s.max_pending) == (
        3, "ocsp:", "hsmocsp", 0.25, 10,
    )
    assert s.password == Secret(file=folder / "secret" / "redis")
    assert s.tls is not None and s.tls.ca_file == folder / "ca.crt"
    assert s.tls.server_name == "redis.example" and s.tls.cert_file is None


def test_unix_socket_address(folder: Path) -> None:
    cfg = load_config(write(folder, BASE + "store: {kind: redis, address: 'unix:run/r.sock'}\n"))
    assert cfg.store.address == RedisAddress(unix=folder / "run" / "r.sock")
    assert str(cfg.store.address) == f"unix:{folder / 'run' / 'r.sock'}"


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ("store: {kind: memcached}", "store.kind", "not one of sqlite, redis"),
        ("store: {kind: sqlite, address: x}", "store.address", "unknown key"),
        ("store: {kind: redis}", "store.address", "exactly one"),
        ("store: {kind: redis, address: 'a:1', sentinels: ['b:2'], master_name: m}",
         "store.address", "exactly one"),
        ("store: {kind: redis, sentinels: ['b:2']}", "store.master_name", "required"),
        ("store: {kind: redis, address: 'a:1', master_name: m}", "store.master_name", "goes with"),
        ("store: {kind: redis, sentinels: []}", "store.sentinels", "list of host:port"),
        ("store: {kind: redis, address: 'a:99999'}", "store.address", "1 to 65535"),
        ("store: {kind: redis, address: 'a:b:c'}", "store.address", "not host:port"),
        ("store: {kind: redis, address: 6379}", "store.address", "host:port"),
        ("store: {kind: redis, address: 'a:1', database: -1}", "store.database", "at least 0"),
        ("store: {kind: redis, address: 'a:1', password: hunter2}", "store.password",
         "not read from the config"),
        ("store: {kind: redis, address: 'a:1', username: u}", "store.username", "needs password"),
        ("store: {kind: redis, address: 'a:1', password_env: A, password_file: b}",
         "store.password_env", "not both"),
        ("store: {kind: redis, sentinels: ['b:2'], master_name: m, sentinel_password: hunter2}",
         "store.sentinel_password", "not read from the config"),
        ("store: {kind: redis, sentinels: ['b:2'], master_name: m, sentinel_username: u}",
         "store.sentinel_username", "needs sentinel_password_file or sentinel_password_env"),
        ("store: {kind: redis, sentinels: ['b:2'], master_name: m, sentinel_password_env: A,"
         " sentinel_password_file: b}", "store.sentinel_password_env", "not both"),
        ("store: {kind: redis, address: 'a:1', sentinel_password_env: A}",
         "store.sentinel_password_env", "goes with sentinels"),
        ("store: {kind: redis, address: 'a:1', sentinel_password_file: b}",
         "store.sentinel_password_file", "goes with sentinels"),
        ("store: {kind: redis, address: 'a:1', key_prefix: 'a b'}", "store.key_prefix",
         "white space"),
        ("store: {kind: redis, address: 'a:1', tls: {cert_file: ca.pem}}", "store.tls.cert_file",
         "go together"),
        ("store: {kind: redis, address: 'a:1', tls: {ca_file: nope.pem}}", "store.tls.ca_file",
         "does not exist"),
        ("store: {kind: redis, address: 'unix:/r.sock', tls: {ca_file: ca.pem}}", "store.tls",
         "Unix socket"),
        ("store: {kind: redis, address: 'a:1', colour: red}", "store.colour", "unknown key"),
        ("role: replica", "role", "not one of all, signer, server"),
        ("role: signer", "role", "store.kind: redis"),
        ("role: server\nsigner_url: http://s:8080", "role", "store.kind: redis"),
        ("role: server\nstore: {kind: redis, address: 'a:1'}", "signer_url", "required"),
        ("signer_url: ftp://x", "signer_url", "not like http://host:port"),
        ("signer_url: http://x:8080/ocsp", "signer_url", "no path"),
        ("hot_cache_entries: 0", "hot_cache_entries", "at least 1"),
    ],
)
def test_errors_name_the_key(folder: Path, extra: str, key: str, problem: str) -> None:
    err = error_of(folder, BASE + extra + "\n")
    assert err.key == key, err
    assert problem in err.problem, err
    assert "hunter2" not in str(err)


def test_signer_role_with_redis(folder: Path) -> None:
    cfg = load_config(write(folder, REDIS + "role: signer\n"))
    assert cfg.role == "signer" and cfg.store.address == RedisAddress("127.0.0.1", 6380)


def test_role_override(folder: Path) -> None:
    cfg = load_config(write(folder, REDIS + "signer_url: http://127.0.0.1:8080\n"), role="server")
    assert cfg.role == "server"
    err = error_of(folder, REDIS, role="server")
    assert err.key == "signer_url" and "--role server" in err.problem
    err = error_of(folder, BASE, role="signer")
    assert err.key == "role" and "--role signer" in err.problem
    err = error_of(folder, BASE, role="boss")
    assert err.key == "role" and "--role boss" in err.problem


def test_role_command_line_option(folder: Path) -> None:
    from hsmocsp.service.options import EXIT_CONFIG, Options

    cfg = write(folder, REDIS)
    opts = Options()
    opts.parseOptions(["--config", str(cfg), "--role", "signer"])
    assert opts["parsed"].role == "signer"
    with pytest.raises(usage.UsageError, match="--role must be one of"):
        Options().parseOptions(["--config", str(cfg), "--role", "boss"])
    with pytest.raises(SystemExit) as exit_:
        Options().parseOptions(["--config", str(cfg), "--role", "server"])  # no signer_url
    assert exit_.value.code == EXIT_CONFIG


def test_password_is_read_from_its_source_only(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(folder, BASE + """
store: {kind: redis, address: 'a:1', username: u, password_env: REDIS_PW}
"""))
    assert cfg.store.password == Secret(env="REDIS_PW")
    monkeypatch.setenv("REDIS_PW", "s3cret")
    assert cfg.store.password.read("store.password") == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_sentinel_password_is_read_from_its_source_only(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(folder, BASE + """
store:
  kind: redis
  sentinels: ['127.0.0.1:26379']
  master_name: m
  password_env: REDIS_PW
  sentinel_username: watcher
  sentinel_password_file: sentinel-pw
"""))
    s = cfg.store
    assert s.sentinel_username == "watcher"
    assert s.sentinel_password == Secret(file=folder / "sentinel-pw")
    assert s.password == Secret(env="REDIS_PW")
    (folder / "sentinel-pw").write_text("s3ntinel\n")
    assert s.sentinel_password.read("store.sentinel_password") == "s3ntinel"
    assert "s3ntinel" not in repr(cfg)
    # A missing file is a configuration error naming the key, without any secret.
    (folder / "sentinel-pw").unlink()
    with pytest.raises(ConfigError) as info:
        s.sentinel_password.read("store.sentinel_password")
    assert info.value.key == "store.sentinel_password"
