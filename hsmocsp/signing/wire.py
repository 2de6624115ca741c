"""Framing between the pool (parent) and its signing workers (children).

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
JSON rather than pickle: the parent never executes anything a worker sends, so a
worker that loaded a misbehaving vendor module cannot run code in the responder.
Bytes travel as base64 strings under keys ending in ``_b64``.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

# A request carries at most a tbsResponseData (a few KiB) and a reply at most a
# signature or an SPKI; anything near this bound means the stream is corrupt.
MAX_FRAME = 1 << 20

_HEADER = struct.Struct(">I")

Message = dict[str, Any]


class FrameError(Exception):
    """The byte stream is not a sequence of valid frames."""


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise FrameError("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as err:
        raise FrameError("bad base64") from err


class Decoder:
    """Accumulates bytes and yields whole messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                message = json.loads(body)
            except ValueError as err:
                raise FrameError("frame is not JSON") from err
            if not isinstance(message, dict):
                raise FrameError("frame is not a JSON object")
            messages.append(message)
        return messages
