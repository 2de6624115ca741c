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
    last = out[4]
    assert isinstance(last, dict)
    assert wire.unb64(last["data_b64"]) == b"\x04" * 4


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


# --- binary sign/result frames ------------------------------------------------------------

@pytest.mark.parametrize(
    ("mechanism", "label", "key_id"),
    [
        ("CKM_SHA256_RSA_PKCS", "rsa", None),
        ("CKM_ECDSA", None, b"\x02"),
        ("CKM_SHA384_RSA_PKCS", "ключ", b"\x00" * 40),
        ("CKM_SHA512_RSA_PKCS", "", b""),
    ],
)
def test_sign_frame_round_trip(mechanism: str, label: str | None, key_id: bytes | None) -> None:
    part = wire.sign_key_part(mechanism, label, key_id)
    data = bytes(range(256)) * 5
    frame = wire.encode_sign(2**32 + 7, part, data)  # ids wrap at 32 bits
    (decoded,) = wire.Decoder().feed(frame)
    assert decoded == wire.SignRequest(7, mechanism, label, key_id, data)


def test_mixed_stream_in_pieces() -> None:
    frames = [
        wire.encode_result(1, b"signature" * 30),
        wire.encode({"id": 2, "ok": False, "kind": "error", "message": "no"}),
        wire.encode_result(3, b""),
        wire.encode_sign(4, wire.sign_key_part("CKM_ECDSA", "k", None), b"x"),
    ]
    stream = b"".join(frames)
    for step in (1, 2, 5, 64, len(stream)):
        decoder = wire.Decoder()
        out: list[wire.Frame] = []
        for i in range(0, len(stream), step):
            out.extend(decoder.feed(stream[i : i + step]))
        assert out == [
            wire.Result(1, b"signature" * 30),
            {"id": 2, "ok": False, "kind": "error", "message": "no"},
            wire.Result(3, b""),
            wire.SignRequest(4, "CKM_ECDSA", "k", None, b"x"),
        ]


def test_unknown_mechanism_has_no_binary_code() -> None:
    with pytest.raises(KeyError):
        wire.sign_key_part("CKM_MD5_RSA_PKCS", "k", None)
    with pytest.raises(wire.FrameError):
        wire.sign_key_part("CKM_ECDSA", "x" * 70000, None)


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty frame
        b"\x02\x00\x00",  # truncated result
        b"\x01\x00\x00\x00\x01\x00\x00",  # truncated sign header
        b"\x01\x00\x00\x00\x01\x09\xff\xff\xff\xff",  # unknown mechanism code
        b"\x01\x00\x00\x00\x01\x00\x00\x05\xff\xffab",  # label overruns the frame
        b"\x01\x00\x00\x00\x01\x00\xff\xff\x00\x05ab",  # key id overruns the frame
        b"\x01\x00\x00\x00\x01\x00\x00\x02\xff\xff\xff\xfe",  # label not UTF-8
        b"\x7f",  # neither binary nor JSON
    ],
)
def test_corrupt_binary_frames(body: bytes) -> None:
    with pytest.raises(wire.FrameError):
        wire.Decoder().feed(_frame(body))


def test_oversized_frames_refused_when_encoding() -> None:
    with pytest.raises(wire.FrameError):
        wire.encode_sign(1, wire.sign_key_part("CKM_ECDSA", "k", None), b"x" * wire.MAX_FRAME)
    with pytest.raises(wire.FrameError):
        wire.encode_result(1, b"x" * wire.MAX_FRAME)
