"""Signed responses persisted in SQLite, so a restart serves at once.

Rows are written in batches from a thread (never on the reactor thread) and
read back once at start, before the listener opens. A row is only trusted again
if it was signed by the same responder key and the source still reports the
same status for its serial: a certificate revoked while we were down must never
be answered from a stored "good".

Writing can fail (the disk is full, the file was made read-only, the database is
locked): then the batch is rolled back and kept, tried again with a growing pause
(``flush_interval`` doubling up to ``max_backoff``), each failure counted
(``write_errors``), and the episode logged twice: once when it starts, once when
writing works again. Responses signed meanwhile wait in a bounded queue: one row
per (handle, CertID), a newer response replacing an older one, and beyond
``max_pending`` rows the oldest are dropped (counted; such a response is simply
signed again after a restart). Serving never depends on the store.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.handle import SignedResponse
from hsmocsp.health import READY, Health, State
from hsmocsp.inflight import OneAtATime

log = Logger()

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    handle TEXT NOT NULL,
    key BLOB NOT NULL,
    serial TEXT NOT NULL,
    signer BLOB NOT NULL,
    status TEXT NOT NULL,
    der BLOB NOT NULL,
    produced_at REAL NOT NULL,
    next_update REAL NOT NULL,
    refresh_at REAL NOT NULL,
    etag TEXT NOT NULL,
    PRIMARY KEY (handle, key)
)
"""

_Row = tuple[Any, ...]


