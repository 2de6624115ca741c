"""Waiting in tests: on observable state, with a deadline, never a fixed sleep.

A fixed ``sleep`` is either too short on a loaded box (the test fails when the
thing it waits for is merely late) or too long everywhere else. Every test
waits here instead: it names what it waits for, polls a predicate on state the
product exposes (a metric, ``/readyz``, a log line, a pool's health), and fails
after ``timeout`` seconds with an assertion naming what never happened.

Two forms of the same helper:

* :func:`wait_until` blocks the calling thread: for tests that drive real
  processes (``twistd``, ``openssl``) from plain pytest functions;
* :func:`wait_for` is awaited in a ``pytest_twisted`` test: it gives the reactor
  the time between polls, so the code under test runs while we wait.

A ``sleep`` that *is* the behaviour under test (a token kept away for N seconds,
a client that sends a byte a second) is not a wait; such a line says so beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: First pause between polls; it grows by half each time up to MAX_PAUSE, so a
#: quick condition is seen quickly and a slow one does not spin the CPU.
FIRST_PAUSE = 0.02
MAX_PAUSE = 0.5


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail after
    ``timeout`` seconds with an ``AssertionError`` naming ``what``.

    ``condition`` may raise ``AssertionError`` itself to stop the wait early (a
    process that exited will never become ready)."""
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(pause)  # the poll interval of this helper, not a wait of a test
        pause = min(MAX_PAUSE, pause * 1.5)


async def wait_for(
    condition: Callable[[], T | None], what: str, timeout: float = 30, clock: Any = None
) -> T:
    """:func:`wait_until` for code running on the reactor: awaited, the reactor runs
    (and the code under test with it) between polls. ``clock`` defaults to the
    global reactor."""
    from twisted.internet import task

    if clock is None:
        from twisted.internet import reactor as clock
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await task.deferLater(clock, pause, lambda: None)
        pause = min(MAX_PAUSE, pause * 1.5)


async def pause(seconds: float, clock: Any = None) -> None:
    """Let ``seconds`` pass on the reactor: only for a delay that is itself the
    behaviour under test (say which, beside the call), never to wait for a result."""
    from twisted.internet import task

    if clock is None:
        from twisted.internet import reactor as clock
    await task.deferLater(clock, seconds, lambda: None)
