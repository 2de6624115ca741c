"""Service-tree building blocks: components as ``IService`` children, started in order.

Twisted's ``MultiService`` starts its children synchronously and stops them all
at once. hsmocsp's components start asynchronously (a signing pool is up only
when every worker has logged in) and depend on each other (a signer needs its
pool, a handle needs its signer and source, the listener needs the handles), so
:class:`Sequence` starts its children one after the other, each only once the
previous one reports it started, and stops them one after the other in reverse:
listener first, HSM workers last.

:class:`Group` starts its children together (several pools, several sources)
and reports started when all have. :class:`Component` adapts any object with
``start()``/``stop()`` returning Deferreds (or ``None``) to ``IService``.

A child that was never started (start-up failed earlier) is not stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from typing import Any, Protocol, runtime_checkable

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


@runtime_checkable
class Starting(Protocol):
    """A service whose start completes later: :meth:`whenStarted` fires then (or fails)."""

    def whenStarted(self) -> Deferred[None]: ...


def started(child: service.IService) -> Deferred[None]:
    """Fires when ``child`` (already ``startService``-ed) has finished starting."""
    if isinstance(child, Starting):
        return child.whenStarted()
    return succeed(None)


class _StartTracker:
    """Remembers one start outcome and hands it to any number of waiters."""

    def __init__(self) -> None:
        self._outcome: Any = None
        self._done = False
        self._waiters: list[Deferred[None]] = []

    def track(self, d: Deferred[Any]) -> None:
        self._done = False
        self._outcome = None
        d.addBoth(self._settle)

    def _settle(self, outcome: Any) -> None:
        self._done, self._outcome = True, outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)
        return None  # the failure is handed to waiters, not left unhandled here

    def _fire(self, waiter: Deferred[None]) -> None:
        if isinstance(self._outcome, Failure):
            waiter.errback(self._outcome)
        else:
            waiter.callback(None)

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self._done:
            self._fire(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class Component(service.Service):
    """``IService`` over a component's ``start()``/``stop()``.

    ``start``/``stop`` may return a Deferred, a coroutine, or None.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], object],
        stop: Callable[[], object] | None = None,
    ) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop
        self._tracker = _StartTracker()

    def startService(self) -> None:
        super().startService()
        self._tracker.track(_call(self._start))

    def whenStarted(self) -> Deferred[None]:
        return self._tracker.wait()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stop is None:
            return succeed(None)
        return _call(self._stop).addCallback(lambda _: None)

    def __repr__(self) -> str:
        return f"<Component {self.name}>"


def _call(f: Callable[[], object]) -> Deferred[Any]:
    """``f()`` as a Deferred, whether it returns a Deferred, a coroutine or a value."""
    return maybeDeferred(f)


async def _all(ds: SequenceOf[Deferred[Any]]) -> None:
    """Wait for every Deferred; re-raise the first failure (after all have settled)."""
    results = await DeferredList(list(ds), consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()


class Group(service.MultiService):
    """Children started together; started when all are, failed if any failed.

    Stopped together too (``MultiService``'s own stop); only started children.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.setName(name)
        self._tracker = _StartTracker()

    def privilegedStartService(self) -> None:
        # Children bind nothing early: everything starts in startService, in order.
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        service.Service.startService(self)
        children = list(self)
        for child in children:
            child.startService()
        self._tracker.track(Deferred.fromCoroutine(_all([started(c) for c in children])))

    def whenStarted(self) -> Deferred[None]:
        return self._tracker.wait()

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        running = [c for c in reversed(list(self)) if c.running]
        return Deferred.fromCoroutine(_all([maybeDeferred(c.stopService) for c in running]))


class Sequence(service.MultiService):
    """Children started one after the other, each once the previous one started;
    stopped one after the other in reverse order.

    :meth:`whenStarted` fails with the first child's start failure; the children
    after it are then never started.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tracker = _StartTracker()
        #: Called with each child's name as it begins to start (progress reports).
        self.stage_observers: list[Callable[[str], None]] = []

    def privilegedStartService(self) -> None:
        # The listener must not bind before the components it serves are up.
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        service.Service.startService(self)
        self._tracker.track(Deferred.fromCoroutine(self._start_children()))

    async def _start_children(self) -> None:
        for child in list(self):
            if not self.running:
                return
            for observe in self.stage_observers:
                observe(str(child.name))
            child.startService()
            await started(child)

    def whenStarted(self) -> Deferred[None]:
        return self._tracker.wait()

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                # One child failing to stop must not leave the ones before it
                # (HSM workers, the store's last flush) running.
                log.failure("stopping {child!r} failed", child=child)


__all__ = ["Component", "Group", "Sequence", "Starting", "started"]
