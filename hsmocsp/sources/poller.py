"""Run one poll every so often, one at a time, until stopped: the sources' shared loop.

The OpenSSL index, cfssl's certdb, its ``ocsp_responses`` table, an ocspdump file and
Vault's CRLs and health endpoint are all watched the same way: wait ``interval``
seconds, look, wait again. Written once per source, the copies drifted (a
``LoopingCall`` here, a hand-rolled ``callLater`` chain with its own "already polling"
flag or waiter list there). This is the one loop:

* the next run is scheduled when the previous one has *ended*, so a slow poll (a
  million-row re-read) never overlaps the next one or makes runs pile up;
* :meth:`Poller.now` (SIGHUP, a health probe that saw Vault come back) runs a poll at
  once, or joins the one running, and the regular schedule restarts after it;
* a poll may choose the delay before the next one by returning it (Vault refreshes a
  CRL before its ``nextUpdate``); ``None`` means ``interval``;
* a poll that raises is a bug or an outage the poll did not handle itself: it is logged
  with its traceback once per run of failures (not once per poll), and the next run
  comes after ``retry.delay(failures)`` (back-off: the child-process layer's
  :class:`~hsmocsp.childproc.Backoff`, so there is one back-off) instead of ``interval``;
* :meth:`Poller.stop` cancels the timer; a poll already running finishes (its owner
  cancels its own work if it must) and :meth:`Poller.wait` fires when it has;
* time comes from the clock it is given (``task.Clock`` in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from hsmocsp.childproc import Backoff
from hsmocsp.inflight import OneAtATime

__all__ = ["Poll", "Poller"]

log = Logger()

#: One poll: returns (or fires with) the delay before the next one; anything but a
#: number (``None``) means the interval.
Poll = Callable[[], "Deferred[Any] | float | None"]


class Poller:
    """Calls ``poll`` every ``interval`` seconds (see the module docstring)."""

    def __init__(
        self,
        poll: Poll,
        interval: float,
        clock: IReactorTime,
        *,
        name: str,
        retry: Backoff | None = None,
    ) -> None:
        self._poll = poll
        self.interval = interval
        self._clock = clock
        self.name = name
        self._retry = retry
        self._timer: IDelayedCall | None = None
        self._running = False
        self._current: OneAtATime[None] = OneAtATime()
        self.failures = 0
        """Failed polls in a row (0 after a successful one)."""

    @property
    def running(self) -> bool:
        """Started and not stopped."""
        return self._running

    @property
    def polling(self) -> bool:
        """A poll is in progress."""
        return self._current.running

    def start(self, delay: float | None = None) -> None:
        """Poll after ``delay`` seconds (default: ``interval``), then every interval."""
        self._running = True
        self._schedule(self.interval if delay is None else delay)

    def stop(self) -> None:
        """No more polls; one in progress finishes (see :meth:`wait`)."""
        self._running = False
        self._cancel()

    def wait(self) -> Deferred[None]:
        """Fires (never fails) once a poll in progress, if any, has ended."""
        return self._current.wait()

    def now(self) -> Deferred[None]:
        """Poll now, or join the poll in progress; fires when it ends, never fails.

        After it the next regular poll is an interval (or what the poll chose) away.
        """
        return self._current.run(self._run)

    # --- internals -------------------------------------------------------------------

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel()
        if self._running:
            self._timer = self._clock.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.now()

    def _run(self) -> Deferred[None]:
        self._cancel()  # a poll asked for now replaces the one scheduled
        d: Deferred[float | None] = Deferred.fromCoroutine(self._once())
        return d.addCallback(self._schedule_after)

    async def _once(self) -> float | None:
        """One poll; its chosen delay, or the retry delay after a failure."""
        try:
            result = self._poll()
            delay = await result if isinstance(result, Deferred) else result
        except Exception:
            self.failures += 1
            if self.failures == 1:
                log.failure("{name}: poll failed", name=self.name)
            if self._retry is None:
                return None
            return self._retry.delay(self.failures)
        if self.failures:
            log.info(
                "{name}: polling works again after {n} failure(s)",
                name=self.name,
                n=self.failures,
            )
            self.failures = 0
        return delay if isinstance(delay, int | float) else None

    def _schedule_after(self, delay: float | None) -> None:
        self._schedule(self.interval if delay is None else delay)
