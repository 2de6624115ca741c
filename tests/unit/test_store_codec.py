"""The stored-response encoding (hsmocsp/stores/codec.py): byte-exact vectors, round
trips, and every malformed value a distinct StoredValueError (never a crash)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmocsp.errors import StoredValueError
from hsmocsp.handle import SignedResponse
from hsmocsp.stores.codec import MAX_DER, VERSION, decode, encode

REVOKED = SignedResponse(
    der=bytes.fromhex("30030a0100"),
    produced_at=1700000000.0,
    this_update=1700000000.0,
    next_update=1700003600.0,
    refresh_at=1700001800.5,
    etag='"abc"',
    cacheable=True,
    status_key="revoked:1690000000:1",
    cert_fp=bytes(range(32)),
    cert_not_after=1800000000.0,
)
REVOKED_BYTES = bytes.fromhex(
    "01"  # version
    "01"  # flags: cacheable
    "41d954fc40000000"  # produced_at 1700000000.0
    "41d954fc40000000"  # this_update
    "41d954ffc4000000"  # next_update 1700003600.0
    "41d954fe02200000"  # refresh_at 1700001800.5
    "41dad27480000000"  # cert_not_after 1800000000.0
    "0014" + b"revoked:1690000000:1".hex() + "0005" + b'"abc"'.hex() + "20" + bytes(range(32)).hex()
    + "00000005" "30030a0100"
)
MINIMAL = SignedResponse(
    der=b"\x30\x00",
    produced_at=0.0,
    this_update=0.0,
    next_update=60.0,
    refresh_at=30.0,
    etag="",
    cacheable=False,
)
MINIMAL_BYTES = bytes.fromhex(
    "01" "00" + "00" * 16 + "404e000000000000" "403e000000000000" "7ff0000000000000"  # +inf
    "0000" "0000" "00" "00000002" "3000"
)


@pytest.mark.parametrize(
    ("value", "stored"), [(REVOKED, REVOKED_BYTES), (MINIMAL, MINIMAL_BYTES)], ids=["full", "min"]
)
def test_vectors(value: SignedResponse, stored: bytes) -> None:
    assert encode(value) == stored
    assert decode(stored) == value
    assert stored[0] == VERSION == 1


times = st.floats(min_value=0, max_value=1e11, allow_nan=False, allow_infinity=False)


@st.composite
def responses(draw: st.DrawFn) -> SignedResponse:
    return SignedResponse(
        der=draw(st.binary(min_size=1, max_size=300)),
        produced_at=draw(times),
        this_update=draw(times),
        next_update=draw(times),
        refresh_at=draw(times),
        etag=draw(st.text(alphabet=st.characters(max_codepoint=127), max_size=40)),
        cacheable=draw(st.booleans()),
        status_key=draw(st.text(max_size=40)),
        cert_fp=draw(st.binary(max_size=64)),
        cert_not_after=draw(times | st.just(math.inf)),
    )


@given(responses())
def test_round_trip(value: SignedResponse) -> None:
    stored = encode(value)
    assert decode(stored) == value
    assert encode(decode(stored)) == stored


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    try:
        value = decode(data)
    except StoredValueError:
        return
    assert encode(value) == data  # whatever decodes is exactly what encode makes


def test_every_truncation_is_a_stored_value_error() -> None:
    for cut in range(len(REVOKED_BYTES)):
        with pytest.raises(StoredValueError):
            decode(REVOKED_BYTES[:cut])


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x02" + REVOKED_BYTES[1:], "format version 2"),
        (b"\x00" + REVOKED_BYTES[1:], "format version 0"),
        (REVOKED_BYTES + b"\x00", "1 trailing byte"),
        (REVOKED_BYTES[:1] + b"\x03" + REVOKED_BYTES[2:], "unknown flags"),
        (REVOKED_BYTES[:2] + struct.pack(">d", math.nan) + REVOKED_BYTES[10:], "not a number"),
        (MINIMAL_BYTES[:-6] + b"\x00\x00\x00\x00", "DER length of 0"),
        (MINIMAL_BYTES[:-6] + struct.pack(">I", MAX_DER + 1) + b"\x30\x00", "DER length"),
        (MINIMAL_BYTES[:42] + b"\x00\x01\xff" + MINIMAL_BYTES[44:], "undecodable"),
    ],
)
def test_bad_values(data: bytes, says: str) -> None:
    with pytest.raises(StoredValueError, match=says):
        decode(data)


def test_values_never_stored_are_refused_at_encoding() -> None:
    from dataclasses import replace

    with pytest.raises(ValueError):
        encode(replace(MINIMAL, der=b""))
    with pytest.raises(ValueError):
        encode(replace(MINIMAL, next_update=math.inf))
