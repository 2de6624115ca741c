"""Certificate-status sources, one module each, behind :class:`StatusSource`.

A source knows, for the CA(s) of one handle, which serials are good, revoked
or never issued, and can hand out the CA certificate and CRL to publish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from cryptography import x509
from twisted.internet.defer import Deferred

from hsmocsp.health import Health
from hsmocsp.status import CertStatus


class StatusSource(Protocol):
    """What the responder needs from a source.

    ``generation`` grows by one every time the data changes (a reload, a newer
    CRL, a revocation seen); caches above the source compare it, and
    listeners registered with :meth:`on_change` are called with the serials
    whose status may have changed (``None`` = anything may have changed).
    """

    @property
    def generation(self) -> int: ...

    @property
    def checked_at(self) -> float | None:
        """When (reactor time) the source last confirmed its data is current: a poll
        that found the files as loaded, a CRL fetched. None before the first load.
        ``now - checked_at`` is the age of the data answers are made from."""
        ...

    def start(self) -> Deferred[None]:
        """First load; fails if the data cannot be loaded at all."""
        ...

    def stop(self) -> Deferred[None]: ...

    def refresh(self) -> Deferred[None]:
        """Look for new data now rather than at the next poll (``SIGHUP``); never fails."""
        ...

    def issuers(self) -> Sequence[x509.Certificate]:
        """The CA certificates whose serials this source answers for."""
        ...

    def status(self, issuer: x509.Certificate, serial: int) -> Deferred[CertStatus]:
        """Status of ``serial`` issued by ``issuer``.

        Fails with ``SourceUnavailable`` (-> tryLater) when the backing store
        cannot be reached and nothing is cached.
        """
        ...

    def crl_der(self, issuer: x509.Certificate) -> bytes | None:
        """The newest CRL of ``issuer`` in DER, for publishing; None if none."""
        ...

    def known_serials(self, issuer: x509.Certificate) -> Iterable[int]:
        """Serials the source knows of (for pre-signing); may be empty."""
        ...

    def ready(self) -> bool:
        """True when the source has loaded data and its backing store is reachable."""
        ...

    def health(self) -> Health:
        """READY, DEGRADED (answers from what it has: cache, last good data; tryLater for
        what needs the backing store) or FAILED, with the reason. Sources keep it, with
        ``generation``, ``checked_at`` and the listeners, in a
        :class:`~hsmocsp.sources.state.SourceState`."""
        ...

    def on_change(self, listener: Callable[[frozenset[int] | None], None]) -> None: ...
