"""The bookkeeping every status source shares: generation, freshness, listeners, health.

Each source (OpenSSL index, Vault, cfssl, ...) owns one :class:`SourceState` and
answers ``generation``, ``checked_at``, ``on_change`` and ``health`` from it, so
that what "the data changed", "the data was confirmed current" and "the source
is out of order" mean, how listeners are called and how a state change is logged,
exist once. A source reports what it sees (:meth:`SourceState.changed`,
:meth:`~SourceState.confirmed`, :meth:`~SourceState.problem`,
:meth:`~SourceState.solved`); this class decides what is logged: one line when the
source's health gets worse, one when it is ready again, never one per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from cryptography import x509
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hsmocsp.errors import SourceError
from hsmocsp.health import READY, Health, State, worst
from hsmocsp.status import CertStatus

__all__ = ["ChangeListener", "PresignedOnly", "SourceState", "StateBacked"]

ChangeListener = Callable[[frozenset[int] | None], None]

log = Logger()


class SourceState:
    """Generation, ``checked_at``, change listeners and health of one source.

    ``name`` says which source in log lines (``index /ca/index.txt``, ``vault
    https://... mount 'pki'``). Health starts FAILED ("not loaded yet") until
    :meth:`loaded`. Problems are kept by *area* (``"vault"``, ``"crl"``,
    ``"index"``...), each with its own state, so one area coming back does not
    hide another still broken; health is the worst of them. ``log_changes=False``
    for a source that logs each problem itself (more precisely than "degraded").
    """

    def __init__(self, name: str, clock: IReactorTime, *, log_changes: bool = True) -> None:
        self.name = name
        self._log_changes = log_changes
        self._clock = clock
        self._generation = 0
        self._checked_at: float | None = None
        self._listeners: list[ChangeListener] = []
        self._loaded = False
        self._problems: dict[str, Health] = {}
        self._attempts = 0
        self._latest: dict[str, int] = {}
        self._logged = Health(State.FAILED, "not loaded yet")
        self.errors = 0
        """Problems reported since start (each failed request, poll or refresh): the
        ``hsmocsp_source_errors`` metric."""

    # --- data ----------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def checked_at(self) -> float | None:
        return self._checked_at

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def changed(self, serials: frozenset[int] | None, *, notify: bool = True) -> None:
        """The data changed: bump the generation and tell listeners which serials
        (``None``: any). ``notify=False`` for the first load, which nobody waits on."""
        self._generation += 1
        if not notify:
            return
        for listener in list(self._listeners):
            try:
                listener(serials)
            except Exception:
                log.failure(
                    "{name}: change listener {listener!r} failed",
                    name=self.name,
                    listener=listener,
                )

    def confirmed(self) -> None:
        """The data was confirmed current now (a poll found the files as loaded, a
        CRL was fetched): ``now - checked_at`` is the age answers are made from."""
        self._checked_at = self._clock.seconds()

    # --- health --------------------------------------------------------------------

    def loaded(self) -> None:
        """The first load succeeded: from now on the source answers."""
        self._loaded = True
        self._changed_health()

    def attempt(self) -> int:
        """A ticket for a request about to start. Requests overlap (a CRL refresh still
        waiting for its timeout when a lookup already succeeded): an outcome reported
        with an older ticket than the last one reported for its area is stale and does
        not change health (a failure is still counted)."""
        self._attempts += 1
        return self._attempts

    def _stale(self, area: str, ticket: int | None) -> bool:
        if ticket is None:
            return False
        if ticket < self._latest.get(area, 0):
            return True
        self._latest[area] = ticket
        return False

    def problem(
        self, area: str, reason: str, state: State = State.DEGRADED, *, ticket: int | None = None
    ) -> None:
        """Something in ``area`` failed (counted); logged only if health got worse."""
        self.errors += 1
        if self._stale(area, ticket):
            return
        reason = reason.removeprefix(self.name + ": ")  # the log line names us already
        self._problems[area] = Health(state, reason)
        self._changed_health()

    def solved(self, area: str, *, ticket: int | None = None) -> None:
        """``area`` works again; logged once if that makes the source ready."""
        if self._stale(area, ticket):
            return
        if self._problems.pop(area, None) is not None:
            self._changed_health()

    def failing(self, area: str) -> bool:
        return area in self._problems

    def health(self) -> Health:
        if not self._loaded:
            return Health(State.FAILED, "not loaded yet")
        if not self._problems:
            return READY
        return worst(*self._problems.values())

    def _changed_health(self) -> None:
        now, before = self.health(), self._logged
        if now.state is before.state:
            self._logged = now  # same state, newer reason: said once already
            return
        self._logged = now
        if not self._log_changes:
            return
        if now.state is State.READY:
            if self._loaded and before.reason != "not loaded yet":
                log.info("{name}: ready again", name=self.name)
        else:
            log.warn(
                "{name}: {state}: {reason}",
                name=self.name,
                state=now.state.label,
                reason=now.reason,
            )


class StateBacked:
    """``generation``, ``checked_at``, ``on_change`` and ``health`` of a source, answered
    from its :class:`SourceState` (the same four answers for every source; each source's
    class docstring says what makes it degraded)."""

    state: SourceState

    @property
    def generation(self) -> int:
        return self.state.generation

    @property
    def checked_at(self) -> float | None:
        return self.state.checked_at

    def on_change(self, listener: ChangeListener) -> None:
        self.state.on_change(listener)

    def health(self) -> Health:
        return self.state.health()


class PresignedOnly(StateBacked):
    """The status-source answers of a source that holds pre-signed responses only.

    cfssl's ``ocsp_responses`` table and an ``ocspdump`` file serve responses as they
    are (``signer: none`` handles): they know no statuses, issuers or CRLs. Both answer
    the :class:`~hsmocsp.sources.StatusSource` protocol the same way, from their
    :class:`SourceState`; this is that one way.
    """

    @property
    def where(self) -> str:
        raise NotImplementedError

    def issuers(self) -> Sequence[x509.Certificate]:
        return ()

    def status(self, issuer: x509.Certificate, serial: int) -> Deferred[CertStatus]:
        return fail(SourceError(f"{self.where}: holds pre-signed responses, not statuses"))

    def crl_der(self, issuer: x509.Certificate) -> bytes | None:
        return None

    def known_serials(self, issuer: x509.Certificate) -> Iterable[int]:
        return ()
