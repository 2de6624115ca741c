"""Root test configuration: a test fails when Twisted logs an error while it runs.

pytest has no equivalent of trial's "logged errors fail the test": an
``Unhandled error in Deferred``, a ``log.failure()`` or any ``isError`` event
would scroll by in the captured output and the test would pass. Here a global
log observer collects such events during each test (its fixtures' set-up and
tear-down included); after a ``gc.collect()`` (an unhandled Deferred error is
logged when the Deferred is garbage-collected) the test fails if any are left.

A test that makes errors be logged on purpose says so: it takes them with the
``logged_errors`` fixture (``logged_errors.take(SomeError)`` returns and forgets
the matching ones), or carries ``@pytest.mark.logs_errors`` to allow all.

An HTTP connection built on a ``StringTransport`` under the real reactor leaves
its idle timer behind (60 s later it fails inside whichever test runs then);
such timers are cancelled when the test that made them ends, with a warning
naming it (the fix is a clock for the site, see tests/unit/test_fastpath.py).

Any other delayed call a test leaves on the real reactor (a timer of a component
it did not stop, a client pool's connection expiry) is reported the same way, a
``LeftDelayedCall`` warning naming the test and each call with when it is due,
but left alone: cancelling it could hide the bug it is a symptom of.
"""

from __future__ import annotations

import gc
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from tests.redisfixtures import (
    RedisFactory,
    RedisServer,
    SentinelSet,
    Stores,
    TlsFiles,
    make_tls_files,
    redis_factory_fixture,
    start_sentinel_set,
)


class LoggedErrors:
    """Error events logged through ``twisted.logger`` while a test runs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)

    def take(self, *types: type[BaseException]) -> list[Failure]:
        """The logged failures of these exception types (forgotten: they will not fail
        the test); without types, every logged failure."""
        taken: list[Failure] = []
        kept: list[dict[str, Any]] = []
        for event in self.events:
            failure = event.get("log_failure")
            if isinstance(failure, Failure) and (not types or failure.check(*types)):
                taken.append(failure)
            else:
                kept.append(event)
        self.events = kept
        return taken

    def describe(self) -> str:
        lines = []
        for event in self.events:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if isinstance(failure, Failure):
                text += "\n" + failure.getTraceback()
            lines.append(text)
        return "\n".join(lines)


@pytest.fixture(autouse=True)
def logged_errors(request: pytest.FixtureRequest) -> Iterator[LoggedErrors]:
    from twisted.internet import reactor

    observer = LoggedErrors()
    timers = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
        _cancel_left_timeouts(reactor, timers, request.node.nodeid)
    if observer.events and request.node.get_closest_marker("logs_errors") is None:
        pytest.fail(
            f"{len(observer.events)} error(s) logged during the test (take them with the"
            f" logged_errors fixture, or mark the test logs_errors):\n{observer.describe()}",
            pytrace=False,
        )


class LeftDelayedCall(UserWarning):
    """A test left a delayed call of its own on the real reactor."""


def _cancel_left_timeouts(reactor: Any, before: set[Any], test: str) -> None:
    new = [call for call in reactor.getDelayedCalls() if call not in before and call.active()]
    timeouts = [c for c in new if isinstance(getattr(c.func, "__self__", None), TimeoutMixin)]
    described = _describe_calls(reactor, timeouts)  # before cancel(): it drops c.func
    for call in timeouts:
        call.cancel()
    if timeouts:
        warnings.warn(
            f"{test} left {len(timeouts)} connection timeout(s) on the real reactor (cancelled):"
            f" {described}",
            LeftDelayedCall,
            stacklevel=1,
        )
    # Twisted's global cooperator re-arms its own tick while it has work: not the test's.
    others = [c for c in new if c not in timeouts and _name(c.func) != "Cooperator._tick"]
    if others:
        warnings.warn(
            f"{test} left {len(others)} delayed call(s) on the real reactor:"
            f" {_describe_calls(reactor, others)}",
            LeftDelayedCall,
            stacklevel=1,
        )


def _name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


def _describe_calls(reactor: Any, calls: list[Any]) -> str:
    now = reactor.seconds()
    return "; ".join(f"{_name(c.func)} due in {c.getTime() - now:.1f} s" for c in calls)


# --- SIGTERM runs the fixtures' tear-down ------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """A test run killed with SIGTERM (a CI timeout, ``kill``) tears its fixtures down.

    By default SIGTERM ends the process at once (before the reactor runs) or makes the
    reactor stop (Twisted's handler, installed when pytest-twisted first runs it), and
    then every later ``blockon`` fails: either way no fixture tear-down runs and the
    PostgreSQL clusters, OpenBao and Redis servers the fixtures started (pg_ctl puts the
    postmaster in its own session) outlive the run. As a KeyboardInterrupt, pytest stops
    the session and still runs every tear-down, as after Ctrl-C. Installed again once the
    reactor runs, over Twisted's own handler.
    """
    import greenlet
    from twisted.internet import reactor

    main = greenlet.getcurrent()

    def interrupt(signum: int, frame: object) -> None:
        if greenlet.getcurrent() is not main:
            # In pytest-twisted's reactor greenlet (a test waiting in blockon): a
            # KeyboardInterrupt here would only be logged by the reactor's main loop.
            # Raise it in the test's greenlet instead; the reactor resumes from here
            # when a tear-down's blockon switches back to it.
            main.throw(KeyboardInterrupt("SIGTERM"))
            return
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    reactor.callWhenRunning(signal.signal, signal.SIGTERM, interrupt)  # type: ignore[attr-defined]


# --- real Redis processes (tests/redisfixtures.py), for every test directory -----------


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """``redis_factory(name, password=..., acl=[...], tls=...)`` starts a redis-server in
    ``tmp_path``; every one is stopped after the test."""
    yield from redis_factory_fixture(tmp_path)


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> RedisServer:
    """A started redis-server on a free loopback port (``.stop()``/``.start()`` again on
    the same port for down/back tests)."""
    return redis_factory()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    """A primary, one replica and one sentinel watching it as ``hsmocsp`` (fast failover)."""
    sentinels = start_sentinel_set(tmp_path / "sentinel")
    try:
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
def redis_tls(tmp_path: Path) -> TlsFiles:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    return make_tls_files(tmp_path / "redis-tls")


@pytest.fixture
def stores() -> Iterator[Stores]:
    """Redis stores made by a test (tests/integration/test_redis_store.py and
    test_sentinel_auth.py), each stopped after it."""
    made = Stores()
    yield made
    for store in made.made:
        pytest_twisted.blockon(store.stop())
