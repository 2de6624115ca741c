"""A small RESP2 client on Twisted protocols: what :mod:`hsmocsp.stores.redis` needs, no more.

Why our own (docs/design-replicas.md, "Redis client"): the store needs a handful of
commands (AUTH, SELECT, ROLE, HSET/HGET/DEL, EXPIREAT, SCAN, PUBLISH/SUBSCRIBE,
SENTINEL get-master-addr-by-name), pipelining, a hard deadline on every exchange, a
distinct error when Redis cannot answer, and TLS through Twisted's own endpoints, on
the default reactor. RESP2 is a few lines of framing; owning them keeps those
behaviours explicit and ``mypy --strict`` clean.

A :class:`RespProtocol` is one connection: commands are written at once (pipelined)
and their replies matched in order. An error reply (``-READONLY ...``) is returned as a
:class:`ReplyError` value (a pipeline keeps going), a lost connection or a deadline
fails every waiting command with :class:`~hsmocsp.errors.StoreUnavailable`, and the
connection is closed (replies are matched by order: one that never came would shift
every later one). In subscribe mode, ``message`` pushes go to ``on_message``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from hsmocsp.errors import StoreUnavailable


@dataclass(frozen=True)
class ReplyError:
    """An error reply from Redis (``-ERR ...``, ``-READONLY ...``, ``-NOAUTH ...``)."""

    message: str

    @property
    def code(self) -> str:
        """The first word: ``ERR``, ``READONLY``, ``NOAUTH``, ``WRONGPASS``, ..."""
        return self.message.split(" ", 1)[0]


Reply = Union[str, int, bytes, None, "list[Reply]", ReplyError]
Arg = str | bytes | int | float


class ProtocolViolation(Exception):
    """The peer does not speak RESP2."""


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class ReplyParser:
    """Incremental RESP2 reply parser: :meth:`feed` bytes, get the complete replies."""

    #: A bulk string or array larger than this is not a reply we asked for.
    MAX_BULK = 64 << 20

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies: list[Reply] = []
        while True:
            start = self._pos
            try:
                reply = self._parse()
            except _Incomplete:
                self._pos = start
                break
            replies.append(reply)
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return replies

    def _line(self) -> bytes:
        end = self._buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(self._buf) - self._pos > 65536:
                raise ProtocolViolation("RESP line too long")
            raise _Incomplete
        line = bytes(self._buf[self._pos : end])
        self._pos = end + 2
        return line

    def _number(self, text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise ProtocolViolation(f"not a number: {text[:40]!r}") from None

    def _parse(self) -> Reply:
        line = self._line()
        if not line:
            raise ProtocolViolation("empty RESP line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return self._number(rest)
        if kind == b"$":
            n = self._number(rest)
            if n < 0:
                return None
            if n > self.MAX_BULK:
                raise ProtocolViolation(f"bulk string of {n} bytes")
            if len(self._buf) - self._pos < n + 2:
                raise _Incomplete
            data = bytes(self._buf[self._pos : self._pos + n])
            if self._buf[self._pos + n : self._pos + n + 2] != b"\r\n":
                raise ProtocolViolation("bulk string not followed by CRLF")
            self._pos += n + 2
            return data
        if kind == b"*":
            n = self._number(rest)
            if n < 0:
                return None
            if n > self.MAX_BULK:
                raise ProtocolViolation(f"array of {n} elements")
            return [self._parse() for _ in range(n)]
        raise ProtocolViolation(f"unknown RESP type {kind!r}")


class _Incomplete(Exception):
    pass


class RespProtocol(Protocol):
    """One Redis connection. ``clock`` runs the per-exchange deadlines."""

    def __init__(self, clock: IReactorTime, name: str = "redis") -> None:
        self.clock = clock
        self.name = name
        self._parser = ReplyParser()
        self._waiting: deque[tuple[Deferred[Reply], IDelayedCall | None]] = deque()
        self._closed: Failure | None = None
        self.on_lost: Callable[[RespProtocol, str], None] | None = None
        self.on_message: Callable[[bytes, bytes], None] | None = None
        self.subscribed = False
        self._gone = False
        self._lost_waiters: list[Deferred[None]] = []

    # --- twisted ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolViolation as err:
            self.abort(f"protocol error: {err}")
            return
        for reply in replies:
            if self.subscribed and self._push(reply):
                continue
            if not self._waiting:
                self.abort("a reply nobody asked for")
                return
            d, timer = self._waiting.popleft()
            if timer is not None and timer.active():
                timer.cancel()
            if not d.called:
                d.callback(reply)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        why = self._closed or reason
        self._closed = why
        self._gone = True
        lost, self._lost_waiters = self._lost_waiters, []
        for waiter in lost:
            waiter.callback(None)
        waiting, self._waiting = self._waiting, deque()
        for d, timer in waiting:
            if timer is not None and timer.active():
                timer.cancel()
            if not d.called:
                d.errback(Failure(StoreUnavailable(f"{self.name}: {_why(why)}")))
        if self.on_lost is not None:
            self.on_lost(self, _why(why))

    # --- use --------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._closed is None and self.transport is not None

    def when_lost(self) -> Deferred[None]:
        """Fires once the connection is really gone (``abort`` only schedules that: the
        reactor calls ``connectionLost`` on a later turn)."""
        if self._gone or self.transport is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def abort(self, why: str) -> None:
        """Close now; every waiting command fails with ``why``."""
        if self._closed is None:
            self._closed = Failure(StoreUnavailable(why))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def execute(self, *args: Arg, timeout: float | None = None) -> Deferred[Reply]:
        """One command; its reply (an error reply as a :class:`ReplyError` value)."""
        return self.pipeline([args], timeout=timeout).addCallback(lambda replies: replies[0])

    def pipeline(
        self, commands: Sequence[Sequence[Arg]], timeout: float | None = None
    ) -> Deferred[list[Reply]]:
        """Several commands in one write; their replies in order. Past ``timeout``
        seconds without every reply, the connection is closed (StoreUnavailable)."""
        if self._closed is not None or self.transport is None:
            why = _why(self._closed) if self._closed is not None else "not connected"
            failed: Deferred[list[Reply]] = Deferred()
            failed.errback(Failure(StoreUnavailable(f"{self.name}: {why}")))
            return failed
        deferreds: list[Deferred[Reply]] = []
        timer: IDelayedCall | None = None
        if timeout is not None and commands:
            timer = self.clock.callLater(
                timeout, self.abort, f"no answer within {timeout:g} s"
            )
        for n, _ in enumerate(commands):
            d: Deferred[Reply] = Deferred()
            deferreds.append(d)
            # The deadline is cancelled by the last reply (all came in time).
            self._waiting.append((d, timer if n == len(commands) - 1 else None))
        self.transport.write(b"".join(encode_command(c) for c in commands))
        return _gather(deferreds)

    def subscribe(self, channel: bytes, timeout: float | None = None) -> Deferred[Reply]:
        """Enter subscribe mode on ``channel``; later ``message`` pushes go to
        ``on_message(channel, data)``."""
        self.subscribed = True
        return self.execute("SUBSCRIBE", channel, timeout=timeout)

    def _push(self, reply: Reply) -> bool:
        """A pub/sub push (True), or the reply to a command (False)."""
        if not isinstance(reply, list) or len(reply) != 3 or not isinstance(reply[0], bytes):
            return False
        kind = reply[0]
        if kind == b"message":
            channel, data = reply[1], reply[2]
            if self.on_message is not None and isinstance(channel, bytes) and isinstance(
                data, bytes
            ):
                self.on_message(channel, data)
            return True
        return False  # subscribe/unsubscribe confirmations answer our commands


def _gather(deferreds: list[Deferred[Reply]]) -> Deferred[list[Reply]]:
    """All replies in order; the first failure fails the whole (the rest are
    consumed, so no "Unhandled error in Deferred" is left behind)."""
    result: Deferred[list[Reply]] = Deferred()
    replies: list[Reply | None] = [None] * len(deferreds)
    left = [len(deferreds)]
    failed: list[Failure] = []

    def one(value: Reply | Failure, n: int) -> None:
        if isinstance(value, Failure):
            failed.append(value)
        else:
            replies[n] = value
        left[0] -= 1
        if left[0] == 0:
            if failed:
                result.errback(failed[0])
            else:
                result.callback(replies)

    if not deferreds:
        result.callback([])
    for n, d in enumerate(deferreds):
        d.addBoth(one, n)
    return result


def _why(failure: Failure | None) -> str:
    if failure is None:
        return "closed"
    err = failure.value
    text = str(err) if err is not None else ""
    return text or type(err).__name__


__all__ = [
    "Arg",
    "ProtocolViolation",
    "Reply",
    "ReplyError",
    "ReplyParser",
    "RespProtocol",
    "encode_command",
]
