"""The sources' shared poll loop, driven by a task.Clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from hsmocsp.childproc import Backoff
from hsmocsp.sources.poller import Poller
from tests.conftest import LoggedErrors


class Polls:
    """A poll function that records when it ran; ``hold`` makes runs wait for release."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.at: list[float] = []
        self.hold = False
        self.held: list[Deferred[float | None]] = []
        self.fail: Exception | None = None
        self.delay: float | None = None

    def __call__(self) -> Deferred[float | None]:
        self.at.append(self.clock.seconds())
        if self.fail is not None:
            raise self.fail
        if self.hold:
            d: Deferred[float | None] = Deferred()
            self.held.append(d)
            return d
        return succeed(self.delay)

    def release(self) -> None:
        self.held.pop(0).callback(self.delay)


def make(interval: float = 2.0, retry: Backoff | None = None) -> tuple[Clock, Polls, Poller]:
    clock = Clock()
    polls = Polls(clock)
    return clock, polls, Poller(polls, interval, clock, name="test", retry=retry)


def test_polls_every_interval_after_start() -> None:
    clock, polls, poller = make()
    poller.start()
    clock.pump([1.0] * 7)
    assert polls.at == [2.0, 4.0, 6.0]


def test_start_with_a_first_delay() -> None:
    clock, polls, poller = make()
    poller.start(0.5)
    clock.pump([0.5, 2.0])
    assert polls.at == [0.5, 2.5]


def test_next_poll_counts_from_the_end_of_a_slow_one() -> None:
    clock, polls, poller = make()
    polls.hold = True
    poller.start()
    clock.advance(2.0)
    assert polls.at == [2.0] and poller.polling
    clock.pump([1.0] * 5)  # 5 s of a poll that does not end: nothing runs beside it
    assert polls.at == [2.0]
    polls.release()
    assert not poller.polling
    clock.pump([1.0, 1.0])
    assert polls.at == [2.0, 9.0]


def test_now_joins_the_poll_in_progress_and_restarts_the_schedule() -> None:
    clock, polls, poller = make()
    poller.start()
    clock.advance(1.5)
    polls.hold = True
    first, second = poller.now(), poller.now()
    assert polls.at == [1.5]  # one poll for both callers
    assert not first.called and not second.called
    polls.release()
    assert first.called and second.called
    clock.advance(1.9)
    assert polls.at == [1.5]  # the regular poll at 2.0 was replaced
    polls.hold = False
    clock.advance(0.1)
    assert polls.at == [1.5, 3.5]


def test_the_poll_chooses_the_next_delay() -> None:
    clock, polls, poller = make(interval=300.0)
    polls.delay = 5.0
    poller.start(1.0)
    clock.pump([1.0, 5.0, 5.0])
    assert polls.at == [1.0, 6.0, 11.0]
    polls.delay = None  # back to the interval
    clock.pump([5.0, 300.0])
    assert polls.at == [1.0, 6.0, 11.0, 16.0, 316.0]


def test_stop_cancels_the_timer_and_wait_sees_the_running_poll_end() -> None:
    clock, polls, poller = make()
    poller.start()
    clock.advance(2.0)
    polls.hold = True
    clock.advance(2.0)  # a poll in progress at 4.0
    poller.stop()
    waited = poller.wait()
    assert not waited.called
    polls.release()
    assert waited.called
    clock.pump([2.0] * 5)
    assert polls.at == [2.0, 4.0]  # nothing after stop
    assert not clock.getDelayedCalls()


def test_a_failing_poll_backs_off_logs_once_and_recovers(logged_errors: LoggedErrors) -> None:
    clock, polls, poller = make(interval=10.0, retry=Backoff(first=1.0, initial=2.0, cap=4.0))
    polls.fail = RuntimeError("db gone")
    poller.start(1.0)
    clock.pump([0.5] * 32)  # until 16.0
    # 1.0 fails, then after 1, 2, 4, 4, 4 s (capped)
    assert polls.at == [1.0, 2.0, 4.0, 8.0, 12.0, 16.0]
    assert poller.failures == 6
    assert len(logged_errors.take(RuntimeError)) == 1  # once per run of failures
    polls.fail = None
    clock.advance(4.0)
    assert poller.failures == 0
    clock.pump([5.0, 5.0])
    assert polls.at[-2:] == [20.0, 30.0]  # the interval again


def test_without_retry_a_failure_waits_the_interval(logged_errors: LoggedErrors) -> None:
    clock, polls, poller = make(interval=3.0)
    polls.fail = RuntimeError("bug")
    poller.start()
    clock.pump([1.0] * 9)
    assert polls.at == [3.0, 6.0, 9.0]
    assert len(logged_errors.take(RuntimeError)) == 1


def test_a_plain_function_may_be_the_poll() -> None:
    clock = Clock()
    calls: list[float] = []
    poller = Poller(lambda: calls.append(clock.seconds()), 1.0, clock, name="plain")
    poller.start()
    clock.pump([1.0] * 3)
    assert calls == [1.0, 2.0, 3.0]
    done = poller.now()
    assert done.called and calls == [1.0, 2.0, 3.0, 3.0]
