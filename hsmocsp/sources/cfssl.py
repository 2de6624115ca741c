"""Certificate status from cfssl's certificate database (SQLite or PostgreSQL).

An operator points ``source: {kind: cfssl, db_config: FILE}`` at the db-config JSON cfssl
already uses. The whole ``certificates`` table is read once at start (in our database
thread, :mod:`hsmocsp.sources.certdb`); after that every ``poll_interval`` reads only what
changed:

* revocations: rows whose ``revoked_at`` is later than the newest one seen (minus a
  margin for transactions that commit late) — ``cfssl revoke`` sets ``revoked_at`` to
  ``CURRENT_TIMESTAMP``, so that column is the revocation watermark;
* new certificates: on SQLite, rows with a ``rowid`` above the highest seen; on PostgreSQL
  (no cheap equivalent in cfssl's schema) a serial we do not know is looked up by primary
  key when it is asked for, and serials answered ``unknown`` are asked again at every poll,
  so a certificate issued after such an answer replaces it within ``poll_interval``;
* a full re-read every ``full_reload`` seconds catches anything else (rows edited by hand).

Which rows belong to the handle's CA: ``authority_key_identifier`` equal to the issuer's
SubjectKeyIdentifier in lowercase hex (what a current cfssl writes), or empty (what cfssl
1.2.0 writes on every row) — so a certdb shared by several CAs needs AKIs, and one served
CA per handle accepts both.

When the database cannot be reached, serials already loaded are answered from memory,
a serial never seen fails with :class:`SourceUnavailable` (tryLater), the outage is logged
once and shown by ``health()``/``ready()``, and the next successful poll or lookup ends it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import SourceError, SourceUnavailable, UnknownIssuer
from hsmocsp.presigned import PresignedResponse, parse_presigned
from hsmocsp.sources.certdb import CertDB, CertRow, DbThread, Loaded
from hsmocsp.sources.poller import Poller
from hsmocsp.sources.state import PresignedOnly, SourceState, StateBacked
from hsmocsp.status import CertStatus, Status

__all__ = ["CfsslResponseSource", "CfsslSource", "issuer_aki"]

if TYPE_CHECKING:
    from hsmocsp.config import CfsslSourceConfig

log = Logger()

#: Revocations up to this long before the newest one seen are read again at each poll
#: (a transaction's CURRENT_TIMESTAMP is its start, it may commit later).
REVOKED_MARGIN = timedelta(seconds=120)
#: How many "unknown" serials are remembered and asked again (PostgreSQL), and for how long.
UNKNOWN_RECHECK_MAX = 10_000
UNKNOWN_RECHECK_FOR = 24 * 3600.0
#: Serials per re-check query.
RECHECK_BATCH = 500



def issuer_aki(issuer: x509.Certificate) -> str:
    """The issuer's key identifier as cfssl writes ``authority_key_identifier``."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest
    return ski.hex()


