"""The SQLite response store when writing fails: a real SQLite file made full.

``PRAGMA max_page_count`` caps the database at its current size, so the next write
fails inside SQLite with SQLITE_FULL ("database or disk is full"), exactly the error
a full filesystem gives (tests/integration/test_store_disk_full.py fills a real one).
The writes run inline (no thread) and a ``task.Clock`` drives the flush timer, so
nothing here sleeps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from hsmocsp.handle import SignedResponse
from hsmocsp.health import State
from hsmocsp.stores.sqlite import ResponseStore

T = TypeVar("T")
START = 1_750_000_000.0


def inline(f: Callable[[], T]) -> Deferred[T]:
    return maybeDeferred(f)


def response(n: int, status: str = "good") -> SignedResponse:
    der = b"\x30" + n.to_bytes(4, "big") + bytes(1300)  # about a real RSA-2048 response
    return SignedResponse(
        der=der, produced_at=START, this_update=START, next_update=START + 3600,
        refresh_at=START + 1800, etag=f'"{n}"', cacheable=True, status_key=status,
    )  # fmt: skip


def rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT count(*) FROM responses").fetchone()[0]
        return count


def fill(store: ResponseStore) -> None:
    """The database may not grow any more: the next write fails with SQLITE_FULL."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def free(store: ResponseStore) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


class Logged:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("isError") or event.get("log_failure") is not None:
            self.errors.append(formatEvent(event))
        if event.get("log_namespace", "").startswith("hsmocsp.stores.sqlite"):
            self.lines.append(formatEvent(event))

    def __enter__(self) -> Logged:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


def test_disk_full_is_retried_logged_once_and_everything_written_after(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "responses.sqlite"
    store = ResponseStore(path, clock, flush_interval=1.0, run_in_thread=inline)
    record = store.recorder("root", b"k" * 20)
    store.start()
    record(b"key-0", 0, response(0))
    clock.advance(1)
    assert rows(path) == 1 and store.health().state is State.READY
    with Logged() as logged:
        fill(store)
        for n in range(1, 501):
            record(f"key-{n}".encode(), n, response(n))
        for _ in range(120):  # two minutes of a full disk, signing all the while
            clock.advance(1)
            record(f"more-{clock.seconds()}".encode(), 1, response(1))
        health = store.health()
        assert health.state is State.DEGRADED and "database or disk is full" in health.reason
        assert store.write_errors >= 5
        # Back-off: far fewer attempts than seconds.
        assert store.write_errors < 30
        assert rows(path) == 1
        free(store)
        clock.advance(60)  # the longest back-off
    assert rows(path) == 1 + 500 + 120
    assert store.health().state is State.READY
    assert store.pending == 0
    down = [line for line in logged.lines if "cannot write" in line]
    back = [line for line in logged.lines if "writing again" in line]
    assert len(down) == 1 and "database or disk is full" in down[0], logged.lines
    assert len(back) == 1 and "620 responses written" in back[0], logged.lines
    assert logged.errors == []
    done: list[object] = []
    store.stop().addBoth(done.append)
    assert done == [None]


def test_queue_is_bounded_and_a_newer_response_replaces_an_older_one(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "responses.sqlite"
    store = ResponseStore(path, clock, run_in_thread=inline, max_pending=100)
    record = store.recorder("root", b"k" * 20)
    store.start()
    fill(store)
    for n in range(300):
        record(f"key-{n % 150}".encode(), n % 150, response(n))  # each key signed twice
    clock.advance(1)
    assert store.pending == 100 and store.dropped == 200  # 150 keys twice, room for 100
    free(store)
    clock.advance(60)
    assert rows(path) == 100
    with sqlite3.connect(path) as db:
        kept = {k.decode(): d for k, d in db.execute("SELECT key, der FROM responses")}
    # The newest response of each kept key, the oldest keys dropped first.
    assert set(kept) == {f"key-{n}" for n in range(50, 150)}
    assert kept["key-149"] == response(299).der


def test_stop_writes_what_is_pending(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "responses.sqlite"
    store = ResponseStore(path, clock, run_in_thread=inline)
    store.start()
    store.recorder("root", b"k" * 20)(b"key", 7, response(7))
    done: list[object] = []
    store.stop().addBoth(done.append)
    assert done == [None] and rows(path) == 1
    assert clock.getDelayedCalls() == []
