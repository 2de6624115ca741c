"""Parse an OpenSSL CA database (``index.txt``) into certificate statuses.

The format is what ``openssl ca`` writes through its TXT_DB: one certificate
per line, six tab-separated fields::

    status  expiry  revocation  serial  filename  subject

``status`` is ``V`` (valid), ``R`` (revoked) or ``E`` (expired); ``expiry`` is
an ASN.1 UTCTime ``YYMMDDHHMMSSZ`` (or GeneralizedTime after 2049);
``revocation`` is empty unless the status is ``R``, then it is
``time[,reason[,extra]]`` exactly as ``make_revocation_str`` in OpenSSL's
``apps/ca.c`` builds it and ``unpack_revinfo`` reads it back:

* ``reason`` is one of ``unspecified keyCompromise CACompromise
  affiliationChanged superseded cessationOfOperation certificateHold
  removeFromCRL`` or one of three pseudo reasons that carry ``extra``:
  ``holdInstruction,<OID>`` (-> certificateHold, from ``-crl_hold``),
  ``keyTime,<GeneralizedTime>`` (-> keyCompromise, ``-crl_compromise``) and
  ``CAkeyTime,<GeneralizedTime>`` (-> cACompromise, ``-crl_CA_compromise``);
  the compromise time becomes the invalidity date. Reasons match
  case-insensitively, as ``strcasecmp`` does in OpenSSL.

Status mapping: ``V`` and ``E`` are *good* (the CA issued the certificate and
did not revoke it; RFC 6960 allows ``good`` for an expired certificate, and
``openssl ocsp`` answering ``E`` rows with no SingleResponse at all is a bug we
do not copy); ``R`` is *revoked*, except that ``removeFromCRL`` means the hold
was lifted, so it is *good*.

A file is accepted whole or not at all: any bad line rejects it with a
:class:`~hsmocsp.errors.SourceError` naming the file and line, so a
half-written file never replaces good data. That includes a last line with
no newline (OpenSSL itself silently drops such a line, which could hide a
revocation). Lines may end in CRLF; the ``\r`` is dropped with the ``\n``, so a line
that is only ``\r`` is blank.

Memory: an index of a million certificates is mostly ``V`` rows, so good
serials go into :class:`SerialSet`, a sorted array of fixed-width big-endian
integers in one ``bytes`` object (about 8-20 bytes per serial instead of the
~100 of a ``set`` of ``int``); revoked rows, usually few, go into a dict.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hsmocsp.errors import SourceError
from hsmocsp.status import CertStatus, CRLReason

__all__ = [
    "IndexData",
    "SerialSet",
    "parse_index",
    "parse_index_file",
    "parse_revocation",
]

# Reason names in OpenSSL's crl_reasons[] order; the position is the code
# unpack_revinfo works with (7 = removeFromCRL, 8..10 = pseudo reasons).
_REASON_NAMES = (
    "unspecified",
    "keyCompromise",
    "CACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "removeFromCRL",
    "holdInstruction",
    "keyTime",
    "CAkeyTime",
)

#: The real revocation reasons (what ``openssl ca -crl_reason`` accepts).
OPENSSL_REASONS = _REASON_NAMES[:8]
_REASON_INDEX = {name.lower(): i for i, name in enumerate(_REASON_NAMES)}
_REMOVE_FROM_CRL = 7
_HOLD_INSTRUCTION = 8
_KEY_TIME = 9
_CA_KEY_TIME = 10

# RFC 5280 / X9.57 hold instruction codes, by the short and long names OBJ_txt2obj
# accepts (OpenSSL writes back whatever text was given on the command line).
_HOLD_OIDS = {
    "holdinstructionnone": "1.2.840.10040.2.1",
    "hold instruction none": "1.2.840.10040.2.1",
    "holdinstructioncallissuer": "1.2.840.10040.2.2",
    "hold instruction call issuer": "1.2.840.10040.2.2",
    "holdinstructionreject": "1.2.840.10040.2.3",
    "hold instruction reject": "1.2.840.10040.2.3",
}
_DOTTED_OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+\Z")

# UTCTime as ASN1_UTCTIME_set_string accepts it: YYMMDDHHMM[SS](Z|+hhmm|-hhmm).
_UTCTIME = re.compile(r"(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)?(Z|[+-]\d{4})\Z")
# GeneralizedTime as ASN1_GENERALIZEDTIME_set_string accepts it (checked against
# openssl 3.0): YYYYMMDDHHMM[SS[.fff]](Z|+hhmm|-hhmm); a zone is required.
_GENTIME = re.compile(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(?:(\d\d)(?:\.(\d+))?)?(Z|[+-]\d{4})\Z")

_HEX_DIGITS = b"0123456789abcdefABCDEF"


class _LineError(ValueError):
    """A problem with one line; the caller adds the file name and line number."""


def _zone(text: str) -> timedelta:
    if text == "Z":
        return timedelta(0)
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 23 or minutes > 59:
        raise _LineError(f"bad time zone offset {text!r}")
    offset = timedelta(hours=hours, minutes=minutes)
    return -offset if text[0] == "-" else offset


def parse_time(text: str, what: str, *, generalized: bool = False) -> datetime:
    """Parse an ASN.1 time string into an aware UTC datetime.

    Without ``generalized``, a UTCTime (``YYMMDDHHMM[SS]Z``; years 50-99 are
    19xx, 00-49 are 20xx per RFC 5280 4.1.2.5.1) or a GeneralizedTime; with it,
    only a GeneralizedTime (which 12 digits + Z also is: ``YYYYMMDDHHMMZ``).
    Raises ``ValueError`` (a private subclass) naming ``what``.
    """
    try:
        m = None if generalized else _UTCTIME.match(text)
        if m is not None:
            yy = int(m[1])
            year = 1900 + yy if yy >= 50 else 2000 + yy
            naive = datetime(year, int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6] or 0))
            return (naive - _zone(m[7])).replace(tzinfo=UTC)
        g = _GENTIME.match(text)
        if g is not None:
            # Fractional seconds (g[7]) are dropped: RFC 5280 forbids them in
            # the GeneralizedTime of an invalidity date we will re-encode.
            naive = datetime(int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]), int(g[6] or 0))
            return (naive - _zone(g[8])).replace(tzinfo=UTC)
    except (ValueError, OverflowError) as err:  # e.g. month 13, day 31 in June
        raise _LineError(f"bad {what} {text!r}: {err}") from err
    want = "YYYYMMDDHHMMSSZ" if generalized else "YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ"
    raise _LineError(f"bad {what} {text!r} (want {want})")


@dataclass(frozen=True, slots=True)
class Revocation:
    """The parsed revocation field of an ``R`` row.

    ``status`` is ``None`` for ``removeFromCRL`` (the certificate is good again).
    ``hold_instruction`` is a dotted OID, set only for ``holdInstruction,<OID>``.
    """

    status: CertStatus | None
    hold_instruction: str | None = None


def parse_revocation(text: str) -> Revocation:
    """Parse ``time[,reason[,extra]]`` as OpenSSL's ``unpack_revinfo`` does.

    Raises ``ValueError`` (a private subclass) describing the problem.
    """
    if not text:
        raise _LineError("status R without a revocation time")
    time_text, has_reason, rest = text.partition(",")
    when = parse_time(time_text, "revocation time")
    if not has_reason:
        return Revocation(CertStatus.revoked(when))
    reason_text, has_extra, extra = rest.partition(",")
    index = _REASON_INDEX.get(reason_text.lower())
    if index is None:
        raise _LineError(f"unknown revocation reason {reason_text!r}")
    if index == _REMOVE_FROM_CRL:
        return Revocation(None)
    if index < _REMOVE_FROM_CRL:
        # OpenSSL ignores any extra text after a plain reason; so do we.
        return Revocation(CertStatus.revoked(when, CRLReason(index)))
    if not has_extra or not extra:
        missing = "hold instruction" if index == _HOLD_INSTRUCTION else "compromise time"
        raise _LineError(f"{reason_text} without its {missing}")
    if index == _HOLD_INSTRUCTION:
        oid = _HOLD_OIDS.get(extra.lower())
        if oid is None:
            if _DOTTED_OID.match(extra) is None:
                raise _LineError(f"bad hold instruction {extra!r} (want a name or dotted OID)")
            oid = extra
        return Revocation(CertStatus.revoked(when, CRLReason.certificateHold), oid)
    compromised = parse_time(extra, "compromise time", generalized=True)
    reason = CRLReason.keyCompromise if index == _KEY_TIME else CRLReason.cACompromise
    return Revocation(CertStatus.revoked(when, reason, compromised))


class SerialSet:
    """An immutable set of serial numbers stored as one sorted ``bytes`` array.

    Non-negative serials are big-endian, fixed ``width`` bytes each, sorted, so
    a lookup is a binary search over slices and equal sets have equal bytes.
    Negative serials (invalid per RFC 5280 but writable by OpenSSL) are rare and
    kept in a plain frozenset.
    """

    __slots__ = ("_blob", "_count", "_negative", "_width")

    def __init__(self, blob: bytes, width: int, negative: frozenset[int] = frozenset()) -> None:
        if width <= 0 or len(blob) % width:
            raise ValueError("blob length is not a multiple of width")
        self._blob = blob
        self._width = width
        self._count = len(blob) // width
        self._negative = negative

    @classmethod
    def from_ints(cls, serials: list[int]) -> SerialSet:
        """Build from a list of ints (left unchanged).

        Raises ``KeyError(serial)`` for the first serial listed twice.

        Large lists are sorted in runs of ``_SORT_RUN`` and merged with
        :func:`heapq.merge` instead of one ``list.sort()``: a single sort of a
        million big ints holds the GIL for ~0.3 s, which would stall the
        reactor while a reload runs in a thread. Runs keep each GIL hold short.
        """
        negative = [s for s in serials if s < 0]
        if negative:
            serials = [s for s in serials if s >= 0]
            if len(set(negative)) != len(negative):
                raise KeyError(_first_duplicate(sorted(negative)))
        top = max(serials, default=0)
        # At least 8 bytes, so that sequential serials growing past a byte
        # boundary keep the width and the cheap diff path.
        width = max(_MIN_WIDTH, (top.bit_length() + 7) // 8)
        ordered: Iterable[int]
        if len(serials) <= _SORT_RUN:
            ordered = sorted(serials)
        else:
            runs = [sorted(serials[i : i + _SORT_RUN]) for i in range(0, len(serials), _SORT_RUN)]
            ordered = heapq.merge(*runs)
        buf = bytearray(width * len(serials))
        pos = 0
        prev = -1
        for s in ordered:
            if s == prev:
                raise KeyError(s)
            buf[pos : pos + width] = s.to_bytes(width, "big")
            pos += width
            prev = s
        return cls(bytes(buf), width, frozenset(negative))

    @property
    def width(self) -> int:
        return self._width

    def parts(self) -> tuple[bytes, int, frozenset[int]]:
        """``(blob, width, negative)``: what the constructor takes, to rebuild elsewhere."""
        return self._blob, self._width, self._negative

    def __reduce__(self) -> tuple[type[SerialSet], tuple[bytes, int, frozenset[int]]]:
        return SerialSet, self.parts()

    def __len__(self) -> int:
        return self._count + len(self._negative)

    def __contains__(self, serial: object) -> bool:
        if not isinstance(serial, int):
            return False
        if serial < 0:
            return serial in self._negative
        if serial.bit_length() > 8 * self._width:
            return False
        key = serial.to_bytes(self._width, "big")
        blob, w = self._blob, self._width
        lo, hi = 0, self._count
        while lo < hi:
            mid = (lo + hi) // 2
            probe = blob[mid * w : mid * w + w]
            if probe < key:
                lo = mid + 1
            elif probe > key:
                hi = mid
            else:
                return True
        return False

    def __iter__(self) -> Iterator[int]:
        yield from sorted(self._negative)
        blob, w = self._blob, self._width
        for pos in range(0, len(blob), w):
            yield int.from_bytes(blob[pos : pos + w], "big")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SerialSet):
            return NotImplemented
        if self._width == other._width:
            return self._blob == other._blob and self._negative == other._negative
        return len(self) == len(other) and set(self) == set(other)

    __hash__ = None  # type: ignore[assignment]

    def symmetric_difference(self, other: SerialSet, limit: int | None = None) -> set[int] | None:
        """Serials in exactly one of the two sets; ``None`` once more than ``limit``.

        Cheap when the sets differ in few places (the usual case: a few rows
        added or revoked): a merge walk over both sorted arrays that skips
        equal runs with chunked ``bytes`` comparisons (memcmp), so the Python
        work grows with the number of differences, not the size of the sets.
        """
        result = set(self._negative ^ other._negative)
        if self._width != other._width:
            a = set(self) - self._negative
            b = set(other) - other._negative
            result |= a ^ b
        else:
            _merge_diff(self._blob, other._blob, self._width, result, limit)
        if limit is not None and len(result) > limit:
            return None
        return result


_MIN_WIDTH = 8
_SORT_RUN = 1 << 15
_CHUNK_ENTRIES = 4096


def _merge_diff(old: bytes, new: bytes, w: int, out: set[int], limit: int | None) -> None:
    """Add to ``out`` the entries of exactly one of two sorted fixed-width arrays."""
    i = j = 0
    end_old, end_new = len(old), len(new)
    chunk = _CHUNK_ENTRIES * w
    while i < end_old and j < end_new:
        span = min(chunk, end_old - i, end_new - j)
        if old[i : i + span] == new[j : j + span]:
            i += span
            j += span
            continue
        # The first `lo` entries of this span are equal; find the first that is not.
        lo, hi = 0, span // w
        while lo < hi:
            mid = (lo + hi) // 2
            n = (mid + 1) * w
            if old[i : i + n] == new[j : j + n]:
                lo = mid + 1
            else:
                hi = mid
        i += lo * w
        j += lo * w
        a, b = old[i : i + w], new[j : j + w]
        if a < b:
            out.add(int.from_bytes(a, "big"))
            i += w
        else:
            out.add(int.from_bytes(b, "big"))
            j += w
        if limit is not None and len(out) > limit:
            return
    for blob, pos, end in ((old, i, end_old), (new, j, end_new)):
        for p in range(pos, end, w):
            out.add(int.from_bytes(blob[p : p + w], "big"))
            if limit is not None and len(out) > limit:
                return


def _first_duplicate(sorted_serials: list[int]) -> int | None:
    prev: int | None = None
    for s in sorted_serials:
        if s == prev:
            return s
        prev = s
    return None


@dataclass(frozen=True, slots=True, eq=False)
class IndexData:
    """One successfully parsed index file.

    ``good`` holds V, E and removeFromCRL rows; ``revoked`` maps the serials
    of the other R rows to their status; ``hold_instructions`` maps serials
    revoked with ``holdInstruction`` to the dotted OID.
    """

    good: SerialSet
    revoked: dict[int, CertStatus]
    hold_instructions: dict[int, str] = field(default_factory=dict)
    lines: int = 0

    def status(self, serial: int) -> CertStatus:
        found = self.revoked.get(serial)
        if found is not None:
            return found
        if serial in self.good:
            return CertStatus.good()
        return CertStatus.unknown()

    def serials(self) -> Iterator[int]:
        """Every serial in the index, good ones first (in sorted order)."""
        yield from self.good
        yield from self.revoked

    def changed_serials(self, newer: IndexData, limit: int | None = None) -> set[int] | None:
        """Serials whose status may differ between ``self`` and ``newer``.

        ``None`` when more than ``limit`` differ (the caller then treats
        everything as changed rather than handle a huge set).
        """
        changed = self.good.symmetric_difference(newer.good, limit)
        if changed is None:
            return None
        changed |= self.revoked.keys() ^ newer.revoked.keys()
        new_revoked = newer.revoked
        for serial, status in self.revoked.items():
            other = new_revoked.get(serial)
            if other is not None and other != status:
                changed.add(serial)
        if limit is not None and len(changed) > limit:
            return None
        return changed


def parse_index_file(lines: Iterable[bytes], name: str) -> IndexData:
    """Parse the lines of an index file (bytes, newline included).

    ``name`` is used in error messages. Raises :class:`SourceError`.
    """
    good: list[int] = []
    good_append = good.append
    revoked: dict[int, CertStatus] = {}
    holds: dict[int, str] = {}
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):  # noqa: B007 - used in the error path
            if raw[-1:] != b"\n":
                raise _LineError("last line has no newline (file incomplete or being written?)")
            # A CRLF file (saved by an editor or copied through Windows): the ``\r`` is
            # part of the line end, so a line that is only ``\r`` is blank.
            line = raw[:-2] if raw[-2:-1] == b"\r" else raw[:-1]
            if not line or line[0] == 0x23:  # blank, or '#' comment as TXT_DB skips
                continue
            parts = line.split(b"\t", 5)
            if len(parts) != 6:
                raise _LineError(f"{len(parts)} tab-separated fields, want 6")
            st, exp, rev, ser = parts[0], parts[1], parts[2], parts[3]
            if not (len(exp) in (13, 15) and exp[-1] == 0x5A and exp[:-1].isdigit()):
                raise _LineError(f"bad expiry time {exp.decode(errors='replace')!r}")
            digits = ser[1:] if ser[:1] == b"-" else ser
            if not digits or digits.translate(None, _HEX_DIGITS):
                raise _LineError(f"bad serial {ser.decode(errors='replace')!r} (want hex)")
            serial = int(ser, 16)
            if st == b"V" or st == b"E":
                if rev:
                    raise _LineError(f"status {st.decode()} with a revocation field")
                good_append(serial)
            elif st == b"R":
                try:
                    rev_text = rev.decode("ascii")
                except UnicodeDecodeError as err:
                    raise _LineError("revocation field is not ASCII") from err
                parsed = parse_revocation(rev_text)
                if serial in revoked:
                    raise _LineError(f"serial {ser.decode()} listed twice")
                if parsed.status is None:
                    good_append(serial)
                else:
                    revoked[serial] = parsed.status
                    if parsed.hold_instruction is not None:
                        holds[serial] = parsed.hold_instruction
            else:
                raise _LineError(f"bad status {st.decode(errors='replace')!r} (want V, R or E)")
    except _LineError as err:
        raise SourceError(f"{name}:{lineno}: {err}") from err
    try:
        good_set = SerialSet.from_ints(good)
    except KeyError as err:
        raise SourceError(f"{name}: serial {_hex(err.args[0])} listed twice") from None
    for serial in revoked:
        if serial in good_set:
            raise SourceError(f"{name}: serial {_hex(serial)} listed twice")
    return IndexData(good_set, revoked, holds, lineno)


def _hex(serial: int) -> str:
    return f"-{-serial:X}" if serial < 0 else f"{serial:X}"


def parse_index(path: Path) -> IndexData:
    """Read and parse ``path``; raises :class:`SourceError` (also for I/O errors)."""
    try:
        with path.open("rb") as f:
            return parse_index_file(f, str(path))
    except OSError as err:
        raise SourceError(f"{path}: cannot read: {err.strerror or err}") from err
