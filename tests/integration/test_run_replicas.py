"""``make run-replicas`` end to end, and the README's replica lines (issue 11).

The runner (``python -m hsmocsp.devpki.run --replicas``) is started as ``make run-replicas``
starts it, in a scratch copy of the repository's layout (``etc/`` with the real
``hsmocsp-dev.yaml`` and ``hsmocsp-replicas.yaml``, ``var/`` beside it), only with free ports:
a real redis-server on its Unix socket under ``var/redis``, OpenBao, the SoftHSM dev PKI, the
signer and two servers. Then every ``openssl ocsp`` line of the README section "Signer and
two servers" runs as written (cwd = the scratch root, ports swapped for the free ones) and
must print ``Response verify OK`` and the status the line asks for. Ctrl-C (SIGINT to the
runner) stops all of it with status 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmocsp.devpki.bao import free_port
from hsmocsp.devpki.redisdev import answers_ping
from hsmocsp.devpki.run import _port_open
from tests.integration.harness import http, wait_until

REPO = Path(__file__).resolve().parents[2]
SECTION = "### Signer and two servers: `make run-replicas`"
README_PORTS = {"signer": 8080, "server 1": 8081, "server 2": 8082}
BAO_PORT = 8200


def readme_replica_lines() -> list[str]:
    """The ``openssl ocsp`` lines of the README's replica section, continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", 1) if "\n## " in section else len(section)]
    section = section[: section.index("\nThe dev PKI")]
    joined = re.sub(r"\\\n\s*", "", section)
    return [line.strip() for line in joined.splitlines() if line.startswith("openssl ocsp")]


def expected_status(line: str) -> str:
    if " -serial " in line:
        return "unknown"
    cert = line.split(" -cert ")[1].split()[0]
    return "revoked" if cert.endswith("revoked.pem") else "good"


def _roles_supported() -> bool:
    """The server role and the Redis store of issue 11 are both here."""
    import importlib.util

    for module in ("hsmocsp.server", "hsmocsp.stores.redis"):
        if importlib.util.find_spec(module) is None:
            return False
    twistd = Path(sys.executable).with_name("twistd")
    proc = subprocess.run(
        [str(twistd), "hsmocsp", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--role" in proc.stdout


def _two_free_ports() -> int:
    """A port p with p+1 free too (OpenBao's cluster listener)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and not _port_open("127.0.0.1", port + 1):
            return port
    raise AssertionError("no two adjacent free ports")


@dataclass
class Stack:
    root: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def log_tail(self) -> str:
        return self.log.read_text("utf-8", "replace")[-4000:]


def _ready(stack: Stack, name: str) -> bool:
    assert stack.proc.poll() is None, f"the runner exited:\n{stack.log_tail()}"
    try:
        return http(stack.url(name) + "/readyz")[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not _roles_supported():
        pytest.skip("no server role or Redis store yet (hsmocsp.server, hsmocsp.stores.redis)")
    if not any(Path(d, "redis-server").is_file() for d in os.get_exec_path()):
        pytest.skip("redis-server is not installed (make installs it)")
    root = tmp_path_factory.mktemp("run-replicas")
    (root / "etc").mkdir()
    bao_port = _two_free_ports()
    ports = {name: free_port() for name in README_PORTS}
    # The real config files, only with this test's ports.
    dev = (REPO / "etc" / "hsmocsp-dev.yaml").read_text()
    (root / "etc" / "hsmocsp-dev.yaml").write_text(
        dev.replace(f"127.0.0.1:{BAO_PORT}", f"127.0.0.1:{bao_port}")
    )
    replicas = (REPO / "etc" / "hsmocsp-replicas.yaml").read_text()
    assert f"signer_url: http://127.0.0.1:{README_PORTS['signer']}" in replicas
    (root / "etc" / "hsmocsp-replicas.yaml").write_text(
        replicas.replace(f"127.0.0.1:{README_PORTS['signer']}", f"127.0.0.1:{ports['signer']}")
    )
    listen = {name: f"tcp:{port}:interface=127.0.0.1" for name, port in ports.items()}
    argv = [
        sys.executable, "-m", "hsmocsp.devpki.run", "--dir", "var/devpki",
        "--config", "etc/hsmocsp-dev.yaml", "--listen", listen["signer"],
        "--replicas", "etc/hsmocsp-replicas.yaml",
        "--server-listen", listen["server 1"], "--server-listen", listen["server 2"],
        "--bao-port", str(bao_port),
    ]  # fmt: skip
    log = root / "run.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SOFTHSM2_CONF", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    stack = Stack(root=root, ports=ports, proc=proc, log=log)
    try:
        for name in ports:
            wait_until(lambda n=name: _ready(stack, n), f"{name} /readyz 200", timeout=240)
        yield stack
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_readme_has_the_replica_lines() -> None:
    lines = readme_replica_lines()
    # Good, revoked and unknown for the three dev PKI levels and the cfssl CA, per server.
    for port in (README_PORTS["server 1"], README_PORTS["server 2"]):
        mine = [line for line in lines if f"-url http://127.0.0.1:{port}/" in line]
        assert len(mine) == 12, port
        assert sorted(expected_status(line) for line in mine) == ["good"] * 4 + [
            "revoked"
        ] * 4 + ["unknown"] * 4
    assert len(lines) == 24


def test_readme_replica_lines_verify_against_both_servers(stack: Stack) -> None:
    lines = readme_replica_lines()
    # The runner writes the same lines for its own tree.
    written = (stack.root / "var" / "devpki" / "check-commands-replicas.txt").read_text()
    for line in lines:
        swapped = line
        for name in ("server 1", "server 2"):
            swapped = swapped.replace(
                f"http://127.0.0.1:{README_PORTS[name]}/", stack.url(name) + "/"
            )
        assert swapped in written.splitlines(), swapped
        args = swapped.split()[2:]
        status = expected_status(line)

        def answered(args: list[str] = args, status: str = status) -> str | None:
            proc = subprocess.run(
                ["openssl", "ocsp", *args], cwd=stack.root, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            out = proc.stdout + proc.stderr
            # A server that has not yet seen the signer's answer says tryLater: wait for it.
            return out if f": {status}" in out or "Responder Error" not in out else None

        out = wait_until(answered, f"an answer to {line}", timeout=60)
        assert "Response verify OK" in out, f"{line}\n{out}"
        assert re.search(rf": {status}\b", out), f"{line}\n{out}"


def test_ctrl_c_stops_the_responders_redis_and_openbao(stack: Stack) -> None:
    socket_path = stack.root / "var" / "redis" / "redis.sock"
    assert answers_ping(socket_path)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(90) == 0, stack.log_tail()
    for name, port in stack.ports.items():
        assert not _port_open("127.0.0.1", port), name
    assert not answers_ping(socket_path)
    assert (stack.root / "var" / "redis" / "dump.rdb").is_file()  # saved on the way out
    assert "Traceback" not in stack.log_tail()
