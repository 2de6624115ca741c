"""Signed responses persisted in SQLite, so a restart serves at once.

Rows are written in batches from a thread (never on the reactor thread) and
read back once at start, before the listener opens. A row is only trusted again
if it was signed by the same responder key and the source still reports the
same status for its serial: a certificate revoked while we were down must never
be answered from a stored "good".
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from hsmocsp.responder import SignedResponse

log = Logger()

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


class ResponseStore:
    """One SQLite file (``<data_dir>/responses.sqlite``) shared by all handles."""

    def __init__(self, path: Path, clock: Any, flush_interval: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._pending: list[tuple[Any, ...]] = []
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self._flush_interval = flush_interval

    def start(self) -> None:
        self._loop.start(self._flush_interval, now=False)

    def stop(self) -> Deferred[None]:
        if self._loop.running:
            self._loop.stop()
        d = self.flush()
        d.addBoth(lambda _: self._close())
        return d

    def _close(self) -> None:
        with self._lock:
            self._db.close()

    def recorder(
        self, handle: str, signer_key_hash: bytes
    ) -> Callable[[bytes, int, SignedResponse], None]:
        """The cache's ``on_store`` hook for one handle."""

        def record(key: bytes, serial: int, response: SignedResponse) -> None:
            if response.cacheable and response.status_key:
                self._pending.append((
                    handle, key, str(serial), signer_key_hash, response.status_key, response.der,
                    response.produced_at, response.next_update, response.refresh_at, response.etag,
                ))  # fmt: skip

        return record

    def flush(self) -> Deferred[None]:
        rows, self._pending = self._pending, []
        if not rows:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        now = self._clock.seconds()

        def write() -> None:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?)", rows
                )
                self._db.execute("DELETE FROM responses WHERE next_update <= ?", (now,))
                self._db.execute("COMMIT")

        return deferToThread(write)

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
