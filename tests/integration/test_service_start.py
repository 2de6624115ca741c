"""Start and stop like a service: a real ``twistd hsmocsp`` daemonised and in the
foreground, a real SoftHSM token, a real systemd-style notify socket.

- daemonised (no ``-n``), the parent exits only once start-up has finished: 0 when
  the port answers, non-zero (and no pidfile left) when start-up failed (wrong PIN);
- ``$NOTIFY_SOCKET``: STATUS= lines while starting, READY=1 once listening,
  STOPPING=1 on the way down;
- a port in use, a configuration error: one line, no traceback, no usage text;
- ``twistd hsmocsp --version`` prints hsmocsp's version.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmocsp import __version__
from hsmocsp.devpki.bao import free_port
from hsmocsp.devpki.opensslca import DevPki
from tests.integration.conftest import dev_env, level1_config
from tests.integration.harness import REPO, TWISTD, Responder
from tests.waiting import wait_until

EX_CONFIG = 78


def _twistd(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TWISTD), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env, PYTHONPATH=str(REPO)),
        cwd=cwd,
    )


def _running_with(marker: str) -> list[int]:
    """Pids of our processes whose command line mentions ``marker`` (a unique temp path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _wait_gone(marker: str, timeout: float = 30) -> None:
    wait_until(lambda: not _running_with(marker), f"no process running with {marker!r}", timeout)


def _stop_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def test_daemon_with_wrong_pin_exits_nonzero_and_leaves_no_pidfile(
    devpki: DevPki, tmp_path: Path
) -> None:
    pin = tmp_path / "pin"
    pin.write_text("99887766\n")
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(devpki.pin_file), str(pin)))
    pidfile = tmp_path / "twistd.pid"
    log = tmp_path / "twistd.log"
    port = free_port()
    proc = _twistd(
        f"--pidfile={pidfile}", f"--logfile={log}", "hsmocsp", "--config", str(cfg),
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        env=dev_env(devpki), cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "cannot start" in proc.stderr, proc.stderr
        assert "99887766" not in proc.stdout + proc.stderr + log.read_text()
        _wait_gone(str(cfg))
        assert not pidfile.exists()
    finally:
        for pid in _running_with(str(cfg)):
            _stop_pid(pid)


def test_daemon_parent_exits_zero_once_the_port_answers(devpki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(devpki, tmp_path)
    pidfile = tmp_path / "twistd.pid"
    port = free_port()
    proc = _twistd(
        f"--pidfile={pidfile}", f"--logfile={tmp_path / 'twistd.log'}", "hsmocsp",
        "--config", str(cfg), "--listen", f"tcp:{port}:interface=127.0.0.1",
        env=dev_env(devpki), cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # No waiting: the parent returned only once the responder was serving.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            assert resp.status == 200
        pid = int(pidfile.read_text())
    finally:
        for running in _running_with(str(cfg)):
            _stop_pid(running)
    _wait_gone(str(cfg))
    assert not pidfile.exists()
    assert pid > 0


class NotifySocket:
    """A systemd-style notify socket: a bound unix datagram socket, messages kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 60, alive: Responder | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.messages):
                return
            if alive is not None and not alive.alive():
                raise AssertionError(f"exited before {line}:\n{alive.output()}")
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no {line} in {self.messages}")

    def lines(self) -> list[str]:
        return [line for m in self.messages for line in m.splitlines()]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_sd_notify_ready_once_listening_then_stopping(
    devpki: DevPki, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    env = dict(dev_env(devpki), NOTIFY_SOCKET=str(notify_socket.path))
    r = Responder(config=level1_config(devpki, tmp_path), env=env, workdir=tmp_path)
    r.start(wait_ready=False)
    try:
        notify_socket.wait_for("READY=1", alive=r)
        # READY=1 means listening: answered at once, no waiting.
        with urllib.request.urlopen(r.url + "/readyz", timeout=10) as resp:
            assert resp.status == 200
        lines = notify_socket.lines()
        ready_at = lines.index("READY=1")
        assert any(line.startswith("STATUS=") for line in lines[:ready_at])  # progress
        assert any(line.startswith("MAINPID=") for line in lines)
    finally:
        r.stop()
    notify_socket.wait_for("STOPPING=1", timeout=20)


def test_sd_notify_reports_a_failed_start(
    devpki: DevPki, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    pin = tmp_path / "pin"
    pin.write_text("99887766\n")
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(devpki.pin_file), str(pin)))
    env = dict(dev_env(devpki), NOTIFY_SOCKET=str(notify_socket.path))
    r = Responder(config=cfg, env=env, workdir=tmp_path).start(wait_ready=False)
    assert r.proc is not None
    assert r.proc.wait(60) != 0
    notify_socket.wait_for("STOPPING=1", timeout=5)
    lines = notify_socket.lines()
    assert "READY=1" not in lines
    assert any(line.startswith("STATUS=") and "cannot start" in line for line in lines)
    assert not any("99887766" in line for line in lines)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_naming_listen(
    devpki: DevPki, tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = Responder(
            config=level1_config(devpki, tmp_path), env=dev_env(devpki), workdir=tmp_path,
            port=taken.getsockname()[1], extra_args=("--workers", workers),
        )  # fmt: skip
        r.start(wait_ready=False)
        assert r.proc is not None
        code = r.proc.wait(60)
    out = r.output()
    assert code != 0, out
    assert "Traceback" not in out
    assert "--listen: cannot listen on" in out and "Address already in use" in out


def test_a_config_error_is_one_message_and_status_78(tmp_path: Path) -> None:
    cfg = tmp_path / "hsmocsp.yaml"
    cfg.write_text("listen: tcp:8080\nhandles: {}\nbogus_key: 1\n")
    proc = _twistd("-n", "--pidfile=", "hsmocsp", "--config", str(cfg),
                   env=dict(os.environ), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == EX_CONFIG, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert str(cfg) in out and "handles: at least one handle is required" in out
    assert "--listen" not in out and "Options" not in out  # not the usage text
    assert "Traceback" not in out


def test_a_certificate_that_is_not_one_is_a_config_error_too(
    devpki: DevPki, tmp_path: Path
) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(devpki.ocsp_pem), str(tmp_path / "junk.pem")))
    proc = _twistd("-n", "--pidfile=", "hsmocsp", "--config", str(cfg),
                   env=dev_env(devpki), cwd=tmp_path)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == EX_CONFIG, out
    assert "handles.root.responder_cert" in out and "is not a certificate" in out
    assert "Traceback" not in out and "Options" not in out


def test_twistd_hsmocsp_version() -> None:
    proc = _twistd("hsmocsp", "--version", env=dict(os.environ), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"hsmocsp {__version__}"), proc.stdout


def _json_lines(text: str) -> list[dict[str, object]]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_service_log(devpki: DevPki, tmp_path: Path) -> None:
    """--logger=hsmocsp.logs.json_observer: every line one JSON object; a wrong PIN is
    one critical line without a traceback; a good start says where it listens."""
    pin = tmp_path / "pin"
    pin.write_text("99887766\n")
    bad = level1_config(devpki, tmp_path)
    bad.write_text(bad.read_text().replace(str(devpki.pin_file), str(pin)))
    proc = _twistd(
        "-n", "--pidfile=", "--logger=hsmocsp.logs.json_observer", "hsmocsp",
        "--config", str(bad), "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        env=dev_env(devpki), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    records = _json_lines(proc.stdout)  # every line parses
    critical = [r for r in records if r["level"] == "critical"]
    assert len(critical) == 1 and "cannot start" in str(critical[0]["message"])
    assert not any("traceback" in r for r in records)
    assert "99887766" not in proc.stdout + proc.stderr

    good_dir = tmp_path / "good"
    good_dir.mkdir()
    port = free_port()
    with subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "--logger=hsmocsp.logs.json_observer", "hsmocsp",
         "--config", str(level1_config(devpki, good_dir)),
         "--listen", f"tcp:{port}:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(dev_env(devpki), PYTHONPATH=str(REPO)), cwd=good_dir,
    ) as running:  # fmt: skip
        assert running.stdout is not None
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = running.stdout.readline()
            if not line:
                break
            seen.extend(_json_lines(line))
            if any("hsmocsp listening on" in str(r["message"]) for r in seen):
                break
        running.send_signal(signal.SIGTERM)
        running.wait(30)
    listening = [r for r in seen if "hsmocsp listening on" in str(r["message"])]
    assert listening and listening[0]["listen"] == f"tcp:{port}:interface=127.0.0.1"
    assert any(r.get("name") == "root" and "serving" in str(r["message"]) for r in seen)


def _daemon(cfg: Path, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``twistd hsmocsp`` daemonised (no ``-n``): the status is the parent's."""
    return _twistd(
        f"--pidfile={tmp_path / 'twistd.pid'}", f"--logfile={tmp_path / 'twistd.log'}",
        "hsmocsp", "--config", str(cfg), "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        env=env, cwd=tmp_path,
    )  # fmt: skip


def test_daemon_parent_exits_77_when_the_pin_is_refused(devpki: DevPki, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("99887766\n")
    cfg = level1_config(devpki, tmp_path)
    cfg.write_text(cfg.read_text().replace(str(devpki.pin_file), str(pin)))
    try:
        proc = _daemon(cfg, tmp_path, dev_env(devpki))
        assert proc.returncode == 77, proc.stdout + proc.stderr
        assert "cannot start" in proc.stderr and "99887766" not in proc.stderr
        _wait_gone(str(cfg))
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        for pid in _running_with(str(cfg)):
            _stop_pid(pid)


@pytest.mark.parametrize("fault", ["yaml", "certificate"])
def test_daemon_parent_exits_78_for_a_config_error(
    devpki: DevPki, tmp_path: Path, fault: str
) -> None:
    cfg = level1_config(devpki, tmp_path)
    if fault == "yaml":
        cfg.write_text(cfg.read_text() + "bogus_key: 1\n")
    else:
        (tmp_path / "junk.pem").write_text("not a certificate\n")
        cfg.write_text(cfg.read_text().replace(str(devpki.ocsp_pem), str(tmp_path / "junk.pem")))
    try:
        proc = _daemon(cfg, tmp_path, dev_env(devpki))
        out = proc.stdout + proc.stderr
        assert proc.returncode == EX_CONFIG, out
        assert ("bogus_key" if fault == "yaml" else "is not a certificate") in out
        assert "Traceback" not in out
        _wait_gone(str(cfg))
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        for pid in _running_with(str(cfg)):
            _stop_pid(pid)


def test_daemon_parent_exits_78_when_the_port_is_taken(devpki: DevPki, tmp_path: Path) -> None:
    cfg = level1_config(devpki, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            proc = _twistd(
                f"--pidfile={tmp_path / 'twistd.pid'}", f"--logfile={tmp_path / 'twistd.log'}",
                "hsmocsp", "--config", str(cfg),
                "--listen", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1",
                env=dev_env(devpki), cwd=tmp_path,
            )  # fmt: skip
            assert proc.returncode == EX_CONFIG, proc.stdout + proc.stderr
            _wait_gone(str(cfg))
        finally:
            for pid in _running_with(str(cfg)):
                _stop_pid(pid)
