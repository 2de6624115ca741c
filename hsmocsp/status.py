"""Values shared by sources, the responder and the response builder."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class CRLReason(enum.IntEnum):
    """RFC 5280 section 5.3.1 CRLReason (value 7 is unused)."""

    unspecified = 0
    keyCompromise = 1
    cACompromise = 2
    affiliationChanged = 3
    superseded = 4
    cessationOfOperation = 5
    certificateHold = 6
    removeFromCRL = 8
    privilegeWithdrawn = 9
    aACompromise = 10


class Status(enum.Enum):
    good = "good"
    revoked = "revoked"
    unknown = "unknown"


@dataclass(frozen=True, slots=True)
class CertStatus:
    """The status of one serial as a source knows it.

    ``revocation_time`` is timezone-aware UTC and set only for ``revoked``;
    ``reason`` is ``None`` when the source records no reason (then the response
    omits revocationReason rather than inventing ``unspecified``).
    """

    status: Status
    revocation_time: datetime | None = None
    reason: CRLReason | None = None
    invalidity_date: datetime | None = None

    @classmethod
    def good(cls) -> CertStatus:
        return _GOOD

    @classmethod
    def unknown(cls) -> CertStatus:
        return _UNKNOWN

    @classmethod
    def revoked(
        cls,
        when: datetime,
        reason: CRLReason | None = None,
        invalidity_date: datetime | None = None,
    ) -> CertStatus:
        return cls(Status.revoked, when, reason, invalidity_date)


_GOOD = CertStatus(Status.good)
_UNKNOWN = CertStatus(Status.unknown)
