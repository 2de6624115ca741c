"""Vault goes away under a running responder, then comes back (real OpenBao, real twistd).

A TCP proxy we control stands between the responder and OpenBao: cutting it looks to
the responder exactly like the Vault process dying (refused connections, aborted
streams), and restoring it keeps the dev server's in-memory PKI intact.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import Responder, free_port, http, openssl_ocsp, wait_until
from tests.integration.test_devpki_vault import (  # noqa: F401  (world: a fixture)
    World,
    vault_handle,
    world,
)


class Proxy:
    """Forward 127.0.0.1:<port> to a target; ``cut`` closes everything, ``restore`` reopens."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.lock = threading.Lock()

    def restore(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self.listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            if self.listener is not None:
                # shutdown() wakes the thread blocked in accept(); close() alone would not,
                # and the kernel would keep accepting on the listening socket.
                try:
                    self.listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.listener.close()
                self.listener = None
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def proxied(world: World, tmp_path: Path) -> Iterator[tuple[Responder, Proxy]]:  # noqa: F811
    url = urlsplit(world.vault.address)
    proxy = Proxy((url.hostname or "127.0.0.1", url.port or 8200))
    proxy.restore()
    files = world.vault.level2
    idle = world.vault.level3  # nobody asks it anything: only its probe can see the outage
    address = f"http://127.0.0.1:{proxy.port}"
    token = world.vault.token_file
    extra = vault_handle(
        files, address, token, source={"cache_ttl": 1, "crl_refresh": 5, "request_timeout": 2}
    ) + vault_handle(
        idle, address, token, name="idle", source={"crl_refresh": 300, "request_timeout": 2}
    )
    cfg = level1_config(world.dev, tmp_path, extra=extra)
    cfg.write_text("presign_rate: 0\n" + cfg.read_text())
    r = Responder(config=cfg, env=dev_env(world.dev), workdir=tmp_path)
    try:
        r.start()
        yield r, proxy
    finally:
        r.stop()
        proxy.cut()


def _ask(r: Responder, world: World, *args: str) -> str:  # noqa: F811
    files = world.vault.level2
    result = openssl_ocsp(
        "-url", r.url + files.ocsp_path, "-issuer", str(files.ca_pem), "-no_nonce", *args,
        "-VAfile", str(files.ocsp_pem), "-CAfile", str(files.chain_pem),
    )  # fmt: skip
    return result.output


def test_outage_serves_cached_and_trylater_then_recovers(
    world: World,  # noqa: F811
    proxied: tuple[Responder, Proxy],
) -> None:
    r, proxy = proxied
    good = world.vault.level2.good_pem
    out = _ask(r, world, "-cert", str(good))
    assert "Response verify OK" in out and f"{good}: good" in out

    proxy.cut()
    # The signed response is cached until its nextUpdate: still served, still verifies.
    out = _ask(r, world, "-cert", str(good))
    assert "Response verify OK" in out and f"{good}: good" in out
    # A serial never looked up cannot be answered without Vault: tryLater, not a crash.
    out = _ask(r, world, "-serial", "0x0D0E0A0D")
    assert "trylater" in out.lower(), out
    assert http(r.url + "/healthz")[0] == 200
    # One Vault outage must not pull the pod out of a Service: the OpenSSL handles
    # answer as ever, the Vault handle is degraded, and only its strict probe says 503.
    mount = world.vault.level2.mount
    code, _, body = http(r.url + "/readyz")
    state = json.loads(body)
    assert code == 200, body
    assert state["handles"][mount]["state"] == "degraded", body
    assert state["handles"]["root"] == {"state": "ready", "reason": ""}
    assert http(r.url + "/readyz/root")[0] == 200
    # The asked handle at once, the idle one through its probe; logged when it happened...
    _vault_handles_turn(r, (mount, "idle"), 503, "ready -> degraded")
    for _ in range(5):
        http(r.url + "/readyz")
    assert r.output().count(f"{mount}: ready -> degraded") == 1  # ...once, not per probe
    assert r.alive()

    proxy.restore()

    def verified() -> str:
        out = _ask(r, world, "-serial", "0x0D0E0A0D")
        return out if "Response verify OK" in out else ""

    out = wait_until(verified, "a verified answer once Vault is back")
    assert "0x0D0E0A0D: unknown" in out, out
    _vault_handles_turn(r, (mount, "idle"), 200, "degraded -> ready")
    # The sources said so themselves, once each way, and counted their errors; the idle
    # handle's source learnt it from its sys/health probe (every 10 s), not a request.
    out = r.output()
    for name in (mount, world.vault.level3.mount):
        lines = [line for line in out.splitlines() if f"mount '{name}'" in line]
        assert sum(": degraded: " in line for line in lines) == 1, "\n".join(lines)
        assert sum("ready again" in line for line in lines) == 1, lines
    assert _source_errors(r, mount) > 0 and _source_errors(r, "idle") > 0


def _vault_handles_turn(r: Responder, names: tuple[str, ...], code: int, change: str) -> None:
    """One step of the outage, down or back: each Vault handle's strict probe answers
    ``code`` (the idle one only once its source's probe saw it), and the handle logged
    the ``change`` of state."""
    for name in names:
        wait_until(lambda n=name: http(r.url + f"/readyz/{n}")[0] == code,
                   f"/readyz/{name} to be {code}")  # fmt: skip
        assert f"{name}: {change}" in r.output()


def _source_errors(r: Responder, handle: str) -> float:
    for line in http(r.url + "/metrics")[2].decode().splitlines():
        if line.startswith(f'hsmocsp_source_errors_total{{handle="{handle}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no hsmocsp_source_errors for {handle}")
