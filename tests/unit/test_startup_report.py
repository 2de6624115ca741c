"""The start-up report: twistd's daemon status pipe written only once the tree has
started (or failed), systemd notify datagrams on a real Unix socket, exit statuses."""

from __future__ import annotations

import inspect
import io
import os
import socket
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from hsmocsp.errors import ConfigError, HsmOcspError, PinRefused
from hsmocsp.service.notify import SystemdNotifier
from hsmocsp.service.startup import (
    StartupReport,
    exit_status_for,
    failure_message,
    install_daemon_parent,
    wait_for_start,
)
from hsmocsp.service.tree import Component, Sequence


class _Receiver:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def all(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


def _tree(gate: Deferred[None]) -> Sequence:
    tree = Sequence()
    Component("pools", lambda: gate).setServiceParent(tree)
    Component("listener", lambda: None).setServiceParent(tree)
    return tree


def _read_pipe(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return b""


def test_pipe_and_ready_only_once_the_tree_has_started(tmp_path: Path) -> None:
    receiver = _Receiver(tmp_path / "notify")
    r, w = os.pipe()
    runner = {"statusPipe": w, "pidfile": ""}
    gate: Deferred[None] = Deferred()
    tree = _tree(gate)
    report = StartupReport(tree, object(), SystemdNotifier(str(tmp_path / "notify")), runner)
    tree.privilegedStartService()
    report.privilegedStartService()
    assert runner["statusPipe"] is None  # twistd will not write "0" on its own
    tree.startService()
    report.startService()
    assert _read_pipe(r) == b""  # still starting: the parent keeps waiting
    messages = receiver.all()
    assert messages == ["STATUS=starting: pools"]
    gate.callback(None)
    assert _read_pipe(r) == b"0"
    messages = receiver.all()
    assert "STATUS=starting: listener" in messages
    assert messages[-1].splitlines()[0] == "READY=1"
    report.stopService()
    assert receiver.all() == ["STOPPING=1\nSTATUS=stopping"]
    os.close(r)


def test_a_failed_start_tells_the_parent_why_and_sets_the_exit_status(tmp_path: Path) -> None:
    r, w = os.pipe()
    runner = {"statusPipe": w}
    gate: Deferred[None] = Deferred()
    tree = _tree(gate)
    report = StartupReport(tree, object(), SystemdNotifier(None), runner)
    tree.startService()
    report.startService()
    gate.errback(ConfigError("/etc/x.yaml", "listen", "cannot listen on tcp:80: denied"))
    assert (
        _read_pipe(r)
        == b"1 hsmocsp cannot start (exit 78): /etc/x.yaml: listen: cannot listen on tcp:80: denied"
    )
    assert report.exit_status == 78
    assert not tree.getServiceNamed("listener").running
    os.close(r)


class _Refused(HsmOcspError):
    exit_status = 77


@pytest.mark.parametrize(
    "err, status",
    [
        (ConfigError("f", "k", "p"), 78),
        (_Refused("no"), 77),
        (PinRefused("wrong PIN"), 77),
        (HsmOcspError("x"), 1),
        (ValueError(), 1),
    ],
)
def test_exit_status_for(err: BaseException, status: int) -> None:
    assert exit_status_for(err) == status


def test_notifier_without_socket_does_nothing() -> None:
    env = {"OTHER": "1"}
    notifier = SystemdNotifier.from_environ(env)
    assert not notifier.enabled and not notifier.ready("x")


def test_notifier_takes_the_variable_out_of_the_environment(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n")}
    receiver = _Receiver(tmp_path / "n")
    notifier = SystemdNotifier.from_environ(env)
    assert "NOTIFY_SOCKET" not in env  # children (workers, fronts) do not inherit it
    assert notifier.status("two\nlines")
    assert receiver.all() == ["STATUS=two lines"]


def test_notifier_abstract_namespace() -> None:
    name = f"hsmocsp-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    try:
        assert SystemdNotifier("@" + name).ready("ok")
        assert receiver.recv(4096).decode().startswith("READY=1\n")
    finally:
        receiver.close()


def test_notifier_to_a_missing_socket_warns_once_and_carries_on(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody"))
    assert not notifier.status("a") and not notifier.status("b")


@pytest.mark.parametrize(
    "written, status, said",
    [
        (b"0", 0, ""),
        (failure_message(77, "wrong PIN for token t"), 77, "cannot start: wrong PIN for token t"),
        (failure_message(78, "f: listen: " + "x" * 2000), 78, "cannot start: f: listen: xxx"),
        (b"1 something else", 1, "cannot start: b'something else'"),
        (b"", 1, "exited before start-up finished"),
    ],
)
def test_the_daemon_parent_exits_with_the_childs_status(
    written: bytes, status: int, said: str
) -> None:
    r, w = os.pipe()
    os.write(w, written)
    os.close(w)  # (twistd's parent keeps its write end: one read, never until EOF)
    err = io.StringIO()
    assert wait_for_start(r, err) == status
    assert said in err.getvalue() and (status == 0) == (err.getvalue() == "")
    os.close(r)


def test_install_daemon_parent_replaces_twistds_private_wait() -> None:
    """Fails if a Twisted upgrade renames the method twistd's daemon parent calls."""
    from twisted.scripts import _twistd_unix

    runner = _twistd_unix.UnixApplicationRunner
    original = runner.__dict__["_waitForStart"]  # KeyError: Twisted renamed it
    assert "self._waitForStart(" in inspect.getsource(runner.daemonize)  # and still calls it
    try:
        install_daemon_parent()
        r, w = os.pipe()
        os.write(w, failure_message(77, "wrong PIN"))
        assert runner._waitForStart(runner.__new__(runner), r) == 77
        os.close(r)
        os.close(w)
    finally:
        runner._waitForStart = original
