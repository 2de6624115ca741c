"""Messages between the pool (parent) and its signing workers (children).

The framing is the child-process layer's (:mod:`hsmocsp.childproc`): a 4-byte
big-endian length followed by that many bytes of body. Two kinds of body:

* JSON (the body starts with ``{``): the rare messages (``init`` with the PIN,
  ``public_key``, ``check``, every error reply). Bytes travel as base64 strings
  under keys ending in ``_b64``.
* binary, for the hot path, because JSON + base64 cost more reactor time than
  the rest of a cache-miss signature's bookkeeping together:

  - sign request ``0x01``: ``>BI`` (kind, id), ``>BHH`` (mechanism code, label
    length, key id length; 0xFFFF means absent), the UTF-8 label, the key id,
    then the data to sign up to the end of the frame;
  - result ``0x02``: ``>BI`` (kind, id), then the result bytes.

Neither JSON nor this binary form is pickle: the parent never executes anything
a worker sends, so a worker that loaded a misbehaving vendor module cannot run
code in the responder.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, NamedTuple

from hsmocsp.childproc import HEADER as _HEADER
from hsmocsp.childproc import FrameError as FrameError  # a bad body is a bad frame
from hsmocsp.childproc import FrameReader

# A request carries at most a tbsResponseData (a few KiB) and a reply at most a
# signature or an SPKI; anything near this bound means the stream is corrupt.
MAX_FRAME = 1 << 20

_ID = struct.Struct(">BI")  # kind, request id
_KEY = struct.Struct(">BHH")  # mechanism code, label length, key id length
_SIGN_KIND = 0x01
_RESULT_KIND = 0x02
_ABSENT = 0xFFFF
_ID_MASK = 0xFFFFFFFF

#: Mechanisms with a binary code (their index); others travel as JSON.
MECHANISM_CODES: tuple[str, ...] = (
    "CKM_SHA256_RSA_PKCS",
    "CKM_SHA384_RSA_PKCS",
    "CKM_SHA512_RSA_PKCS",
    "CKM_ECDSA",
)
_CODE_OF = {name: code for code, name in enumerate(MECHANISM_CODES)}

Message = dict[str, Any]


class SignRequest(NamedTuple):
    """A binary sign request, as the worker receives it."""

    id: int
    mechanism: str
    label: str | None
    key_id: bytes | None
    data: bytes


class Result(NamedTuple):
    """A successful reply carrying bytes (a signature or an SPKI)."""

    id: int
    result: bytes


Frame = Message | SignRequest | Result


def token_location(module: str, token_label: str | None, slot: int | None) -> str:
    """How pool and worker name a token in messages (the pool recognises the worker's
    prefix by this exact text, so both must spell it the same)."""
    if token_label is None:
        return f"slot {slot} in PKCS#11 module {module}"
    return f"token {token_label!r} in PKCS#11 module {module}"


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def sign_key_part(mechanism: str, label: str | None, key_id: bytes | None) -> bytes:
    """The part of a sign request after the id and before the data: computed once per key.

    Raises KeyError for a mechanism without a binary code (send JSON instead)
    and FrameError for a label or key id too long for the frame.
    """
    code = _CODE_OF[mechanism]
    label_bytes = label.encode() if label is not None else b""
    if len(label_bytes) >= _ABSENT or (key_id is not None and len(key_id) >= _ABSENT):
        raise FrameError("key label or id too long")
    return (
        _KEY.pack(code, len(label_bytes) if label is not None else _ABSENT,
                  len(key_id) if key_id is not None else _ABSENT)
        + label_bytes + (key_id or b"")
    )


def encode_sign(request_id: int, key_part: bytes, data: bytes) -> bytes:
    """A binary sign request frame; ``key_part`` from :func:`sign_key_part`."""
    size = _ID.size + len(key_part) + len(data)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return b"".join((
        _HEADER.pack(size), _ID.pack(_SIGN_KIND, request_id & _ID_MASK), key_part, data,
    ))


def encode_result(request_id: int, result: bytes) -> bytes:
    size = _ID.size + len(result)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(size) + _ID.pack(_RESULT_KIND, request_id & _ID_MASK) + result


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise FrameError("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as err:
        raise FrameError("bad base64") from err


def decode_body(body: bytes) -> Frame:
    """One frame's body as a JSON object, a :class:`SignRequest` or a :class:`Result`."""
    if not body:
        raise FrameError("empty frame")
    kind = body[0]
    if kind == _RESULT_KIND:
        if len(body) < _ID.size:
            raise FrameError("truncated result frame")
        return Result(_ID.unpack_from(body)[1], body[_ID.size :])
    if kind == _SIGN_KIND:
        return _decode_sign(body)
    try:
        message = json.loads(body)
    except ValueError as err:
        raise FrameError("frame is not JSON") from err
    if not isinstance(message, dict):
        raise FrameError("frame is not a JSON object")
    return message


def _decode_sign(body: bytes) -> SignRequest:
    if len(body) < _ID.size + _KEY.size:
        raise FrameError("truncated sign frame")
    _, request_id = _ID.unpack_from(body)
    code, label_len, id_len = _KEY.unpack_from(body, _ID.size)
    if code >= len(MECHANISM_CODES):
        raise FrameError(f"unknown mechanism code {code}")
    pos = _ID.size + _KEY.size
    label = None
    if label_len != _ABSENT:
        if pos + label_len > len(body):
            raise FrameError("truncated sign frame")
        try:
            label = body[pos : pos + label_len].decode()
        except UnicodeDecodeError as err:
            raise FrameError("key label is not UTF-8") from err
        pos += label_len
    key_id = None
    if id_len != _ABSENT:
        if pos + id_len > len(body):
            raise FrameError("truncated sign frame")
        key_id = body[pos : pos + id_len]
        pos += id_len
    return SignRequest(request_id, MECHANISM_CODES[code], label, key_id, body[pos:])


class Decoder:
    """Accumulates bytes and yields whole decoded frames."""

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = FrameReader(MAX_FRAME)

    def feed(self, data: bytes) -> list[Frame]:
        return [decode_body(body) for body in self._reader.feed(data)]
