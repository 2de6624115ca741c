"""``make run-replicas``'s Redis: a ``redis-server`` whose data and socket live in one directory.

Dev use only. It listens on a Unix socket (``<dir>/redis.sock``, mode 0700, no TCP port:
nothing else on the machine can reach it, so it needs no password), keeps its RDB snapshot
in ``<dir>`` (so the pre-signed responses survive a restart, as the signer's SQLite does)
and logs to ``<dir>/redis.log``. Like :class:`~hsmocsp.devpki.run.PersistentBao` it runs in
its own session, so a Ctrl-C reaches it only through the runner, after the responders.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from hsmocsp.devpki.tools import DevPkiError, require_tool, terminate

__all__ = ["DevRedis", "answers_ping"]


def answers_ping(path: Path) -> bool:
    """True when a Redis answers PING on the Unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class DevRedis:
    """``redis-server <dir>/redis.conf``: Unix socket only, RDB snapshots in ``directory``."""

    def __init__(self, directory: Path, start_timeout: float = 30.0) -> None:
        self.directory = Path(directory).resolve()
        self.socket = self.directory / "redis.sock"
        self.config = self.directory / "redis.conf"
        self.log = self.directory / "redis.log"
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"DevRedis({str(self.socket)!r})"

    @property
    def address(self) -> str:
        """The ``store.address`` that names this Redis."""
        return f"unix:{self.socket}"

    def _config_text(self) -> str:
        return (
            "# written by hsmocsp.devpki.run (make run-replicas; dev only)\n"
            "port 0\n"
            f"unixsocket {self.socket}\n"
            "unixsocketperm 700\n"
            f"dir {self.directory}\n"
            "dbfilename dump.rdb\n"
            "save 60 1\n"
            "appendonly no\n"
            f"logfile {self.log}\n"
            "daemonize no\n"
        )

    def start(self) -> DevRedis:
        """Start redis-server and wait until it answers PING on its socket."""
        server = require_tool("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        if answers_ping(self.socket):
            raise DevPkiError(
                f"a Redis already answers on {self.socket} (an earlier run still going?); "
                "stop it and run again"
            )
        self.socket.unlink(missing_ok=True)
        self.config.write_text(self._config_text())
        self._proc = subprocess.Popen(
            [server, str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            start_new_session=True,
        )
        deadline = time.monotonic() + self._start_timeout
        while not answers_ping(self.socket):
            if self._proc.poll() is not None:
                tail = self.log.read_text("utf-8", "replace")[-1500:] if self.log.exists() else ""
                self._proc = None
                raise DevPkiError(f"redis-server exited at start; log {self.log}:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise DevPkiError(f"redis-server not answering on {self.socket} in "
                                  f"{self._start_timeout:.0f}s; log {self.log}")  # fmt: skip
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Redis saves its snapshot, then exits), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, timeout)
