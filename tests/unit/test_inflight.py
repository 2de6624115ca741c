"""Sharing one operation in flight: results, failures, cancellation, synchronous starts."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from hsmocsp.inflight import ObservableDeferred, OneAtATime, OnePerKey


def outcome(d: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_observers_share_one_result_and_each_get_their_own_deferred() -> None:
    source: Deferred[int] = Deferred()
    shared = ObservableDeferred(source)
    a, b = shared.observe(), shared.observe()
    assert a is not b
    seen_a, seen_b = outcome(a), outcome(b)
    source.callback(7)
    assert seen_a == [7] and seen_b == [7]
    assert outcome(shared.observe()) == [7]  # late observers get it at once


def test_cancelling_one_observer_cancels_neither_the_operation_nor_the_others() -> None:
    cancelled: list[bool] = []
    source: Deferred[int] = Deferred(lambda _: cancelled.append(True))
    shared = ObservableDeferred(source)
    a, b = shared.observe(), shared.observe()
    seen_a, seen_b = outcome(a), outcome(b)
    a.cancel()
    assert isinstance(seen_a[0], Failure) and seen_a[0].check(CancelledError)
    assert cancelled == [] and not source.called
    source.callback(3)
    assert seen_b == [3] and len(seen_a) == 1


def test_failure_reaches_every_observer_and_is_consumed_without_observers() -> None:
    source: Deferred[int] = Deferred()
    shared = ObservableDeferred(source)
    seen = outcome(shared.observe())
    source.errback(ValueError("boom"))
    assert seen[0].check(ValueError)
    lonely: Deferred[int] = Deferred()
    ObservableDeferred(lonely)
    lonely.errback(ValueError("nobody listens"))  # the root conftest fails on a logged error
    assert lonely.called


def test_one_at_a_time_shares_then_starts_afresh() -> None:
    starts: list[Deferred[str]] = []

    def start() -> Deferred[str]:
        d: Deferred[str] = Deferred()
        starts.append(d)
        return d

    once: OneAtATime[str] = OneAtATime()
    first, second = once.run(start), once.run(start)
    assert len(starts) == 1 and once.running
    waited = outcome(once.wait())
    starts[0].callback("token")
    assert outcome(first) == ["token"] and outcome(second) == ["token"]
    assert waited == [None] and not once.running
    once.run(start)
    assert len(starts) == 2


def test_one_at_a_time_observer_asking_again_starts_a_new_run() -> None:
    starts: list[Deferred[int]] = []

    def start() -> Deferred[int]:
        d: Deferred[int] = Deferred()
        starts.append(d)
        return d

    once: OneAtATime[int] = OneAtATime()
    again: list[Deferred[int]] = []
    once.run(start).addCallback(lambda _: again.append(once.run(start)))
    starts[0].callback(1)
    assert len(starts) == 2 and not again[0].called


def test_synchronous_and_raising_starts() -> None:
    once: OneAtATime[int] = OneAtATime()
    assert outcome(once.run(lambda: succeed(5))) == [5]
    assert not once.running

    def boom() -> Deferred[int]:
        raise RuntimeError("no")

    seen = outcome(once.run(boom))
    assert seen[0].check(RuntimeError) and not once.running
    keyed: OnePerKey[int, int] = OnePerKey()
    assert outcome(keyed.run(1, lambda: succeed(9))) == [9]
    assert 1 not in keyed


def test_one_per_key_keeps_keys_apart() -> None:
    pending: dict[int, Deferred[int]] = {}

    def start(key: int) -> Deferred[int]:
        pending[key] = Deferred()
        return pending[key]

    keyed: OnePerKey[int, int] = OnePerKey()
    a1 = keyed.run(1, lambda: start(1))
    a2 = keyed.run(1, lambda: pytest.fail("a second start for key 1"))
    b = keyed.run(2, lambda: start(2))
    assert len(keyed) == 2
    cancelled = outcome(a1)
    a1.cancel()
    assert cancelled[0].check(CancelledError)
    pending[1].callback(10)
    assert outcome(a2) == [10] and 1 not in keyed and 2 in keyed
    pending[2].errback(KeyError(2))
    assert outcome(b)[0].check(KeyError) and len(keyed) == 0
