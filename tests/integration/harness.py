"""Run the real responder (``twistd -n hsmocsp``) and the real ``openssl ocsp`` client.

The responder runs as a subprocess exactly as an operator runs it, so these
tests cover the plugin, the config loader, the worker pool and the HTTP layer
together. Loopback only, free ports, everything under a temp directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hsmocsp.devpki.bao import free_port
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).with_name("twistd")


def http(
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@dataclass
class Responder:
    """A running ``twistd hsmocsp`` process."""

    config: Path
    env: dict[str, str]
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()
    #: RLIMIT_NOFILE for the responder process (e.g. 1024, systemd's default), or None.
    nofile: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"twistd-{self.port}.log"

    def start(self, wait_ready: bool = True, timeout: float = 60) -> Responder:
        self.port = self.port or free_port()
        env = dict(self.env, PYTHONPATH=str(REPO))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(TWISTD),
                    "--nodaemon",
                    "--pidfile=",
                    "--logfile=-",
                    "hsmocsp",
                    "--config",
                    str(self.config),
                    "--listen",
                    f"tcp:{self.port}:interface=127.0.0.1",
                    *self.extra_args,
                ],
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limits if self.nofile is not None else None,
            )
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()  # not ready, or the run interrupted: the caller never got it
                raise
        return self

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"responder exited {self.proc.returncode}:\n{self.output()}")
            try:
                return http(self.url + "/readyz")[0] == 200
            except OSError:
                return False

        try:
            wait_until(ready, "/readyz to answer 200", timeout)
        except AssertionError as err:
            if not self.alive():
                raise
            raise AssertionError(f"{err}; the responder said:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@dataclass
class OcspResult:
    returncode: int
    output: str

    @property
    def verified(self) -> bool:
        return "Response verify OK" in self.output


def openssl_ocsp(*args: str, env: dict[str, str] | None = None) -> OcspResult:
    proc = subprocess.run(
        ["openssl", "ocsp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or dict(os.environ),
    )
    return OcspResult(proc.returncode, proc.stdout + proc.stderr)
