"""Real ``redis-server`` / ``redis-sentinel`` processes for tests (Debian's packages).

Each server listens on a free loopback port, keeps its data, config and log in a
directory of the test's own (``tmp_path``), and is stopped when the test ends. A
server can be stopped and started again on the same port (Redis down, then back),
killed with SIGKILL (a primary dying under Sentinel), and asked anything through
:meth:`RedisServer.cmd`, a tiny blocking RESP client of this module (so no password
ever goes on a child's command line, as ``redis-cli -a`` would put it).

Fixtures (registered in tests/conftest.py, usable from every test directory):

* ``redis_server`` -- a started server (no password, no TLS);
* ``redis_factory`` -- ``redis_factory(password=..., acl=[...], tls=TlsFiles)`` for more;
* ``redis_sentinel`` -- a primary, one replica and one sentinel (``sentinels=3``
  via :func:`start_sentinel_set` for a quorum of 2) monitoring it as ``hsmocsp``,
  fast timeouts (down after 0.5 s), so a failover takes a few seconds;
* ``redis_tls`` -- :class:`TlsFiles`: a test CA, a server certificate for 127.0.0.1 /
  localhost, and a client certificate, made with ``cryptography``.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmocsp.config import StoreConfig
from hsmocsp.devpki.bao import free_port
from hsmocsp.stores.redis import RedisStore
from tests.waiting import wait_until

MASTER_NAME = "hsmocsp"


class RespError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


def _encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Lines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by Redis")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by Redis")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> Any:
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exactly(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"not RESP: {line!r}")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate (127.0.0.1, localhost) and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh test CA with one server and one client certificate (EC P-256, 1 day)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("hsmocsp test Redis CA"))
        .issuer_name(name("hsmocsp test Redis CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server, server_key = leaf("localhost", server=True)
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, files.server_key)
    client, client_key = leaf("hsmocsp", server=False)
    files.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    write_key(client_key, files.client_key)
    return files


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None and os.path.exists(f"/usr/sbin/{name}"):
        found = f"/usr/sbin/{name}"
    if found is None:
        raise RuntimeError(f"{name} not installed (the Makefile's apt list has it: make deps)")
    return found


@dataclass
class RedisServer:
    """One ``redis-server`` (or, with ``sentinel=True``, ``redis-sentinel``) process.

    ``password``: ``requirepass`` (the default user's); ``acl``: extra ``user ...``
    lines; ``tls``: serve TLS only (``tls-port``, no plain port), client certificates
    optional; ``replica_of``: start as a replica of that port; ``extra``: more lines.
    """

    directory: Path
    port: int = 0
    password: str | None = None
    acl: Sequence[str] = ()
    tls: TlsFiles | None = None
    replica_of: int | None = None
    sentinel: bool = False
    extra: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    @property
    def conf(self) -> Path:
        return self.directory / ("sentinel.conf" if self.sentinel else "redis.conf")

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"logfile {self.log}",
            f"pidfile {self.directory / 'redis.pid'}",
            "daemonize no",
        ]
        if self.tls is not None:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.server_cert}",
                f"tls-key-file {self.tls.server_key}",
                f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients optional",
                # Outgoing (replication, sentinel) connections show the client
                # certificate: the server one's extended key usage is serverAuth only.
                f"tls-client-cert-file {self.tls.client_cert}",
                f"tls-client-key-file {self.tls.client_key}",
            ]
            if self.sentinel or self.replica_of is not None:
                lines.append("tls-replication yes")
        else:
            lines.append(f"port {self.port}")
        if not self.sentinel:
            # No snapshots; a replica is fed at once (Redis 7 waits 5 s by default).
            lines += ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
            lines.append("enable-debug-command local")  # DEBUG SLEEP: a stalled Redis
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
            if not self.sentinel:  # a replica (or a demoted primary) logs in to its primary
                lines.append(f"masterauth {self.password}")
        lines += list(self.acl)
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        lines += list(self.extra)
        return "\n".join(lines) + "\n"

    def start(self) -> RedisServer:
        """Start (again, on the same port and directory) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self.sentinel or not self.conf.exists():
            # A sentinel rewrites its own file (what it learnt); it keeps it across restarts.
            self.conf.write_text(self._config())
            self.conf.chmod(0o600)
        argv = [_binary("redis-sentinel" if self.sentinel else "redis-server"), str(self.conf)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err}{tail}")
            try:
                return bool(self.cmd("PING") == "PONG")
            except (OSError, RespError):
                return False

        wait_until(answers, f"{argv[0]} on {self.port} to answer PING", 15)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM and wait (the port is free again when this returns)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as a crashed primary does."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock: socket.socket = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
            sock = context.wrap_socket(sock, server_hostname="localhost")
        return sock

    def cmd(self, *args: str | bytes | int, timeout: float = 5.0) -> Any:
        """One command on a new connection (authenticated as the default user when a
        password is set); an error reply raises :class:`RespError`."""
        return self.pipeline([args], timeout=timeout)[0]

    def pipeline(
        self, commands: Sequence[Sequence[str | bytes | int]], timeout: float = 5.0
    ) -> list[Any]:
        with self.connect(timeout) as sock:
            lines = _Lines(sock)
            if self.password is not None:
                sock.sendall(_encode(["AUTH", self.password]))
                reply = lines.reply()
                if isinstance(reply, RespError):
                    raise reply
            sock.sendall(b"".join(_encode(c) for c in commands))
            replies = [lines.reply() for _ in commands]
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return replies

    def subscribe(self, channel: str | bytes, timeout: float = 5.0) -> Subscriber:
        """A subscription on its own connection; read messages with ``next()``."""
        sock = self.connect(timeout)
        lines = _Lines(sock)
        if self.password is not None:
            sock.sendall(_encode(["AUTH", self.password]))
            lines.reply()
        sock.sendall(_encode(["SUBSCRIBE", channel]))
        reply = lines.reply()
        assert isinstance(reply, list) and reply[0] == b"subscribe", reply
        return Subscriber(sock, lines)

    def role(self) -> str:
        """``master``, ``slave`` (or ``sentinel``), from ROLE."""
        reply = self.cmd("ROLE")
        value = reply[0]
        return value.decode() if isinstance(value, bytes) else str(value)


class Subscriber:
    """Messages published on one channel, read with a deadline."""

    def __init__(self, sock: socket.socket, lines: _Lines) -> None:
        self.sock = sock
        self.lines = lines

    def next(self, timeout: float = 10.0) -> bytes:
        """The next message's data (TimeoutError when none comes in time)."""
        self.sock.settimeout(timeout)
        while True:
            try:
                reply = self.lines.reply()
            except TimeoutError:
                raise TimeoutError("no message published in time") from None
            if isinstance(reply, list) and reply and reply[0] == b"message":
                data: bytes = reply[2]
                return data

    def close(self) -> None:
        self.sock.close()


@dataclass
class SentinelSet:
    """A primary, its replica(s) and the sentinels that watch them (``MASTER_NAME``)."""

    servers: list[RedisServer]
    sentinels: list[RedisServer]
    master_name: str = MASTER_NAME

    @property
    def sentinel_addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers sees it."""
        for sentinel in self.sentinels:
            try:
                reply = sentinel.cmd("SENTINEL", "get-master-addr-by-name", self.master_name)
            except (OSError, RespError):
                continue
            if reply:
                return int(reply[1])
        raise RuntimeError("no sentinel answers")

    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    def agreed_primary(self) -> RedisServer | None:
        """The primary every sentinel names, if they all name the same one and it says
        it is a primary (ROLE); None while they disagree or it is not one yet."""
        ports = set()
        for sentinel in self.sentinels:
            try:
                reply = sentinel.cmd("SENTINEL", "get-master-addr-by-name", self.master_name)
            except (OSError, RespError):
                return None
            if not reply:
                return None
            ports.add(int(reply[1]))
        if len(ports) != 1:
            return None
        port = ports.pop()
        server = next(s for s in self.servers if s.port == port)
        try:
            return server if server.role() == "master" else None
        except (OSError, RespError):
            return None

    def wait_replicated(self, timeout: float = 90.0) -> RedisServer:
        """Until the sentinels agree on a primary, every other server replicates from it
        (``state=online``) and every sentinel lists each replica as up; the primary.

        Observed, not assumed: a restarted old primary comes back as a primary of its own
        and is only turned into a replica once a sentinel has seen it so for 8 s, at its
        next INFO (every 10 s): 10-20 s on an idle box, more under load. The primary is
        looked up again at each poll (it is the sentinels' call, not ours)."""
        want = len(self.servers) - 1

        def settled() -> RedisServer | None:
            primary = self.agreed_primary()
            if primary is None:
                return None
            try:
                info = primary.cmd("INFO", "replication").decode()
            except (OSError, RespError):
                return None
            if info.count("state=online") != want:
                return None
            for sentinel in self.sentinels:
                try:
                    replicas = sentinel.cmd("SENTINEL", "replicas", self.master_name)
                except (OSError, RespError):
                    return None
                up = 0
                for replica in replicas:
                    fields = dict(zip(replica[::2], replica[1::2], strict=True))
                    flags = fields.get(b"flags", b"").split(b",")
                    if flags == [b"slave"] and fields.get(b"master-link-status") == b"ok":
                        up += 1
                if up != want:
                    return None
            return primary

        return wait_until(settled, "replicas linked to a primary the sentinels agree on", timeout)

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> RedisServer:
        """Until the sentinels name a primary other than ``old_port`` that says it is one."""

        def promoted() -> bool:
            try:
                port = self.primary_port()
            except RuntimeError:
                return False
            if port == old_port:
                return False
            server = next(s for s in self.servers if s.port == port)
            try:
                return server.role() == "master"
            except (OSError, RespError):
                return False

        wait_until(promoted, "a failover", timeout)
        return self.primary()

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()


def start_sentinel_set(
    directory: Path,
    replicas: int = 1,
    sentinels: int = 1,
    password: str | None = None,
    down_after_ms: int = 500,
    sentinel_password: str | None = None,
    tls: TlsFiles | None = None,
) -> SentinelSet:
    """Start a primary, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a
    majority) on loopback; the caller stops them (:meth:`SentinelSet.stop`).
    ``sentinel_password``: the sentinels' own ``requirepass`` (and ``sentinel-pass``,
    what they log in to each other with); ``tls``: every process serves TLS only."""
    started: list[RedisServer] = []
    try:
        primary = RedisServer(directory / "r0", password=password, tls=tls).start()
        started.append(primary)
        servers = [primary]
        for n in range(replicas):
            replica = RedisServer(
                directory / f"r{n + 1}", password=password, replica_of=primary.port, tls=tls
            ).start()
            started.append(replica)
            servers.append(replica)
        quorum = sentinels // 2 + 1
        watch = [
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} {quorum}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} 5000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
            "sentinel resolve-hostnames no",
        ]
        if password is not None:
            watch.append(f"sentinel auth-pass {MASTER_NAME} {password}")
        if sentinel_password is not None:
            watch.append(f"sentinel sentinel-pass {sentinel_password}")
        watchers = []
        for n in range(sentinels):
            sentinel = RedisServer(
                directory / f"s{n}",
                sentinel=True,
                extra=watch,
                password=sentinel_password,
                tls=tls,
            ).start()
            started.append(sentinel)
            watchers.append(sentinel)
        result = SentinelSet(servers=servers, sentinels=watchers)
        result.wait_replicated()
        return result
    except BaseException:
        for process in started:
            process.stop()
        raise


