"""``make run``: the whole dev stack in the foreground (SoftHSM, OpenBao, hsmocsp).

``python -m hsmocsp.devpki.run --dir var/devpki --config etc/hsmocsp-dev.yaml
--listen tcp:8080:interface=127.0.0.1``

1. builds level 1 (:func:`~hsmocsp.devpki.opensslca.build_level1`) and the cfssl CA
   (:func:`~hsmocsp.devpki.cfsslca.build_cfssl_level`, a SQLite certdb);
2. starts a *persistent* OpenBao on 127.0.0.1:8200 (raft storage in ``<dir>/bao/data``),
   initialises it once (one unseal key, ``<dir>/bao/unseal-key`` and ``root-token``, both
   0600) and unseals it at every start, so two runs keep the same Vault hierarchy;
3. builds levels 2 and 3 (:func:`~hsmocsp.devpki.vaultpki.build_vault_levels`);
4. runs ``twistd --nodaemon hsmocsp`` with ``SOFTHSM2_CONF`` set, forwarding SIGINT and
   SIGTERM to it, and stops OpenBao when it exits.

``make run-replicas`` adds ``--replicas etc/hsmocsp-replicas.yaml`` (issue 11): before step 4
it starts a ``redis-server`` (:class:`~hsmocsp.devpki.redisdev.DevRedis`) on the Unix socket
that file's ``store.address`` names (data and socket under ``var/redis``), writes
``<dir>/replicas.yaml`` -- the ``--config`` file with the keys of the ``--replicas`` file
laid over it, every relative path made absolute -- and runs three responders from it: the
signer (``--role signer`` on ``--listen``) and one server per ``--server-listen``
(``--role server``, 127.0.0.1:8081 and :8082 by default; no ``SOFTHSM2_CONF``: a server
touches no token). The handles stay defined once, in the ``--config`` file.

twistd, redis-server and bao run in their own sessions so a Ctrl-C reaches them once,
through us, in order: the responders stop first, then Redis, then the Vault they read from.
If one responder exits by itself, the others are stopped too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from hsmocsp.devpki.bao import BaoError, find_bao
from hsmocsp.devpki.cfsslca import CfsslLevel, build_cfssl_level
from hsmocsp.devpki.opensslca import DevPki, build_level1
from hsmocsp.devpki.redisdev import DevRedis
from hsmocsp.devpki.tools import DevPkiError, MissingToolError, terminate, write_private
from hsmocsp.devpki.vaultpki import VaultPki, build_vault_levels

__all__ = ["PersistentBao", "check_commands", "main", "replicas_config"]

REPO = Path(__file__).resolve().parents[2]
BAO_HOST = "127.0.0.1"
BAO_PORT = 8200
README_CHECKS = "README.md, section 'Check it with `openssl ocsp`'"
README_REPLICA_CHECKS = "README.md, section 'Signer and two servers: `make run-replicas`'"
SERVER_LISTEN = ("tcp:8081:interface=127.0.0.1", "tcp:8082:interface=127.0.0.1")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _health(address: str) -> int | None:
    """HTTP status of ``/v1/sys/health`` (200 active, 429 standby, 501 uninit, 503 sealed)."""
    try:
        with urllib.request.urlopen(f"{address}/v1/sys/health", timeout=2) as resp:
            code: int = resp.status
            return code
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def _put(address: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{address}/v1/{path}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            result: dict[str, Any] = json.loads(resp.read() or b"{}")
            return result
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode("utf-8", "replace")
        raise BaoError(f"PUT /v1/{path}: HTTP {err.code}: {detail}") from err
    except OSError as err:
        raise BaoError(f"PUT /v1/{path}: {err}") from err


class PersistentBao:
    """``bao server -config`` with raft storage under ``directory``; init once, unseal always.

    ``directory`` holds ``bao.hcl``, ``data/``, ``bao.log``, ``bao.pid`` and the secrets
    ``unseal-key`` and ``root-token`` (0600). Dev use only: one key share, no TLS, loopback.
    """

    def __init__(self, directory: Path, port: int = BAO_PORT, start_timeout: float = 60.0) -> None:
        self.directory = Path(directory).resolve()
        self.port = port
        self.address = f"http://{BAO_HOST}:{port}"
        self.config = self.directory / "bao.hcl"
        self.data = self.directory / "data"
        self.log = self.directory / "bao.log"
        self.pid_file = self.directory / "bao.pid"
        self.unseal_key_file = self.directory / "unseal-key"
        self.root_token_file = self.directory / "root-token"
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None

    def __repr__(self) -> str:
        return f"PersistentBao({self.address!r}, {str(self.directory)!r})"

    @property
    def root_token(self) -> str:
        return self.root_token_file.read_text().strip()

    def _config_text(self) -> str:
        return (
            "# written by hsmocsp.devpki.run (dev only: no TLS, one unseal key)\n"
            f'storage "raft" {{\n  path = "{self.data}"\n  node_id = "hsmocsp-dev"\n}}\n'
            f'listener "tcp" {{\n  address = "{BAO_HOST}:{self.port}"\n'
            f'  cluster_address = "{BAO_HOST}:{self.port + 1}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.address}"\n'
            f'cluster_addr = "http://{BAO_HOST}:{self.port + 1}"\n'
            "ui = false\n"
        )

    def _ours_running(self) -> int | None:
        """The pid of a bao left running from an earlier run with our config, if any."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if f"-config={self.config}".encode() in cmdline and cmdline[0].endswith(b"bao"):
            return pid
        return None

    def start(self) -> PersistentBao:
        """Start (or adopt a leftover of ours), initialise once, unseal; wait until active."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        self.data.mkdir(mode=0o700, exist_ok=True)
        leftover = self._ours_running()
        if leftover is not None and _health(self.address) is not None:
            self._adopted = leftover
        else:
            for port in (self.port, self.port + 1):
                if _port_open(BAO_HOST, port):
                    raise DevPkiError(
                        f"{BAO_HOST}:{port} is already in use by a program that is not the "
                        f"OpenBao of {self.directory}; stop it (or free ports {self.port} "
                        f"and {self.port + 1}) and run again"
                    )
            text = self._config_text()
            if not self.config.exists() or self.config.read_text() != text:
                self.config.write_text(text)
            env = dict(os.environ, HOME=str(self.directory))
            for var in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN"):
                env.pop(var, None)
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [find_bao(), "server", f"-config={self.config}"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.directory,
                    start_new_session=True,
                )
            self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self._init_and_unseal()
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self) -> str:
        return self.log.read_text("utf-8", "replace")[-1500:] if self.log.exists() else ""

    def _wait(self, ok: Sequence[int]) -> int:
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise DevPkiError(
                    f"bao exited with status {self._proc.returncode}:\n{self._log_tail()}"
                )
            code = _health(self.address)
            if code in ok:
                assert code is not None
                return code
            if time.monotonic() > deadline:
                raise DevPkiError(
                    f"OpenBao at {self.address} not ready in {self._start_timeout:.0f}s "
                    f"(health {code}); log {self.log}:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def _init_and_unseal(self) -> None:
        code = self._wait((200, 429, 472, 473, 501, 503))
        try:
            if code == 501:  # not initialised: the first run
                if self.unseal_key_file.exists():
                    raise DevPkiError(
                        f"OpenBao in {self.data} is empty but {self.unseal_key_file} exists; "
                        f"remove {self.directory} to start over"
                    )
                init = _put(self.address, "sys/init", {"secret_shares": 1, "secret_threshold": 1})
                write_private(self.unseal_key_file, (init["keys_base64"][0] + "\n").encode())
                write_private(self.root_token_file, (init["root_token"] + "\n").encode())
                code = 503
            if code == 503:
                try:
                    key = self.unseal_key_file.read_text().strip()
                except OSError as err:
                    raise DevPkiError(
                        f"OpenBao in {self.data} is sealed and {self.unseal_key_file} is "
                        f"unreadable ({err.strerror}); remove {self.directory} to start over"
                    ) from err
                _put(self.address, "sys/unseal", {"key": key})
        except BaoError as err:
            raise DevPkiError(f"OpenBao at {self.address}: {err}") from err
        self._wait((200,))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM our bao (started or adopted), SIGKILL after ``timeout``; idempotent."""
        proc, self._proc = self._proc, None
        adopted, self._adopted = self._adopted, None
        if proc is not None and proc.poll() is None:
            terminate(proc, timeout)
        elif adopted is not None:
            try:
                os.kill(adopted, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while Path(f"/proc/{adopted}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            return
        self.pid_file.unlink(missing_ok=True)


def _rel(path: Path) -> str:
    """``path`` relative to the current directory when below it (README lines run there)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_commands(
    dev: DevPki,
    vault: VaultPki,
    base_url: str = "http://127.0.0.1:8080",
    cfssl: CfsslLevel | None = None,
) -> str:
    """The ``openssl ocsp`` lines that check good/revoked/unknown at all three levels
    (and the cfssl CA, when given)."""
    lines: list[str] = []

    def three(label: str, url: str, issuer: Path, good: Path, revoked: Path, va: Path,
              ca: Path) -> None:  # fmt: skip
        tail = f"-VAfile {_rel(va)} -CAfile {_rel(ca)}"
        head = f"openssl ocsp -url {base_url}{url} -issuer {_rel(issuer)}"
        lines.append(f"# {label}")
        lines.append(f"{head} -cert {_rel(good)} {tail}")
        lines.append(f"{head} -cert {_rel(revoked)} {tail}")
        lines.append(f"{head} -serial 0xDEADBEEF {tail}")

    three("level 1: OpenSSL root (index.txt)", "/ocsp", dev.ca_pem, dev.good_pem,
          dev.revoked_pem, dev.ocsp_pem, dev.ca_pem)  # fmt: skip
    for level, files in ((2, vault.level2), (3, vault.level3)):
        three(f"level {level}: Vault mount {files.mount}", files.ocsp_path, files.ca_pem,
              files.good_pem, files.revoked_pem, files.ocsp_pem, files.chain_pem)  # fmt: skip
    if cfssl is not None:
        ca = cfssl.ca
        three("cfssl CA (SQLite certdb)", cfssl.ocsp_path, ca.ca_pem, cfssl.good_pem,
              cfssl.revoked_pem, cfssl.ocsp_pem, ca.ca_pem)  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ResponderSpec:
    """One ``twistd --nodaemon hsmocsp`` the runner starts: its name in messages, its extra
    arguments (``--listen``, ``--role``) and its environment."""

    name: str
    args: tuple[str, ...]
    env: dict[str, str]


def _twistd_argv(config: Path, args: Sequence[str]) -> list[str]:
    twistd = Path(sys.executable).with_name("twistd")
    return [str(twistd), "--nodaemon", "--pidfile=", "--logfile=-", "hsmocsp",
            "--config", str(config), *args]  # fmt: skip


def _run_responders(config: Path, specs: Sequence[ResponderSpec]) -> int:
    """The responders in the foreground (own sessions); SIGINT/SIGTERM are forwarded.

    Returns 0 after a stop we were asked for, else the status of the first responder that
    exited by itself (the others are then stopped).
    """
    procs: list[subprocess.Popen[bytes]] = []
    asked_to_stop: list[int] = []

    def stop_all() -> None:
        # Always SIGTERM: a twistd started while SIGINT was ignored (a background job of
        # a non-interactive shell) keeps ignoring SIGINT, but stops cleanly on SIGTERM.
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def forward(signum: int, frame: FrameType | None) -> None:
        asked_to_stop.append(signum)
        stop_all()

    # Handlers first: a caught signal is reset to the default in the child at exec.
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for spec in specs:
            if asked_to_stop:
                break
            procs.append(subprocess.Popen(
                _twistd_argv(config, spec.args), env=spec.env, stdin=subprocess.DEVNULL,
                start_new_session=True,
            ))  # fmt: skip
        first: tuple[str, int] | None = None
        while any(proc.poll() is None for proc in procs):
            for spec, proc in zip(specs, procs, strict=False):
                code = proc.poll()
                if code is not None and first is None and not asked_to_stop:
                    first = (spec.name, code)
                    if len(procs) > 1:
                        print(f"hsmocsp run: {spec.name} exited with status {code}; "
                              "stopping the others", file=sys.stderr, flush=True)  # fmt: skip
                    stop_all()
            time.sleep(0.1)
        if first is None:
            first = (specs[0].name, procs[0].returncode) if procs else ("", 0)
        code = first[1]
        # twistd re-raises the SIGTERM we forwarded once it has shut down cleanly: that
        # is the stop the user asked for, not a failure.
        if asked_to_stop and all(p.returncode in (0, -signal.SIGTERM) for p in procs):
            return 0
        return code
    finally:
        for proc in procs:
            terminate(proc, 30.0)
        for s, handler in old.items():
            signal.signal(s, handler)


def _run_twistd(dev: DevPki, config: Path, listen: str) -> int:
    """``make run``: one responder, every role in one process."""
    env = dict(os.environ, SOFTHSM2_CONF=str(dev.softhsm_conf), PYTHONPATH=str(REPO))
    return _run_responders(config, [ResponderSpec("hsmocsp", ("--listen", listen), env)])


def _absolute(value: Any, base: Path) -> Any:
    """``value`` with every relative path (``./x``, ``../x``, ``unix:../x``) made absolute
    from ``base``, the directory of the file it was read from."""
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str):
        prefix = "unix:" if value.startswith("unix:") else ""
        rest = value[len(prefix):]
        if rest.startswith(("./", "../")):
            return prefix + str((base / rest).resolve())
    return value


def replicas_config(config: Path, overrides: Path, out: Path) -> dict[str, Any]:
    """Write ``out``: ``config`` with the top-level keys of ``overrides`` laid over it.

    Both files' relative paths are made absolute (they are relative to their own files),
    so ``out`` may live anywhere. Returns the merged mapping.
    """
    merged: dict[str, Any] = {}
    for path in (config, overrides):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise DevPkiError(f"{path}: {err}") from err
        if not isinstance(data, dict):
            raise DevPkiError(f"{path}: not a mapping")
        merged.update(_absolute(data, path.resolve().parent))
    store = merged.get("store")
    if not isinstance(store, dict) or not str(store.get("address", "")).startswith("unix:/"):
        raise DevPkiError(
            f"{overrides}: store.address must be unix:<path of the dev Redis socket>"
        )
    if not str(merged.get("signer_url", "")).startswith("http://"):
        raise DevPkiError(f"{overrides}: signer_url must be the signer's http:// URL")
    out.write_text(
        "# written by hsmocsp.devpki.run for make run-replicas: "
        f"{config} with the keys of {overrides}\n" + yaml.safe_dump(merged, sort_keys=False)
    )
    return merged


def _run_replicas(
    dev: DevPki, config: Path, listen: str, server_listen: Sequence[str]
) -> int:
    """``make run-replicas``: the signer on ``listen`` and one server per ``server_listen``."""
    base = dict(os.environ, PYTHONPATH=str(REPO))
    base.pop("SOFTHSM2_CONF", None)
    signer_env = dict(base, SOFTHSM2_CONF=str(dev.softhsm_conf))
    specs = [ResponderSpec("signer", ("--listen", listen, "--role", "signer"), signer_env)]
    specs += [
        ResponderSpec(f"server {n}", ("--listen", where, "--role", "server"), dict(base))
        for n, where in enumerate(server_listen, 1)
    ]
    return _run_responders(config, specs)


def _url(endpoint: str) -> str:
    """``http://host:port`` of a ``tcp:PORT[:interface=HOST]`` endpoint."""
    parts = endpoint.split(":")
    if len(parts) < 2 or parts[0] != "tcp" or not parts[1].isdigit():
        raise DevPkiError(f"not a tcp:PORT[:interface=HOST] endpoint: {endpoint}")
    host = next((p.split("=", 1)[1] for p in parts[2:] if p.startswith("interface=")),
                "127.0.0.1")  # fmt: skip
    return f"http://{host}:{parts[1]}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hsmocsp.devpki.run",
        description="Build the dev PKI (levels 1-3), start OpenBao, run hsmocsp in the "
        "foreground. Ctrl-C stops both.",
    )
    p.add_argument("--dir", type=Path, default=Path("var/devpki"))
    p.add_argument("--config", type=Path, default=Path("etc/hsmocsp-dev.yaml"))
    p.add_argument("--listen", default="tcp:8080:interface=127.0.0.1")
    p.add_argument("--bao-port", type=int, default=BAO_PORT, help=argparse.SUPPRESS)
    p.add_argument(
        "--replicas", type=Path, metavar="FILE",
        help="run a Redis, the signer on --listen and servers on --server-listen, with the "
        "keys of FILE (store, signer_url, hot_cache_entries) laid over --config",
    )  # fmt: skip
    p.add_argument(
        "--server-listen", action="append", metavar="ENDPOINT",
        help="with --replicas: a server's listen endpoint, repeatable (default: "
        + ", ".join(SERVER_LISTEN) + ")",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: twistd's own; 2 a tool is missing; 1 the dev stack could not be built."""
    args = _parser().parse_args(argv)
    if not args.config.is_file():
        print(f"hsmocsp run: error: no config file {args.config}", file=sys.stderr)
        return 2
    if args.replicas is not None and not args.replicas.is_file():
        print(f"hsmocsp run: error: no file {args.replicas}", file=sys.stderr)
        return 2
    server_listen = args.server_listen or list(SERVER_LISTEN)
    bao = PersistentBao(args.dir / "bao", port=args.bao_port)
    redis: DevRedis | None = None

    def stop_services() -> None:
        if redis is not None:
            redis.stop()
        bao.stop()

    try:
        dev = build_level1(args.dir)
        cfssl = build_cfssl_level(dev)
        config = args.config
        if args.replicas is not None:
            config = dev.directory / "replicas.yaml"
            merged = replicas_config(args.config, args.replicas, config)
            socket_path = Path(merged["store"]["address"][len("unix:"):])
            if socket_path.name != "redis.sock":
                raise DevPkiError(f"{args.replicas}: store.address must name <dir>/redis.sock")
            redis = DevRedis(socket_path.parent).start()
        bao.start()
        vault = build_vault_levels(dev, bao.address, bao.root_token)
        checks = dev.directory / "check-commands.txt"
        checks.write_text(check_commands(dev, vault, cfssl=cfssl))
        replica_checks = dev.directory / "check-commands-replicas.txt"
        if args.replicas is not None:
            replica_checks.write_text("".join(
                check_commands(dev, vault, _url(where), cfssl) for where in server_listen
            ))  # fmt: skip
    except MissingToolError as err:
        stop_services()
        print(f"hsmocsp run: {err}", file=sys.stderr)
        return 2
    except (DevPkiError, BaoError, OSError) as err:
        stop_services()
        print(f"hsmocsp run: error: {err}", file=sys.stderr)
        return 1
    rebuilt = f" (rebuilt: {', '.join(vault.rebuilt)})" if vault.rebuilt else ""
    print(f"OpenBao at {bao.address} (root token in {bao.root_token_file}){rebuilt}", flush=True)
    print(f"check lines: {README_CHECKS}; for this tree: {_rel(checks)}", flush=True)
    try:
        if redis is None:
            return _run_twistd(dev, config, args.listen)
        print(f"Redis at {redis.address} (data in {_rel(redis.directory)}); signer on "
              f"{_url(args.listen)}, servers on {', '.join(_url(s) for s in server_listen)}",
              flush=True)  # fmt: skip
        print(f"replica check lines: {README_REPLICA_CHECKS}; for this tree: "
              f"{_rel(replica_checks)}", flush=True)  # fmt: skip
        return _run_replicas(dev, config, args.listen, server_listen)
    finally:
        stop_services()


if __name__ == "__main__":
    raise SystemExit(main())