class ResponseStore:
    """One SQLite file (``<data_dir>/responses.sqlite``) shared by all handles.

    ``clock`` times the flushes; ``run_in_thread`` runs the blocking writes (the
    reactor's thread pool by default; tests run them inline).
    """

    def __init__(
        self,
        path: Path,
        clock: Any,
        flush_interval: float = 1.0,
        *,
        max_pending: int = 100_000,
        max_backoff: float = 30.0,
        run_in_thread: Callable[[Callable[[], _T]], Deferred[_T]] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        try:
            # Written by versions that stored unknown answers (a flood filled disks).
            self._db.execute("DELETE FROM responses WHERE status = 'unknown'")
        except sqlite3.Error as err:
            log.warn("store {path}: cannot drop old unknown rows: {err}", path=str(path), err=err)
        self._pending: dict[tuple[str, bytes], _Row] = {}
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._max_backoff = max(max_backoff, flush_interval)
        self._run: Callable[[Callable[[], Any]], Deferred[Any]] = run_in_thread or deferToThread
        self._writing: OneAtATime[None] = OneAtATime()
        self._timer: IDelayedCall | None = None
        self._running = False
        self._delay = flush_interval
        self._problem: str | None = None
        self._failed_since_ok = 0
        self._full_logged = False
        self.write_errors = 0
        """Failed write attempts since start (``hsmocsp_store_write_errors``)."""
        self.written = 0
        self.dropped = 0
        """Rows dropped because the queue was full while writing failed."""

    # --- life -------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._schedule(self._flush_interval)

    def stop(self) -> Deferred[None]:
        """Stop the timer, try once more to write what is pending, close the file."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = self._writing.wait().addCallback(lambda _: self.flush())
        d.addBoth(lambda _: self._close())
        return d

    def _close(self) -> None:
        if self._pending:
            log.warn(
                "store {path}: {n} responses not written at stop ({why})",
                path=str(self.path), n=len(self._pending), why=self._problem or "stopped",
            )  # fmt: skip
        with self._lock:
            self._db.close()

    @property
    def pending(self) -> int:
        """Rows waiting to be written (``hsmocsp_store_pending_rows``)."""
        return len(self._pending)

    def health(self) -> Health:
        """DEGRADED while writes fail: answers are unaffected, but what is signed now
        would be lost by a restart (and re-signed after it)."""
        if self._problem is None:
            return READY
        return Health(State.DEGRADED, f"cannot write {self.path}: {self._problem}")

    # --- recording --------------------------------------------------------------------

    def recorder(
        self, handle: str, signer_key_hash: bytes
    ) -> Callable[[bytes, int, SignedResponse], None]:
        """The cache's ``on_store`` hook for one handle."""

        def record(key: bytes, serial: int, response: SignedResponse) -> None:
            # An unknown serial's answer is never persisted: anyone can ask for any
            # number of them (a flood would fill the disk), and it is cheap to redo.
            if response.cacheable and response.status_key and not response.is_unknown():
                self._queue((handle, key), (
                    handle, key, str(serial), signer_key_hash, response.status_key, response.der,
                    response.produced_at, response.next_update, response.refresh_at, response.etag,
                ))  # fmt: skip

        return record

    def _queue(self, where: tuple[str, bytes], row: _Row) -> None:
        self._pending.pop(where, None)  # re-inserted last: the newest response wins
        self._pending[where] = row
        if len(self._pending) > self._max_pending:
            del self._pending[next(iter(self._pending))]
            self.dropped += 1
            if not self._full_logged:
                self._full_logged = True
                log.warn(
                    "store {path}: {n} responses wait to be written; dropping the oldest",
                    path=str(self.path), n=self._max_pending,
                )  # fmt: skip

    # --- writing ----------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._running:
            self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush().addCallback(lambda _: self._schedule(self._delay))

    def flush(self) -> Deferred[None]:
        """Write what is pending now; never fails (a failure is kept, counted, retried)."""
        if self._writing.running:
            return self._writing.wait()
        if not self._pending:
            return succeed(None)
        return self._writing.run(self._write_batch)

    def _write_batch(self) -> Deferred[None]:
        batch, self._pending = self._pending, {}
        rows = list(batch.values())
        now = self._clock.seconds()

        def write() -> None:
            with self._lock:
                try:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?)", rows
                    )
                    self._db.execute("DELETE FROM responses WHERE next_update <= ?", (now,))
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise

        def written(_: object) -> None:
            self.written += len(rows)
            self._delay = self._flush_interval
            if self._problem is not None:
                log.info(
                    "store {path}: writing again; {n} responses written after {tries} failed"
                    " attempt(s)",
                    path=str(self.path), n=len(rows), tries=self._failed_since_ok,
                )  # fmt: skip
            self._problem = None
            self._failed_since_ok = 0
            self._full_logged = False

        def failed(failure: Failure) -> None:
            # Put the batch back; anything recorded since is newer and stays.
            for where, row in batch.items():
                if where not in self._pending:
                    self._queue(where, row)
            self.write_errors += 1
            self._failed_since_ok += 1
            self._delay = min(self._max_backoff, self._delay * 2)
            why = _describe(failure)
            if self._problem is None:
                log.warn(
                    "store {path}: cannot write ({why}); {n} responses kept in memory,"
                    " retrying every {max:g} s at most",
                    path=str(self.path), why=why, n=len(self._pending), max=self._max_backoff,
                )  # fmt: skip
            self._problem = why

        return self._run(write).addCallbacks(written, failed)

    def load(
        self, handle: str, signer_key_hash: bytes
    ) -> Iterator[tuple[bytes, int, str, SignedResponse]]:
        """Rows of ``handle`` signed by this key and not yet expired (called at start)."""
        now = self._clock.seconds()
        with self._lock:
            rows = self._db.execute(
                "SELECT key, serial, status, der, produced_at, next_update, refresh_at, etag "
                "FROM responses WHERE handle = ? AND signer = ? AND next_update > ?",
                (handle, signer_key_hash, now),
            ).fetchall()
        for key, serial, status, der, produced, next_update, refresh_at, etag in rows:
            yield (
                key,
                int(serial),
                status,
                SignedResponse(
                    der=der,
                    produced_at=produced,
                    this_update=produced,
                    next_update=next_update,
                    refresh_at=refresh_at,
                    etag=etag,
                    cacheable=True,
                    status_key=status,
                ),
            )


def _describe(failure: Failure) -> str:
    """The error text (SQLite's own words, e.g. "database or disk is full"), no traceback."""
    err = failure.value
    if isinstance(err, sqlite3.Error | OSError):
        return str(err) or type(err).__name__
    return f"{type(err).__name__}: {err}"