@dataclass
class RedisFactory:
    """Makes servers in ``directory``; stops every one at the end of the test."""

    directory: Path
    made: list[RedisServer] = field(default_factory=list)

    def __call__(self, name: str = "redis", **kwargs: Any) -> RedisServer:
        server = RedisServer(self.directory / name, **kwargs)
        self.made.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self.made:
            server.stop()


def redis_factory_fixture(tmp_path: Path) -> Iterator[RedisFactory]:
    factory = RedisFactory(tmp_path / "redis")
    try:
        yield factory
    finally:
        factory.stop_all()


__all__ = [
    "MASTER_NAME",
    "RedisFactory",
    "RedisServer",
    "RespError",
    "SentinelSet",
    "Subscriber",
    "TlsFiles",
    "make_tls_files",
    "start_sentinel_set",
]


class Stores:
    """Builds :class:`RedisStore` instances on the real reactor for a test; the
    ``stores`` fixture (root conftest) stops every one it made."""

    def __init__(self) -> None:
        self.made: list[RedisStore] = []

    def __call__(self, cfg: StoreConfig, start: bool = True, **kw: Any) -> RedisStore:
        from twisted.internet import reactor

        store = RedisStore(cfg, reactor, **kw)
        self.made.append(store)
        if start:
            store.start()
        return store
