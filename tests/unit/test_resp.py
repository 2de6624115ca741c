"""The RESP2 framing of hsmocsp/stores/resp.py: replies split anywhere, errors as values,
a lost connection or a deadline fails every waiting command with StoreUnavailable."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hsmocsp.errors import StoreUnavailable
from hsmocsp.stores.resp import (
    ProtocolViolation,
    ReplyError,
    ReplyParser,
    RespProtocol,
    encode_command,
)

STREAM = (
    b"+OK\r\n-READONLY You can't write against a read only replica.\r\n:42\r\n$3\r\nabc\r\n"
    b"$-1\r\n*2\r\n$1\r\nx\r\n*1\r\n:1\r\n$0\r\n\r\n*-1\r\n$4\r\na\r\nb\r\n"
)
REPLIES = [
    "OK",
    ReplyError("READONLY You can't write against a read only replica."),
    42,
    b"abc",
    None,
    [b"x", [1]],
    b"",
    None,
    b"a\r\nb",
]


def test_encode() -> None:
    wire = b"*3\r\n$4\r\nHSET\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n"
    assert encode_command(["HSET", b"k\r\n", 7]) == wire


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_replies_split_anywhere(size: int) -> None:
    parser = ReplyParser()
    got = []
    for start in range(0, len(STREAM), size):
        got += parser.feed(STREAM[start : start + size])
    assert got == REPLIES
    assert ReplyError("READONLY x").code == "READONLY"


@pytest.mark.parametrize("bad", [b"?x\r\n", b":notanumber\r\n", b"$3\r\nabcXY", b"\r\n"])
def test_garbage_is_a_protocol_violation(bad: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ReplyParser().feed(bad)


def _connected(clock: Clock) -> tuple[RespProtocol, StringTransport]:
    proto = RespProtocol(clock, "redis test")
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_pipeline_and_deadline() -> None:
    clock = Clock()
    proto, transport = _connected(clock)
    got: list[object] = []
    proto.pipeline([("PING",), ("GET", "k")], timeout=1).addCallback(got.append)
    assert transport.value() == b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    proto.dataReceived(b"+PONG\r\n$1\r")
    proto.dataReceived(b"\nv\r\n")
    assert got == [["PONG", b"v"]]
    clock.advance(5)  # the deadline was cancelled by the last reply
    assert not transport.disconnecting
    failures: list[object] = []
    proto.execute("GET", "slow", timeout=0.5).addErrback(failures.append)
    clock.advance(0.5)
    assert transport.disconnecting  # aborted: later replies would be matched wrongly
    from twisted.python.failure import Failure

    proto.connectionLost(Failure(ConnectionError("gone")))
    assert len(failures) == 1
    assert "no answer within 0.5 s" in str(failures[0].value)  # type: ignore[attr-defined]
    assert isinstance(failures[0].value, StoreUnavailable)  # type: ignore[attr-defined]
    late: list[object] = []
    proto.execute("PING").addErrback(late.append)
    assert len(late) == 1


def test_pubsub_pushes_and_replies() -> None:
    proto, _ = _connected(Clock())
    messages: list[tuple[bytes, bytes]] = []
    proto.on_message = lambda channel, data: messages.append((channel, data))
    replies: list[object] = []
    proto.subscribe(b"hsmocsp:inv").addCallback(replies.append)
    proto.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$11\r\nhsmocsp:inv\r\n:1\r\n")
    proto.dataReceived(b"*3\r\n$7\r\nmessage\r\n$11\r\nhsmocsp:inv\r\n$6\r\nroot 1\r\n")
    proto.execute("PING").addCallback(replies.append)
    proto.dataReceived(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert replies == [[b"subscribe", b"hsmocsp:inv", 1], [b"pong", b""]]
    assert messages == [(b"hsmocsp:inv", b"root 1")]