def _same_ca(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a == b or (a.subject == b.subject and a.public_key() == b.public_key())


class CfsslSource(StateBacked):
    """A :class:`~hsmocsp.sources.StatusSource` over cfssl's ``certificates`` table.

    Health: DEGRADED while the database cannot be reached (serials loaded are still
    answered, new ones get tryLater); FAILED before the first load.
    """

    def __init__(
        self, config: CfsslSourceConfig, issuer: x509.Certificate, *, reactor: Any
    ) -> None:
        db = config.db
        self.config = config
        self._reactor = reactor
        self.db_config = db
        self._db = CertDB(db)
        self._thread = DbThread(self._db, reactor)
        # Point lookups get their own connection and thread: a full re-read of a big table
        # (seconds) must not make a new serial wait into tryLater.
        self._lookup_db = CertDB(db)
        self._lookups = DbThread(self._lookup_db, reactor, name="hsmocsp-certdb-lookups")
        self._issuer = issuer
        self._aki = issuer_aki(issuer)
        self._full_reload = config.full_reload
        self._lookup_timeout = config.lookup_timeout
        self._good: set[int] = set()
        self._revoked: dict[int, CertStatus] = {}
        self._rowid_wm = 0
        self._revoked_wm: datetime | None = None
        self._unknown: OrderedDict[int, float] = OrderedDict()
        self._inflight: dict[int, list[Deferred[CertStatus]]] = {}
        self.state = SourceState(db.describe(), reactor)
        self._loaded_at = 0.0
        self._started = False
        self._poller = Poller(self._poll, config.poll_interval, reactor, name=self.where)
        self._bad_seen: set[str] = set()

    def __repr__(self) -> str:
        return f"CfsslSource({self.db_config.describe()!r})"

    @property
    def where(self) -> str:
        return self.db_config.describe()

    # --- StatusSource (generation, checked_at, on_change, health: StateBacked) ------------

    def issuers(self) -> Sequence[x509.Certificate]:
        return (self._issuer,)

    def crl_der(self, issuer: x509.Certificate) -> bytes | None:
        return None  # cfssl's certdb holds no CRL (cfssl gencrl writes one elsewhere)

    def known_serials(self, issuer: x509.Certificate) -> Iterable[int]:
        if not _same_ca(issuer, self._issuer):
            return ()
        return list(self._good) + list(self._revoked)

    def ready(self) -> bool:
        return self._started and self.state.health().ready

    def start(self) -> Deferred[None]:
        self._thread.start()
        self._lookups.start()

        def loaded(_: None) -> None:
            self._started = True
            self.state.loaded()
            log.info(
                "{where}: {good} good and {revoked} revoked certificates of issuer {aki}",
                where=self.where,
                good=len(self._good),
                revoked=len(self._revoked),
                aki=self._aki,
            )
            self._poller.start()

        def failed(failure: Failure) -> Failure:
            self._thread.stop()
            self._lookups.stop()
            return failure

        return self._full_load(initial=True).addCallbacks(loaded, failed)

    def stop(self) -> Deferred[None]:
        self._started = False
        self._poller.stop()
        self._thread.stop()
        self._lookups.stop()
        return succeed(None)

    def refresh(self) -> Deferred[None]:
        """Poll now (SIGHUP), or join the poll in progress; never fails."""
        return self._poller.now()

    def status(self, issuer: x509.Certificate, serial: int) -> Deferred[CertStatus]:
        if not _same_ca(issuer, self._issuer):
            return fail(UnknownIssuer(f"{self.where} does not serve this CA"))
        found = self._revoked.get(serial)
        if found is not None:
            return succeed(found)
        if serial in self._good:
            return succeed(CertStatus.good())
        return self._lookup(serial)

    # --- loading ------------------------------------------------------------------------

    def _full_load(self, initial: bool = False) -> Deferred[None]:
        bad: list[str] = []
        db = self._db

        def work(conn: Any) -> Loaded:
            return db.load_all(conn, self._aki, bad)

        def install(result: Loaded) -> None:
            good, revoked = result.good, result.revoked
            rowid, newest = result.max_rowid, result.newest_revocation
            self._report_bad(bad)
            changed: set[int] | None = None
            if not initial:
                changed = set(self._good ^ good)
                changed.update(
                    s for s in set(self._revoked) | set(revoked)
                    if self._revoked.get(s) != revoked.get(s)
                )  # fmt: skip
            self._good, self._revoked = good, revoked
            self._rowid_wm = max(self._rowid_wm, rowid)
            if newest is not None and (self._revoked_wm is None or newest > self._revoked_wm):
                self._revoked_wm = newest
            self._loaded_at = self._reactor.seconds()
            self._seen_ok()
            self.state.changed(frozenset(changed or ()), notify=bool(changed))

        return self._thread.run(work).addCallback(install)

    def _ours(self, aki: str) -> bool:
        return aki == "" or aki == self._aki

    def _poll(self) -> Deferred[None]:
        """One incremental poll (or the periodic full re-read); never fails.

        Run by :attr:`_poller`, one at a time."""
        if not self._started:
            return succeed(None)
        now = self._reactor.seconds()
        if self._full_reload > 0 and now - self._loaded_at >= self._full_reload:
            d = self._full_load()
        else:
            d = self._incremental(now)

        def done(result: Failure | None) -> None:
            if isinstance(result, Failure):
                if not isinstance(result.value, SourceUnavailable | SourceError):
                    log.failure("{where}: poll failed unexpectedly", result, where=self.where)
                self._unreachable(result.getErrorMessage())

        return d.addBoth(done)

    def _incremental(self, now: float) -> Deferred[None]:
        db = self._db
        rowid = self._rowid_wm
        wm = self._revoked_wm or datetime(1970, 1, 1, tzinfo=UTC)
        since = wm - REVOKED_MARGIN
        while self._unknown:
            serial, first = next(iter(self._unknown.items()))
            if now - first < UNKNOWN_RECHECK_FOR:
                break
            del self._unknown[serial]
        recheck = [] if db.is_sqlite else list(self._unknown)
        bad: list[str] = []

        def work(conn: Any) -> tuple[list[CertRow], set[int]]:
            rows: list[CertRow] = []
            if db.is_sqlite:
                rows += db.rows_after(conn, rowid, bad)
            rows += db.revoked_since(conn, since, bad)
            for i in range(0, len(recheck), RECHECK_BATCH):
                rows += db.rows_for(conn, recheck[i : i + RECHECK_BATCH], bad)
            return rows, set(recheck)

        def apply(result: tuple[list[CertRow], set[int]]) -> None:
            rows, _ = result
            self._report_bad(bad)
            self._seen_ok()
            changed = self._merge(rows)
            if changed:
                self.state.changed(frozenset(changed))

        return self._thread.run(work).addCallback(apply)

    def _merge(self, rows: Iterable[CertRow]) -> set[int]:
        """Fold rows into what we know; the serials whose status changed."""
        by_serial: dict[int, CertStatus] = {}
        for row in rows:
            self._rowid_wm = max(self._rowid_wm, row.rowid)
            if row.revoked_at is not None and (
                self._revoked_wm is None or row.revoked_at > self._revoked_wm
            ):
                self._revoked_wm = row.revoked_at
            if not self._ours(row.aki):
                continue
            prior = by_serial.get(row.serial)
            if prior is None or row.status.status is Status.revoked:
                by_serial[row.serial] = row.status
        changed: set[int] = set()
        for serial, status in by_serial.items():
            was_unknown = self._unknown.pop(serial, None) is not None
            if status.status is Status.revoked:
                if self._revoked.get(serial) != status:
                    self._revoked[serial] = status
                    self._good.discard(serial)
                    changed.add(serial)
            else:
                if serial in self._revoked:
                    del self._revoked[serial]
                    changed.add(serial)
                if serial not in self._good:
                    self._good.add(serial)
                    changed.add(serial)
            if was_unknown:
                changed.add(serial)
        return changed

    # --- lookups of serials not loaded --------------------------------------------------

    def _lookup(self, serial: int) -> Deferred[CertStatus]:
        if self.state.failing("database"):
            # Known down: tryLater at once rather than a connection attempt per new serial
            # (a flood of them would queue behind connect timeouts); the next poll that
            # reaches the database lets lookups through again.
            return fail(SourceUnavailable(f"{self.where}: {self.state.health().reason}"))
        waiter: Deferred[CertStatus] = Deferred()
        waiters = self._inflight.get(serial)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[serial] = [waiter]
        db = self._lookup_db
        bad: list[str] = []
        d = self._lookups.run(lambda conn: db.rows_for(conn, [serial], bad))
        d.addTimeout(self._lookup_timeout, self._reactor)

        def found(rows: list[CertRow]) -> CertStatus:
            self._report_bad(bad)
            self._seen_ok()
            self._merge(rows)
            status = self._revoked.get(serial)
            if status is not None:
                return status
            if serial in self._good:
                return CertStatus.good()
            self._unknown[serial] = self._reactor.seconds()
            self._unknown.move_to_end(serial)
            while len(self._unknown) > UNKNOWN_RECHECK_MAX:
                self._unknown.popitem(last=False)
            return CertStatus.unknown()

        def failed(failure: Failure) -> Failure:
            original = failure.value
            if isinstance(original, SourceUnavailable | SourceError):
                self._unreachable(str(original))
                return failure
            if isinstance(original, TimeoutError):
                err = SourceUnavailable(f"{self.where}: no answer in {self._lookup_timeout:g} s")
            else:
                err = SourceUnavailable(f"{self.where}: {failure.getErrorMessage()}")
            self._unreachable(str(err))
            raise err

        def done(result: CertStatus | Failure) -> None:
            for w in self._inflight.pop(serial, []):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        d.addCallbacks(found, failed).addBoth(done)
        return waiter

    # --- state and logging ----------------------------------------------------------------

    def _seen_ok(self) -> None:
        self.state.confirmed()
        self.state.solved("database")

    def _unreachable(self, why: str) -> None:
        """Logged once (by SourceState) when health gets worse, once when it is back."""
        n = len(self._good) + len(self._revoked)
        self.state.problem(
            "database", f"{why}; serving the {n} certificates loaded, new serials get tryLater"
        )

    def _report_bad(self, bad: list[str]) -> None:
        for problem in bad:
            if problem not in self._bad_seen:
                self._bad_seen.add(problem)
                log.warn("{where}: row skipped: {problem}", where=self.where, problem=problem)


class CfsslResponseSource(PresignedOnly):
    """cfssl's ``ocsp_responses`` table (what ``cfssl ocsprefresh`` signs), served as is.

    A :class:`~hsmocsp.presigned.PresignedSource` for ``signer: none`` handles, like ``cfssl
    ocspserve -db-config``. Each poll asks only ``count(*), max(expiry)``; the bodies are
    read again when that changes (ocsprefresh rewrites rows with a later expiry). While the
    database is down the responses loaded keep being served until they expire.
    """

    def __init__(self, config: CfsslSourceConfig, *, reactor: Any) -> None:
        db = config.db
        self._reactor = reactor
        self.db_config = db
        self._db = CertDB(db)
        self._thread = DbThread(self._db, reactor, name="hsmocsp-certdb-responses")
        self._responses: list[PresignedResponse] = []
        self._signature: tuple[object, ...] | None = None
        self.state = SourceState(db.describe() + " ocsp_responses", reactor)
        self._started = False
        self._poller = Poller(self._poll, config.poll_interval, reactor, name=self.where)
        self._bad_seen: set[str] = set()

    @property
    def where(self) -> str:
        return self.db_config.describe() + " ocsp_responses"

    def responses(self) -> Sequence[PresignedResponse]:
        return self._responses

    def ready(self) -> bool:
        return self._started and self.state.health().ready

    def start(self) -> Deferred[None]:
        self._thread.start()

        def loaded(_: None) -> None:
            self._started = True
            self.state.loaded()
            log.info("{where}: {n} pre-signed responses", where=self.where,
                     n=len(self._responses))  # fmt: skip
            self._poller.start()

        def failed(failure: Failure) -> Failure:
            self._thread.stop()
            return failure

        return self._load().addCallbacks(loaded, failed)

    def stop(self) -> Deferred[None]:
        self._started = False
        self._poller.stop()
        self._thread.stop()
        return succeed(None)

    def refresh(self) -> Deferred[None]:
        return self._poller.now()

    def _load(self) -> Deferred[None]:
        db = self._db
        known = self._signature
        bad: list[str] = []

        def work(conn: Any) -> tuple[tuple[object, ...], list[PresignedResponse] | None]:
            signature = db.responses_signature(conn)
            if signature == known:
                return signature, None
            out: list[PresignedResponse] = []
            for body in db.responses(conn):
                try:
                    out.extend(parse_presigned(body))
                except ValueError as err:
                    if len(bad) < 5:
                        bad.append(str(err))
            return signature, out

        def install(result: tuple[tuple[object, ...], list[PresignedResponse] | None]) -> None:
            signature, responses = result
            self.state.confirmed()
            self.state.solved("database")
            for problem in bad:
                if problem not in self._bad_seen:
                    self._bad_seen.add(problem)
                    log.warn("{where}: body skipped: {p}", where=self.where, p=problem)
            if responses is None:
                return
            self._signature = signature
            self._responses = responses
            if self._started:
                log.info("{where}: reloaded, {n} responses", where=self.where, n=len(responses))
            self.state.changed(None, notify=self._started)

        return self._thread.run(work).addCallback(install)

    def _poll(self) -> Deferred[None]:
        """One look at the table (run by :attr:`_poller`, one at a time); never fails."""
        if not self._started:
            return succeed(None)

        def done(result: Failure | None) -> None:
            if isinstance(result, Failure):
                why = result.getErrorMessage()
                if not isinstance(result.value, SourceUnavailable | SourceError):
                    log.failure("{where}: poll failed", result, where=self.where)
                self.state.problem(
                    "database", f"{why}; serving the responses loaded until they expire"
                )

        return self._load().addBoth(done)
