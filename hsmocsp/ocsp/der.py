"""Tiny DER helpers: just enough to assemble OCSP responses and walk certificates.

pyasn1 is correct but costs hundreds of microseconds per structure; the few
shapes a responder emits are simple enough to concatenate by hand, and the tests
check every shape against pyasn1, cryptography and openssl.
"""

from __future__ import annotations

from datetime import UTC, datetime

# Universal tags (single byte, as used here).
BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
ENUMERATED = 0x0A
SEQUENCE = 0x30
SET = 0x31
GENERALIZED_TIME = 0x18


def context(number: int, constructed: bool = True) -> int:
    """Tag byte of a context-specific ``[number]`` (low tag numbers only)."""
    if not 0 <= number < 31:
        raise ValueError(f"context tag {number} out of range")
    return 0x80 | (0x20 if constructed else 0) | number


def encode_length(n: int) -> bytes:
    """DER definite length octets (short form below 128, minimal long form above)."""
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, length, content."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    return bytes((tag,)) + encode_length(n) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def integer(value: int) -> bytes:
    """DER INTEGER: minimal two's complement."""
    if value >= 0:
        size = value.bit_length() // 8 + 1
    else:
        size = (-value - 1).bit_length() // 8 + 1
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def octet_string(value: bytes) -> bytes:
    return tlv(OCTET_STRING, value)


def bit_string(value: bytes) -> bytes:
    """BIT STRING of whole octets (zero unused bits), as signatures and keys are."""
    return tlv(BIT_STRING, b"\x00" + value)


def enumerated(value: int) -> bytes:
    if not 0 <= value < 128:
        raise ValueError(f"ENUMERATED {value} out of the supported range")
    return bytes((ENUMERATED, 1, value))


def oid(dotted: str) -> bytes:
    """DER OBJECT IDENTIFIER from its dotted form (used for constants only)."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"bad OID {dotted!r}")
    values = [arcs[0] * 40 + arcs[1], *arcs[2:]]
    body = bytearray()
    for v in values:
        chunk = [v & 0x7F]
        v >>= 7
        while v:
            chunk.append(0x80 | (v & 0x7F))
            v >>= 7
        body.extend(reversed(chunk))
    return tlv(OID, bytes(body))


def generalized_time(when: datetime) -> bytes:
    """GeneralizedTime ``YYYYMMDDHHMMSSZ``: UTC, fractional seconds truncated (RFC 5280).

    A naive datetime is taken to be UTC already (as cryptography does); an aware
    one is converted.
    """
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    text = (
        f"{when.year:04d}{when.month:02d}{when.day:02d}"
        f"{when.hour:02d}{when.minute:02d}{when.second:02d}Z"
    )
    return bytes((GENERALIZED_TIME, 15)) + text.encode("ascii")


def read_tlv(data: bytes, offset: int = 0, end: int | None = None) -> tuple[int, int, int]:
    """Read the element at ``offset``: return ``(tag, content_start, end)``.

    Strict DER subset: single-byte tags, definite minimal lengths of at most 4
    length octets. Raises :class:`ValueError` on anything else or when the element
    overruns ``end`` (default: the end of ``data``). The one TLV reader: the
    request parser walks requests with it, the response code certificates.
    """
    limit = len(data) if end is None else end
    if offset + 2 > limit:
        raise ValueError("truncated DER element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("indefinite or oversized length")
        if pos + count > limit:
            raise ValueError("truncated DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise ValueError("non-minimal DER length")
        pos += count
    stop = pos + length
    if stop > limit:
        raise ValueError("DER element overruns its buffer")
    return tag, pos, stop


def oid_text(content: bytes) -> str:
    """The dotted form of an OBJECT IDENTIFIER's content octets (strict: minimal arcs).

    Raises :class:`ValueError` for an empty OID, a truncated arc or a padded one.
    """
    if not content or content[-1] & 0x80:
        raise ValueError("truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    fresh = True
    for octet in content:
        if fresh and octet == 0x80:
            raise ValueError("non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (octet & 0x7F)
        fresh = not octet & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:])


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The elements between ``start`` and ``end``: ``(tag, element_start, content_start, end)``."""
    out = []
    pos = start
    while pos < end:
        tag, content, elem_end = read_tlv(data, pos, end)
        out.append((tag, pos, content, elem_end))
        pos = elem_end
    return out
