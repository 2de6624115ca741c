"""Status source backed by an OpenSSL CA database (``index.txt``) and, optionally, its CRL.

``openssl ca`` keeps its database in ``index.txt`` and rewrites it by writing
``index.txt.new`` and renaming it over the old file (a new inode); other tools
edit it in place. Either way we notice by polling ``(mtime_ns, size, inode)``
every ``poll_interval`` seconds, and re-parse the index in a child process
(:mod:`hsmocsp.sources.indexproc`; a thread of ours would hold the GIL for
hundreds of milliseconds on a million-line file) and the CRL in a thread, so
that a reload never pauses serving. A new file replaces the current
data only if it parsed completely; otherwise the last good data stays and
the problem (file and line) is logged once. A file that fails is tried again
at the next poll even when it looks unchanged (it may have been caught
mid-write within one mtime tick), then only after it changes again.

Status rules: a serial revoked in the index or in the CRL is revoked (the
index's time and reason win when both have it, because the CRL may be
older); a serial in the index as ``V``/``E`` (or un-held with
``removeFromCRL``) is good; anything else is unknown, never good.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsmocsp.errors import SourceError, SourceUnavailable, UnknownIssuer
from hsmocsp.sources.crl import CRLInfo, load_crl
from hsmocsp.sources.index import IndexData
from hsmocsp.sources.indexproc import IndexSig, ProcessIndexReader
from hsmocsp.sources.indexproc import read_index as read_index_now
from hsmocsp.sources.poller import Poller
from hsmocsp.sources.state import SourceState, StateBacked
from hsmocsp.status import CertStatus

if TYPE_CHECKING:
    from hsmocsp.config import OpenSSLSourceConfig

__all__ = ["IndexReader", "OpenSSLSource", "ThreadRunner"]

_T = TypeVar("_T")

# (st_mtime_ns, st_size, st_ino): what tells us a file changed.
_Sig = IndexSig


class ThreadRunner(Protocol):
    """Runs a blocking callable off the reactor thread; fires with its result."""

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]: ...


class IndexReader(Protocol):
    """Reads and parses an index file; fails with :class:`SourceError`."""

    def __call__(self, path: Path, /) -> Deferred[tuple[IndexData, _Sig]]: ...


def _sig(st: os.stat_result) -> _Sig:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_crl(path: Path, issuer: x509.Certificate) -> tuple[CRLInfo, _Sig]:
    try:
        with path.open("rb") as f:
            sig = _sig(os.fstat(f.fileno()))
            data = f.read()
    except OSError as err:
        raise SourceError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        return load_crl(data, issuer), sig
    except SourceError as err:
        raise SourceError(f"{path}: {err}") from err


@dataclass(frozen=True, slots=True, eq=False)
class _Snapshot:
    """Everything a lookup needs, swapped as one reference."""

    index: IndexData
    crl: CRLInfo | None
    revoked: dict[int, CertStatus]  # index revocations over CRL revocations

    @classmethod
    def build(cls, index: IndexData, crl: CRLInfo | None) -> _Snapshot:
        if crl is None or not crl.revoked:
            return cls(index, crl, index.revoked)
        merged = dict(crl.revoked)
        merged.update(index.revoked)
        return cls(index, crl, merged)

    def status(self, serial: int) -> CertStatus:
        found = self.revoked.get(serial)
        if found is not None:
            return found
        if serial in self.index.good:
            return CertStatus.good()
        return CertStatus.unknown()


@dataclass(slots=True)
class _Watched:
    """Change tracking and error de-duplication for one file."""

    path: Path
    kind: str
    good_sig: _Sig | None = None
    failed_sig: _Sig | None = None
    failed_tries: int = 0
    last_problem: str | None = None
    missing: bool = False

    def wants_load(self, sig: _Sig) -> bool:
        if sig == self.good_sig:
            return False
        return not (sig == self.failed_sig and self.failed_tries >= 2)


@dataclass(slots=True)
class _Outcome:
    """What one load in the thread produced, applied later on the reactor thread."""

    snapshot: _Snapshot | None = None
    changed: set[int] | None = None
    index_sig: _Sig | None = None
    crl_sig: _Sig | None = None
    index_error: tuple[_Sig | None, str] | None = None
    crl_error: tuple[_Sig | None, str] | None = None


class OpenSSLSource(StateBacked):
    """A :class:`~hsmocsp.sources.StatusSource` for one CA managed by ``openssl ca``.

    ``reactor`` provides time (and the thread pool and child processes, if
    it is a real reactor); ``run_in_thread`` overrides how CRL parsing and
    diffs are taken off the reactor thread (with a reactor that has no thread
    pool, such as ``task.Clock``, they run inline); ``read_index`` overrides
    how the index is parsed: by default in a child process when the reactor
    can spawn one and no ``run_in_thread`` was given, else through
    ``run_in_thread``. ``max_changed`` caps the set handed to change
    listeners: beyond it they get ``None`` ("anything may have changed").

    Health: DEGRADED while the index or CRL file is missing or does not parse (the
    last good data is served); FAILED before the first load.
    """

    _log = Logger()

    def __init__(
        self,
        config: OpenSSLSourceConfig,
        issuer: x509.Certificate,
        *,
        reactor: IReactorTime,
        run_in_thread: ThreadRunner | None = None,
        read_index: IndexReader | None = None,
        max_changed: int = 100_000,
    ) -> None:
        index_path, crl_path = config.index, config.crl
        self.config = config
        self._issuer = issuer
        self._reactor = reactor
        self._max_changed = max_changed
        self._run = run_in_thread if run_in_thread is not None else _default_runner(reactor)
        if read_index is None:
            if run_in_thread is None and IReactorProcess.providedBy(reactor):
                read_index = ProcessIndexReader(reactor, self._run)
            else:
                runner = self._run

                def read_index(path: Path) -> Deferred[tuple[IndexData, _Sig]]:
                    return runner(lambda: read_index_now(path))

        self._read_index = read_index
        self._reading: Deferred[tuple[IndexData, _Sig]] | None = None
        self._stopping = False
        self._index = _Watched(Path(index_path), "index")
        self._crl = _Watched(Path(crl_path), "CRL") if crl_path is not None else None
        self._snapshot: _Snapshot | None = None
        # The source logs each file problem itself (once per distinct problem, with
        # the file and line), so the shared state only keeps count and health.
        self.state = SourceState(f"index {index_path}", reactor, log_changes=False)
        self._poller = Poller(self._poll, config.poll_interval, reactor, name=f"index {index_path}")

    # --- StatusSource (generation, checked_at, on_change, health: StateBacked) ----

    def start(self) -> Deferred[None]:
        """Load both files (off the reactor thread), then start polling.

        Fails with :class:`SourceError` if either file cannot be read or parsed.
        """
        return Deferred.fromCoroutine(self._load_initial()).addCallback(self._started)

    def stop(self) -> Deferred[None]:
        """Stop polling; a parse in progress is abandoned, fires once it has ended."""
        self._stopping = True
        self._poller.stop()
        if self._reading is not None:
            self._reading.cancel()
        return self._poller.wait()

    def issuers(self) -> Sequence[x509.Certificate]:
        return (self._issuer,)

    def status(self, issuer: x509.Certificate, serial: int) -> Deferred[CertStatus]:
        if issuer is not self._issuer and issuer != self._issuer:
            return fail(UnknownIssuer(f"{issuer.subject.rfc4514_string()} is not served here"))
        snap = self._snapshot
        if snap is None:
            return fail(SourceUnavailable(f"{self._index.path} not loaded yet"))
        return succeed(snap.status(serial))

    def crl_der(self, issuer: x509.Certificate) -> bytes | None:
        snap = self._snapshot
        if snap is None or snap.crl is None or issuer != self._issuer:
            return None
        return snap.crl.der

    def known_serials(self, issuer: x509.Certificate) -> Iterable[int]:
        """Every serial in the index (good ones in sorted order, then revoked ones)."""
        snap = self._snapshot
        if snap is None or issuer != self._issuer:
            return ()
        return snap.index.serials()

    def ready(self) -> bool:
        return self._snapshot is not None

    # --- extras ---------------------------------------------------------------------

    def replace_issuer(self, issuer: x509.Certificate) -> bool:
        """Serve and publish a renewed certificate of the same CA from now on (SIGHUP).

        Same subject and same key, or :class:`SourceError`: the loaded index and
        the CRL (verified with that key) stay valid; another CA needs a restart.
        False if ``issuer`` is the one already served.
        """
        if issuer == self._issuer:
            return False
        if issuer.subject != self._issuer.subject or _spki(issuer) != _spki(self._issuer):
            raise SourceError(
                f"{issuer.subject.rfc4514_string()!r} is not a renewal of the served CA "
                f"{self._issuer.subject.rfc4514_string()!r} (name or key differs); "
                "serving another CA needs a restart"
            )
        self._issuer = issuer
        return True

    def refresh(self) -> Deferred[None]:
        return self.check_now()

    def check_now(self) -> Deferred[None]:
        """Look for changed files now (e.g. on SIGHUP) instead of at the next poll, or
        wait for the reload in progress; never fails."""
        return self._poller.now()

    # --- loading --------------------------------------------------------------------

    async def _read_index_tracked(self) -> tuple[IndexData, _Sig]:
        """The index reader, remembered so that :meth:`stop` can cancel it."""
        reading = self._reading = self._read_index(self._index.path)
        try:
            return await reading
        finally:
            self._reading = None

    async def _load_initial(self) -> _Outcome:
        out = _Outcome()
        index, out.index_sig = await self._read_index_tracked()
        crl: CRLInfo | None = None
        if self._crl is not None:
            crl, out.crl_sig = await self._run(self._crl_reader())
        out.snapshot = _Snapshot.build(index, crl)
        return out

    def _crl_reader(self) -> Callable[[], tuple[CRLInfo, _Sig]]:
        watched, issuer = self._crl, self._issuer
        assert watched is not None
        return lambda: _read_crl(watched.path, issuer)

    def _started(self, out: _Outcome) -> None:
        snapshot = out.snapshot
        assert snapshot is not None
        self._index.good_sig = out.index_sig
        if self._crl is not None:
            self._crl.good_sig = out.crl_sig
        self._snapshot = snapshot
        self.state.changed(None, notify=False)
        self.state.confirmed()
        self.state.loaded()
        self._log.info(
            "{path}: loaded {good} good and {revoked} revoked serials{crl}",
            path=str(self._index.path),
            good=len(snapshot.index.good),
            revoked=len(snapshot.index.revoked),
            crl=_describe_crl(snapshot.crl),
        )
        self._warn_crl(snapshot.crl)
        if not self._stopping:
            self._poller.start()

    def _stat(self, watched: _Watched) -> _Sig | None:
        try:
            sig = _sig(os.stat(watched.path))
        except OSError as err:
            watched.missing = True
            self._problem(watched, f"{watched.path}: {err.strerror or err}; keeping last good data")
            return None
        if watched.missing:
            # Back again; a later disappearance is worth a new warning.
            watched.missing = False
            watched.last_problem = None
            self.state.solved(watched.kind)
            self._log.info("{path}: present again", path=str(watched.path))
        return sig

    def _poll(self) -> Deferred[None] | None:
        """One polling round (run by :attr:`_poller`, one at a time); returns a Deferred
        while a reload runs."""
        if self._snapshot is None or self._stopping:
            return None
        index_sig = self._stat(self._index)
        load_index = index_sig is not None and self._index.wants_load(index_sig)
        load_crl = False
        crl_sig: _Sig | None = None
        if self._crl is not None:
            crl_sig = self._stat(self._crl)
            load_crl = crl_sig is not None and self._crl.wants_load(crl_sig)
        if not (load_index or load_crl):
            crl_ok = self._crl is None or (crl_sig is not None and crl_sig == self._crl.good_sig)
            if index_sig is not None and index_sig == self._index.good_sig and crl_ok:
                self.state.confirmed()  # the files are what we loaded
            return None
        current = self._snapshot

        d = Deferred.fromCoroutine(self._reload(current, load_index, load_crl))
        return d.addCallback(self._apply).addErrback(self._reload_crashed)

    async def _reload(self, current: _Snapshot, load_index: bool, load_crl: bool) -> _Outcome:
        """Parse what changed (index in a child, CRL in a thread), then diff in a thread."""
        out = _Outcome()
        index, crl = current.index, current.crl
        if load_index:
            try:
                index, out.index_sig = await self._read_index_tracked()
            except SourceError as err:
                out.index_error = (self._sig_or_none(self._index.path), str(err))
        if load_crl and self._crl is not None:
            try:
                crl, out.crl_sig = await self._run(self._crl_reader())
            except SourceError as err:
                out.crl_error = (self._sig_or_none(self._crl.path), str(err))
        if index is current.index and crl is current.crl:
            return out
        return await self._run(lambda: self._diff(current, index, crl, out))

    def _diff(
        self, current: _Snapshot, index: IndexData, crl: CRLInfo | None, out: _Outcome
    ) -> _Outcome:
        """Runs in a thread: the serials that changed and the new snapshot."""
        changed: set[int] | None = set()
        if index is not current.index:
            changed = current.index.changed_serials(index, self._max_changed)
        if changed is not None and crl is not current.crl:
            if current.crl is None or crl is None:
                old = current.crl.revoked if current.crl is not None else {}
                new = crl.revoked if crl is not None else {}
                changed |= old.keys() ^ new.keys()
            else:
                changed |= current.crl.changed_serials(crl)
            if len(changed) > self._max_changed:
                changed = None
        crl_bytes_same = (crl.der if crl else None) == (current.crl.der if current.crl else None)
        if changed is not None and not changed and crl_bytes_same:
            # Same content (touched, or rewritten identically): nothing to swap.
            return out
        out.snapshot = _Snapshot.build(index, crl)
        out.changed = changed
        return out

    @staticmethod
    def _sig_or_none(path: Path) -> _Sig | None:
        try:
            return _sig(os.stat(path))
        except OSError:
            return None

    def _apply(self, out: _Outcome) -> None:
        """Reactor thread: record what loaded and what failed, swap, notify."""
        for watched, sig, error in (
            (self._index, out.index_sig, out.index_error),
            (self._crl, out.crl_sig, out.crl_error),
        ):
            if watched is None:
                continue
            if sig is not None:
                watched.good_sig = sig
                watched.failed_sig = None
                watched.failed_tries = 0
                if watched.last_problem is not None:
                    self._log.info("{path}: loaded again", path=str(watched.path))
                watched.last_problem = None
                self.state.solved(watched.kind)
            if error is not None:
                failed_sig, message = error
                if failed_sig is not None and failed_sig == watched.failed_sig:
                    watched.failed_tries += 1
                else:
                    watched.failed_sig, watched.failed_tries = failed_sig, 1
                self._problem(watched, f"{message}; keeping last good data")
        if out.index_error is None and out.crl_error is None:
            self.state.confirmed()
        if out.snapshot is None:
            return
        self._snapshot = out.snapshot
        changed = frozenset(out.changed) if out.changed is not None else None
        self.state.changed(changed)
        self._warn_crl(out.snapshot.crl if out.crl_sig is not None else None)
        self._log.info(
            "{path}: reloaded (generation {generation}, {n} serials changed){crl}",
            path=str(self._index.path),
            generation=self.state.generation,
            n="all" if changed is None else len(changed),
            crl=_describe_crl(out.snapshot.crl),
        )

    def _reload_crashed(self, failure: Failure) -> None:
        if isinstance(failure.value, CancelledError) and self._stopping:
            return  # stop() abandoned the parse
        # Not a data error (those are in _Outcome): a bug. Log it, keep polling.
        self._log.failure("OpenSSL source reload failed unexpectedly", failure)

    def _problem(self, watched: _Watched, message: str) -> None:
        """Log ``message`` unless it is the one last logged for this file."""
        self.state.problem(watched.kind, message)
        if message != watched.last_problem:
            watched.last_problem = message
            self._log.warn("{kind} file problem: {message}", kind=watched.kind, message=message)

    def _warn_crl(self, crl: CRLInfo | None) -> None:
        if crl is None or self._crl is None:
            return
        for warning in crl.warnings:
            self._log.warn("{path}: {warning}", path=str(self._crl.path), warning=warning)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _describe_crl(crl: CRLInfo | None) -> str:
    if crl is None:
        return ""
    number = "" if crl.crl_number is None else f" #{crl.crl_number}"
    return f"; CRL{number} with {len(crl.revoked)} entries"


def _default_runner(reactor: IReactorTime) -> ThreadRunner:
    """The reactor's thread pool, or inline for reactors without one (``task.Clock``)."""
    if IReactorThreads.providedBy(reactor):
        threads = reactor

        def run_in_pool(f: Callable[[], _T]) -> Deferred[_T]:
            return deferToThreadPool(threads, threads.getThreadPool(), f)

        return run_in_pool

    def run_inline(f: Callable[[], _T]) -> Deferred[_T]:
        return maybeDeferred(f)

    return run_inline
