"""Child processes of the benchmark: started in their own session, all killed at the end.

Every server the comparison starts goes through :class:`Children`, whose
:meth:`~Children.stop_all` (called from a ``finally``) sends SIGTERM to each child's
process group - ``openssl ocsp -multi`` and nginx fork workers - then SIGKILL after a
grace period. Only processes started here are signalled, by their own ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hsmocsp.devpki.bao import free_port

__all__ = [
    "Child",
    "Children",
    "StartError",
    "bench_children",
    "cpu_seconds",
    "free_port",
    "http",
    "wait_http",
    "wait_tcp",
]


class StartError(RuntimeError):
    """A server did not start or did not become ready in time."""


def http(
    url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """A blocking request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait(5)
        # Workers of a group whose leader already exited (openssl ocsp -multi children).
        _signal_group(self.proc, signal.SIGKILL)
        return self.proc.returncode


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the group led by ``proc`` (it made one, or we made it), else ``proc`` alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.send_signal(sig)


@dataclass
class Children:
    """Every process the benchmark started, plus extra stop hooks (OpenBao)."""

    workdir: Path
    children: list[Child] = field(default_factory=list)
    hooks: list[Callable[[], None]] = field(default_factory=list)

    def start(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None,
        cwd: Path | None = None, new_session: bool = True,
    ) -> Child:  # fmt: skip
        """Start ``cmd`` logging to ``<workdir>/<name>.log``.

        ``new_session=False`` for programs that make their own process group
        (``openssl ocsp -multi`` calls ``setpgid(0, 0)``, which fails in a session leader).
        """
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(cmd), env=dict(env) if env is not None else None,
                cwd=cwd or self.workdir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=new_session,
            )  # fmt: skip
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        for hook in reversed(self.hooks):
            try:
                hook()
            except Exception as err:  # keep stopping the rest
                print(f"warning: stop hook failed: {err}")
        self.hooks.clear()

    def close(self, keep: bool) -> None:
        """The end of a benchmark (its ``finally``): every child and hook stopped, the
        work directory removed unless ``keep``."""
        self.stop_all()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every child."""
    raise SystemExit(128 + signum)


def bench_children(prefix: str) -> Children:
    """The start of a benchmark's ``main``: a fresh work directory named ``prefix...``
    and the :class:`Children` to start in it; SIGTERM now unwinds like Ctrl-C, so the
    caller's ``finally: children.close(keep)`` runs on either."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return Children(Path(tempfile.mkdtemp(prefix=prefix)))


def wait_tcp(child: Child, port: int, timeout: float = 30) -> None:
    """Wait until 127.0.0.1:``port`` accepts a connection, or the child dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartError(f"{child.name} exited {child.proc.returncode}:\n{child.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise StartError(f"{child.name} not listening on {port} after {timeout}s:\n{child.tail()}")


def wait_http(child: Child, url: str, timeout: float = 60) -> None:
    """Wait until ``url`` answers 200, or the child dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartError(f"{child.name} exited {child.proc.returncode}:\n{child.tail()}")
        try:
            if http(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise StartError(f"{child.name}: {url} not ready after {timeout}s:\n{child.tail()}")


def cpu_seconds(pid: int) -> tuple[float, dict[int, float]]:
    """CPU time (user + system) of ``pid`` and of each of its live child processes.

    From ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks) and
    ``/proc/<pid>/task/*/children``; a process that has gone counts 0.
    """
    tick = os.sysconf("SC_CLK_TCK")

    def one(p: int) -> float:
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            return 0.0
        fields = text.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    kids: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            listed = (task / "children").read_text().split()
        except OSError:
            continue
        for child in listed:
            kids[int(child)] = one(int(child))
    return one(pid), kids
