"""``hsmocsp check --role server`` against a real redis-server (with a password file)
and a real signer (``twistd hsmocsp --role signer`` on SoftHSM): all fine, Redis
down, signer down. The check runs without SOFTHSM2_CONF: a server needs no token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import REPO, Responder, openssl_ocsp, wait_until
from tests.redisfixtures import MASTER_NAME, RedisServer, start_sentinel_set

pytestmark = pytest.mark.integration

PASSWORD = "check-s3cret-pw"


@dataclass
class World:
    dev: DevPki
    work: Path
    redis: RedisServer
    signer: Responder


def config(world: World, name: str, redis_address: str, signer_port: int) -> Path:
    directory = world.work / name
    directory.mkdir(exist_ok=True)
    return level1_config(world.dev, directory, extra=f"""
store: {{kind: redis, address: "{redis_address}", password_file: {world.work / "redis.pw"}}}
signer_url: http://127.0.0.1:{signer_port}
""")


def check(cfg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    return subprocess.run(
        [sys.executable, "-m", "hsmocsp.cli", "check", "--config", str(cfg), "--role", "server"],
        capture_output=True, text=True, timeout=60, env=dict(env, PYTHONPATH=str(REPO)), cwd=cwd,
    )  # fmt: skip


def lines(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


@pytest.fixture(scope="module")
def world(devpki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from hsmocsp.devpki.bao import free_port

    work = tmp_path_factory.mktemp("check-server")
    (work / "redis.pw").write_text(PASSWORD + "\n")
    redis = RedisServer(work / "redis", password=PASSWORD).start()
    world = World(devpki, work, redis, None)  # type: ignore[arg-type]
    signer_port = free_port()
    cfg = config(world, "signer", redis.address, signer_port)
    world.signer = Responder(config=cfg, env=dev_env(devpki), workdir=work, port=signer_port,
                             extra_args=("--role", "signer"))  # fmt: skip
    try:
        world.signer.start()
        # One answer signed: the signer writes it, with its marker, to Redis.
        dev = devpki
        out = openssl_ocsp("-url", world.signer.url + "/ocsp", "-issuer", str(dev.ca_pem),
                           "-CAfile", str(dev.ca_pem), "-no_nonce", "-cert", str(dev.good_pem))
        assert out.verified, out.output
        wait_until(lambda: redis.cmd("EXISTS", "hsmocsp:signer") == 1,
                   "the signer's marker in Redis", 30)  # fmt: skip
        yield world
    finally:
        world.signer.stop()
        redis.stop()


def test_all_fine(world: World) -> None:
    cfg = config(world, "fine", world.redis.address, world.signer.port)
    proc = check(cfg, world.work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lines(proc)
    assert list(got) == ["configuration", "store", "signer"]
    assert all(text.startswith("ok: ") for text in got.values()), got
    assert "answers PING; marker hsmocsp:signer set at " in got["store"]
    held = re.search(r"responses held: root (\d+), root-ec (\d+)$", got["store"])
    assert held and int(held[1]) >= 1 and int(held[2]) >= 1, got["store"]  # presigned
    assert f"{world.signer.url}/readyz answered 200" in got["signer"]


def test_redis_down(world: World) -> None:
    gone = RedisServer(world.work / "gone", password=PASSWORD).start()
    gone.stop()
    cfg = config(world, "redis-down", gone.address, world.signer.port)
    proc = check(cfg, world.work)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = lines(proc)
    assert got["store"].startswith("FAILED: ") and "cannot connect" in got["store"], got
    assert got["signer"].startswith("ok: ")


def test_signer_down(world: World) -> None:
    from hsmocsp.devpki.bao import free_port

    cfg = config(world, "signer-down", world.redis.address, free_port())
    proc = check(cfg, world.work)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = lines(proc)
    assert got["store"].startswith("ok: ")
    assert got["signer"].startswith("FAILED: ") and "/readyz: no answer" in got["signer"], got


def test_wrong_password_file(world: World) -> None:
    cfg = config(world, "wrong-password", world.redis.address, world.signer.port)
    (world.work / "wrong.pw").write_text("not-the-password\n")
    text = cfg.read_text().replace(str(world.work / "redis.pw"), str(world.work / "wrong.pw"))
    cfg.write_text(text)
    proc = check(cfg, world.work)
    assert proc.returncode == 1
    got = lines(proc)
    assert got["store"].startswith("FAILED: ") and "AUTH refused" in got["store"], got
    assert "not-the-password" not in proc.stdout + proc.stderr


def test_through_sentinel_the_marker_decides(world: World) -> None:
    """Discovery via a real redis-sentinel (password file for the primary); a primary
    no signer wrote to fails on the marker, the same one with a signer's marker is ok."""
    watched = start_sentinel_set(world.work / "sentinel", replicas=0, password=PASSWORD)
    try:
        cfg = world.work / "sentinel" / "hsmocsp.yaml"
        sentinels = ", ".join(f'"{a}"' for a in watched.sentinel_addresses)
        config(world, "sentinel", world.redis.address, world.signer.port)
        text = (world.work / "sentinel" / "hsmocsp.yaml").read_text().replace(
            f'address: "{world.redis.address}"',
            f"sentinels: [{sentinels}], master_name: {MASTER_NAME}",
        )
        cfg.write_text(text)
        proc = check(cfg, world.work)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        got = lines(proc)
        assert f"sentinel master {MASTER_NAME} via " in got["configuration"]
        assert got["store"].startswith("FAILED: answers PING, but no key hsmocsp:signer"), got
        assert got["signer"].startswith("ok: ")
        watched.primary().cmd("SET", "hsmocsp:signer", "1764684000")  # as a signer's writer does
        proc = check(cfg, world.work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        store = lines(proc)["store"]
        assert "marker hsmocsp:signer set at 2025-12-02 14:00:00Z" in store, store
        assert "responses held: root 0, root-ec 0" in store, store
    finally:
        watched.stop()
