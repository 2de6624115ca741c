"""Framing between the pool and its workers."""

from __future__ import annotations

import pytest

from hsmocsp.signing import wire


def test_round_trip_in_pieces() -> None:
    messages = [{"op": "sign", "id": i, "data_b64": wire.b64(bytes([i]) * i)} for i in range(5)]
    stream = b"".join(wire.encode(m) for m in messages)
    decoder = wire.Decoder()
    out = []
    for i in range(0, len(stream), 3):  # arbitrary chunking
        out.extend(decoder.feed(stream[i : i + 3]))
    assert out == messages
    assert wire.unb64(out[4]["data_b64"]) == b"\x04" * 4


@pytest.mark.parametrize(
    "stream",
    [
        (wire.MAX_FRAME + 1).to_bytes(4, "big"),
        (3).to_bytes(4, "big") + b"{{{",
        (2).to_bytes(4, "big") + b"[]",
    ],
)
def test_corrupt_streams(stream: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.Decoder().feed(stream)


def test_bad_base64() -> None:
    with pytest.raises(wire.FrameError):
        wire.unb64("not base64!")
    with pytest.raises(wire.FrameError):
        wire.unb64(None)
