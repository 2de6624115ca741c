"""The service tree: components start in order, each after the previous one is up,
and stop in reverse, each after the next one has stopped; a failed start stops
the tree short of the listener.

The ``ResponderService`` tests run the real tree in-process on the real reactor:
a file signer, an OpenSSL source (its real index-parser child process), SQLite
store and a listener on a free loopback port.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.web.client import HTTPConnectionPool

from hsmocsp.config import load_config
from hsmocsp.errors import ConfigError, ResponderCertError
from hsmocsp.service.service import ResponderService
from hsmocsp.service.tree import Component, Group, Sequence
from tests.waiting import wait_for

VECTORS = Path(__file__).resolve().parents[1] / "testdata" / "ocsp"


class Step:
    """A component that records start/stop and can be held until released."""

    def __init__(self, name: str, log: list[str], hold: bool = False) -> None:
        self.name = name
        self.log = log
        self.hold = hold
        self.pending: Deferred[None] | None = None
        self.stopping: Deferred[None] | None = None
        self.fail: Exception | None = None
        self.hold_stop = False

    def start(self) -> Deferred[None]:
        self.log.append(f"start {self.name}")
        if self.fail is not None:
            d: Deferred[None] = Deferred()
            d.errback(self.fail)
            return d
        if self.hold:
            self.pending = Deferred()
            return self.pending
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.log.append(f"stop {self.name}")
        if self.hold_stop:
            self.stopping = Deferred()
            return self.stopping
        return succeed(None)

    def component(self) -> Component:
        return Component(self.name, self.start, self.stop)


def test_sequence_starts_each_child_after_the_previous_one_is_up() -> None:
    log: list[str] = []
    a, b, c = Step("a", log, hold=True), Step("b", log), Step("c", log)
    tree = Sequence()
    for step in (a, b, c):
        step.component().setServiceParent(tree)
    tree.startService()
    done = tree.whenStarted()
    assert log == ["start a"]  # b waits for a
    assert not done.called
    assert a.pending is not None
    a.pending.callback(None)
    assert log == ["start a", "start b", "start c"]
    assert done.called


def test_sequence_stops_in_reverse_each_after_the_next_one_stopped() -> None:
    log: list[str] = []
    a, b, c = Step("a", log), Step("b", log), Step("c", log)
    tree = Sequence()
    for step in (a, b, c):
        step.component().setServiceParent(tree)
    tree.startService()
    log.clear()
    c.hold_stop = True
    stopped = tree.stopService()
    assert log == ["stop c"]  # b keeps running until c has stopped
    assert c.stopping is not None
    c.stopping.callback(None)
    assert log == ["stop c", "stop b", "stop a"]
    assert stopped.called and not tree.running


def test_a_failed_start_leaves_later_children_unstarted_and_unstopped() -> None:
    log: list[str] = []
    a, b, c = Step("a", log), Step("b", log), Step("c", log)
    b.fail = ResponderCertError("no good")
    tree = Sequence()
    for step in (a, b, c):
        step.component().setServiceParent(tree)
    tree.startService()
    failures: list[Any] = []
    tree.whenStarted().addErrback(failures.append)
    assert [f.type for f in failures] == [ResponderCertError]
    tree.stopService()
    assert log == ["start a", "start b", "stop b", "stop a"]


def test_group_starts_children_together_and_is_up_when_all_are() -> None:
    log: list[str] = []
    a, b = Step("a", log, hold=True), Step("b", log, hold=True)
    group = Group("g")
    a.component().setServiceParent(group)
    b.component().setServiceParent(group)
    group.startService()
    done = group.whenStarted()
    assert log == ["start a", "start b"]
    assert a.pending is not None and b.pending is not None
    a.pending.callback(None)
    assert not done.called
    b.pending.callback(None)
    assert done.called


# --- the real tree ---------------------------------------------------------------------


def _config(tmp_path: Path, responder: str = "responder_rsa", listen: str = "") -> Path:
    for name in ("ca.pem", f"{responder}.pem", "responder_rsa.key"):
        shutil.copy(VECTORS / name, tmp_path / name)
    (tmp_path / "index.txt").write_text("V\t301231235959Z\t\t02\tunknown\t/CN=s2\n")
    cfg = tmp_path / "hsmocsp.yaml"
    cfg.write_text(
        f"""
listen: "{listen or "tcp:0:interface=127.0.0.1"}"
data_dir: {tmp_path / "data"}
presign_rate: 5
handles:
  root:
    path: /ocsp
    issuer: ca.pem
    responder_cert: {responder}.pem
    signer: {{file: responder_rsa.key}}
    source: {{kind: openssl, index: index.txt, poll_interval: 3600}}
"""
    )
    return cfg


def test_the_tree_is_in_start_order(tmp_path: Path) -> None:
    svc = ResponderService(load_config(_config(tmp_path)), reactor)
    names = [child.name for child in svc]
    assert names == [
        "pools", "signers", "sources", "handles", "expiry", "store", "listener", "serving",
        "presigners",
    ]  # fmt: skip
    assert [c.name for c in svc.getServiceNamed("sources")] == ["source root"]
    assert [c.name for c in svc.getServiceNamed("presigners")] == ["presigner root"]


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_real_tree_starts_serves_and_stops(tmp_path: Path) -> None:
    before = set(reactor.getDelayedCalls())
    svc = ResponderService(load_config(_config(tmp_path)), reactor)
    # A client pool of our own, closed below. (treq's global pool kept the connection
    # for 240 s: the client's expiry timer and the server's idle timer outlived the test.)
    client = HTTPConnectionPool(reactor, persistent=True)
    svc.startService()
    try:
        await svc.whenStarted()
        port = svc.listener.port.getHost().port  # type: ignore[union-attr]
        response = await treq.get(f"http://127.0.0.1:{port}/readyz", pool=client)
        assert response.code == 200
        await response.content()
        assert len(svc.presigners) == 1
    finally:
        await client.closeCachedConnections()
        table = svc.listener.factory.table  # type: ignore[union-attr]
        await wait_for(lambda: len(table) == 0, "the server to see the client's close")
        await svc.stopService()
    assert not any(child.running for child in svc)
    # Nothing of the tree (or of this test's client) is left on the reactor.
    left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    assert not left, left
    assert svc.listener is not None and svc.listener.port is None
    with socket.socket() as probe:  # the port is closed
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert (tmp_path / "data" / "responses.sqlite").exists()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_handle_that_cannot_answer_never_listens(tmp_path: Path) -> None:
    # The EC responder certificate does not match the RSA signer key.
    svc = ResponderService(load_config(_config(tmp_path, responder="responder_ec")), reactor)
    svc.startService()
    with pytest.raises(ResponderCertError):
        await svc.whenStarted()
    assert not svc.getServiceNamed("listener").running
    assert svc.getServiceNamed("sources").running  # started, so it is stopped below
    await svc.stopService()
    assert not any(child.running for child in svc)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_a_port_in_use_is_a_config_error_naming_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg = load_config(_config(tmp_path, listen=f"tcp:{busy}:interface=127.0.0.1"))
        svc = ResponderService(cfg, reactor)
        svc.startService()
        with pytest.raises(ConfigError, match=r"hsmocsp.yaml: listen: cannot listen on"):
            await svc.whenStarted()
        await svc.stopService()
