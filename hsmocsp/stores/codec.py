"""The one byte encoding of a stored signed response (the value of a Redis hash field).

Written by a signer, read by server replicas that may run another version during a
rolling upgrade, so the format is explicit and versioned rather than pickled or
JSON: a reader that meets a version it does not know, or bytes that do not parse
exactly, gets :class:`~hsmocsp.errors.StoredValueError` (a miss: the request is
forwarded to the signer), never a wrong answer or a crash.

Version 1, big-endian, no padding::

    u8   version (1)
    u8   flags (bit 0: cacheable; the other bits must be 0)
    f64  produced_at, this_update, next_update, refresh_at, cert_not_after (Unix seconds;
         cert_not_after may be +inf: not known)
    u16  length + UTF-8 status_key   ("good", "revoked:<time>:<reason>", ...)
    u16  length + ASCII etag
    u8   length + cert_fp            (SHA-256 of the responder certificate, or empty)
    u32  length + the OCSPResponse DER (not empty)

and nothing after it. The encoding of a value is unique (no optional parts), so
the same response always gives the same bytes: tests pin them as vectors.
"""

from __future__ import annotations

import math
import struct

from hsmocsp.errors import StoredValueError
from hsmocsp.handle import SignedResponse

VERSION = 1
_HEAD = struct.Struct(">BB5d")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CACHEABLE = 0x01
#: An OCSP response larger than this is not one of ours (a corrupt length, say).
MAX_DER = 1 << 20


def encode(response: SignedResponse) -> bytes:
    """The stored bytes of ``response`` (raises ValueError for a value we would
    never store: empty DER, non-finite times, oversized fields)."""
    times = (
        response.produced_at,
        response.this_update,
        response.next_update,
        response.refresh_at,
    )
    if not all(math.isfinite(t) for t in times) or math.isnan(response.cert_not_after):
        raise ValueError("stored responses have finite times")
    if not response.der or len(response.der) > MAX_DER:
        raise ValueError(f"DER of {len(response.der)} bytes cannot be stored")
    status = response.status_key.encode("utf-8")
    etag = response.etag.encode("ascii")
    if len(status) > 0xFFFF or len(etag) > 0xFFFF or len(response.cert_fp) > 0xFF:
        raise ValueError("field too long to store")
    return b"".join(
        (
            _HEAD.pack(
                VERSION,
                _CACHEABLE if response.cacheable else 0,
                *times,
                response.cert_not_after,
            ),
            _U16.pack(len(status)),
            status,
            _U16.pack(len(etag)),
            etag,
            _U8.pack(len(response.cert_fp)),
            response.cert_fp,
            _U32.pack(len(response.der)),
            response.der,
        )
    )


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.at + n
        if end > len(self.data):
            raise StoredValueError(f"stored value truncated in {what}")
        chunk = bytes(self.data[self.at : end])
        self.at = end
        return chunk

    def sized(self, size: struct.Struct, what: str) -> bytes:
        (n,) = size.unpack(self.take(size.size, f"{what} length"))
        return self.take(int(n), what)


def decode(data: bytes) -> SignedResponse:
    """The response stored as ``data``; :class:`StoredValueError` if it is not exactly
    a value :func:`encode` makes (any version but ours, a bad length, trailing bytes)."""
    if not data:
        raise StoredValueError("empty stored value")
    if data[0] != VERSION:
        raise StoredValueError(f"stored value has format version {data[0]}, not {VERSION}")
    r = _Reader(data)
    _, flags, produced, this_update, next_update, refresh_at, not_after = _HEAD.unpack(
        r.take(_HEAD.size, "header")
    )
    if flags & ~_CACHEABLE:
        raise StoredValueError(f"stored value has unknown flags {flags:#x}")
    if not all(math.isfinite(t) for t in (produced, this_update, next_update, refresh_at)) or (
        math.isnan(not_after)
    ):
        raise StoredValueError("stored value has a time that is not a number")
    try:
        status = r.sized(_U16, "status").decode("utf-8")
        etag = r.sized(_U16, "etag").decode("ascii")
    except UnicodeDecodeError as err:
        raise StoredValueError(f"stored value has undecodable text: {err.reason}") from None
    cert_fp = r.sized(_U8, "certificate fingerprint")
    (der_len,) = _U32.unpack(r.take(_U32.size, "DER length"))
    if not 0 < der_len <= MAX_DER:
        raise StoredValueError(f"stored value has a DER length of {der_len}")
    der = r.take(der_len, "DER")
    if r.at != len(data):
        raise StoredValueError(f"stored value has {len(data) - r.at} trailing byte(s)")
    return SignedResponse(
        der=der,
        produced_at=produced,
        this_update=this_update,
        next_update=next_update,
        refresh_at=refresh_at,
        etag=etag,
        cacheable=bool(flags & _CACHEABLE),
        status_key=status,
        cert_fp=cert_fp,
        cert_not_after=not_after,
    )


__all__ = ["MAX_DER", "VERSION", "decode", "encode"]
