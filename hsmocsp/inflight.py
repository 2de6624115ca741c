"""Share one operation in flight among everyone who asks for its result meanwhile.

A Vault lookup for one serial, a CRL refresh, a login, a re-read of ``index.txt``,
a signature for one CertID: each is expensive or must not run twice at once, and
each can be asked for again while it runs. The answer is always the same: start
it once, hand every caller its *own* Deferred for the result, forget it when it
ends. This module is that, once (synapse's ``ObservableDeferred`` is the model).

Two rules every user relies on:

* cancelling an observer (Klein cancels a handler when its client disconnects)
  fails only that observer with ``CancelledError``; the shared operation and the
  other observers carry on;
* a failure of the shared operation reaches every observer; if nobody is
  observing it is dropped here (the operation logs what it must itself), never
  left as an "Unhandled error in Deferred".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure

__all__ = ["ObservableDeferred", "OneAtATime", "OnePerKey"]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class ObservableDeferred(Generic[T]):
    """Wraps a Deferred; :meth:`observe` gives any number of independent Deferreds for
    its result. The wrapped Deferred's own result is consumed (it becomes None)."""

    __slots__ = ("_observers", "_result")

    def __init__(self, deferred: Deferred[T]) -> None:
        self._observers: list[Deferred[T]] = []
        self._result: tuple[bool, T | Failure] | None = None
        deferred.addBoth(self._fire)

    def _fire(self, result: T | Failure) -> None:
        self._result = (not isinstance(result, Failure), result)
        observers, self._observers = self._observers, []
        for observer in observers:
            if observer.called:  # cancelled by its caller: nothing to tell it
                continue
            if isinstance(result, Failure):
                observer.errback(result)
            else:
                observer.callback(result)

    @property
    def done(self) -> bool:
        return self._result is not None

    def observe(self) -> Deferred[T]:
        """A new Deferred for the result; cancelling it cancels nothing else."""
        if self._result is not None:
            ok, value = self._result
            if ok:
                return succeed(value)  # type: ignore[arg-type]
            assert isinstance(value, Failure)
            return fail(value)
        observer: Deferred[T] = Deferred()
        self._observers.append(observer)
        return observer


def _started(
    start: Callable[[], Deferred[T]], ended: Callable[[ObservableDeferred[T]], None]
) -> tuple[ObservableDeferred[T], Deferred[T]]:
    """Start an operation shared by observers: ``(shared, first observer)``.

    ``ended`` runs when it finishes, *before* any observer hears of it, so an
    observer that asks again starts a new operation rather than joining the old one.
    The first observer is registered before ``start()`` runs, which may fire
    synchronously or raise (then the observer fails).
    """
    operation: Deferred[T] = Deferred()
    shared = ObservableDeferred(operation)
    first = shared.observe()

    def end(result: T | Failure) -> T | Failure:
        ended(shared)
        return result

    maybeDeferred(start).addBoth(end).chainDeferred(operation)
    return shared, first


class OneAtATime(Generic[T]):
    """At most one run of an operation at a time; callers meanwhile share its result."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: ObservableDeferred[T] | None = None

    @property
    def running(self) -> bool:
        return self._current is not None

    def run(self, start: Callable[[], Deferred[T]]) -> Deferred[T]:
        """The result of the running operation, or of ``start()`` started now."""
        current = self._current
        if current is not None:
            return current.observe()
        shared, first = _started(start, self._ended)
        if not shared.done:
            self._current = shared
        return first

    def wait(self) -> Deferred[None]:
        """Fires (with None, never failing) once the running operation, if any, ended."""
        current = self._current
        if current is None:
            return succeed(None)
        return current.observe().addBoth(lambda _: None)

    def _ended(self, shared: ObservableDeferred[T]) -> None:
        if self._current is shared:
            self._current = None


class OnePerKey(Generic[K, T]):
    """:class:`OneAtATime` for each key: one operation per key in flight."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, ObservableDeferred[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    def run(self, key: K, start: Callable[[], Deferred[T]]) -> Deferred[T]:
        """The result of the operation running for ``key``, or of ``start()`` started now."""
        current = self._flights.get(key)
        if current is not None:
            return current.observe()

        def ended(shared: ObservableDeferred[T]) -> None:
            if self._flights.get(key) is shared:
                del self._flights[key]

        shared, first = _started(start, ended)
        if not shared.done:
            self._flights[key] = shared
        return first
