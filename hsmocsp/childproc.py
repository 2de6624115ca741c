"""The one child-process layer: framing, one child's pipes, and a supervisor.

hsmocsp starts three kinds of Python children: signing workers (one PKCS#11
session each, kept running), HTTP fronts (``--workers N``, kept running) and
index parsers (one per reload, short-lived). They used to have three
hand-written process protocols, three length-prefixed framings and two copies
of restart back-off; this module is the one of each that they share.

* **Framing**: a frame is a 4-byte big-endian length and that many bytes of
  body, exactly Twisted's :class:`~twisted.protocols.basic.Int32StringReceiver`
  framing. That class is a ``Protocol`` for one transport; a child's stdout
  reaches us through ``ProcessProtocol.childDataReceived`` and a worker reads a
  raw fd, so :class:`FrameReader` is the same framing as a plain decoder that
  both sides use. What a body holds is the user's business (signing: JSON or
  binary, see :mod:`hsmocsp.signing.wire`; fronts: pickle down, JSON up; index
  parser: a type byte and a payload).
* :class:`Child`: one process; frames from its stdout to ``on_frame``, its
  stderr lines to the log (under its name) and the last 4 KiB kept for error
  messages, frames to its stdin, kill, close, an ``ended`` Deferred.
* :class:`Supervisor`: keeps ``count`` numbered children of one kind running,
  as ``twisted.runner.procmon.ProcessMonitor`` does: a child that ran stably is
  restarted after ``Backoff.first`` seconds, one that keeps failing with delays
  growing to ``Backoff.cap``; optionally one start at a time (``serial``: a
  token login must not overlap another process's ``C_Initialize``); ``hold`` stops
  restarts until ``release`` (a refused PIN). ProcessMonitor itself does not fit:
  it restarts by name with no notion of "started" (a logged-in worker, a front
  that bound its port), and its children's output goes to the log, not to us.

The signing pool's dispatch, pipelining, timeouts and load shedding stay in
:mod:`hsmocsp.signing.pool`: they are about requests, not processes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "HEADER",
    "Backoff",
    "Child",
    "FrameError",
    "FrameReader",
    "Supervisor",
    "encode_frame",
    "stop_children",
]

log = Logger()

#: The frame header: the body's length, 4 bytes big-endian (Int32StringReceiver's "!I").
HEADER = struct.Struct(">I")

_STDERR_KEEP = 4096


class FrameError(Exception):
    """The byte stream is not a sequence of valid frames (or a body is unreadable)."""


def encode_frame(body: bytes) -> bytes:
    """``body`` as one frame."""
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frame bodies; a length over ``max_frame`` is an error
    (the stream is corrupt, or the other side hostile: never buffer without bound)."""

    __slots__ = ("_chunks", "_need", "_size", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        # An incomplete frame's pieces, their size, and the size that completes it:
        # joined once when complete, so a 20 MB frame in 64 KiB reads costs one copy,
        # not one per read (Int32StringReceiver re-joins its buffer on every read).
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The bodies of every frame completed by ``data``, in order."""
        if self._chunks:
            self._chunks.append(data)
            self._size += len(data)
            if self._size < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
        bodies: list[bytes] = []
        pos = 0
        size = len(data)
        need = 4
        while size - pos >= 4:
            (length,) = HEADER.unpack_from(data, pos)
            if length > self.max_frame:
                raise FrameError(f"frame length {length} exceeds {self.max_frame}")
            end = pos + 4 + length
            if end > size:
                need = 4 + length
                break
            bodies.append(data[pos + 4 : end])
            pos = end
        if pos < size:
            rest = data[pos:]
            self._chunks = [rest]
            self._size = len(rest)
            self._need = need
        else:
            self._size = 0
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return self._size if self._chunks else 0


class Child(ProcessProtocol):
    """One child process: frames out of its stdout, lines out of its stderr.

    ``on_frame(body)`` is called for each frame the child writes on fd 1; it may
    raise :class:`FrameError` for a body it cannot read, and the child is then
    killed (it is broken or hostile; nothing more is read from it). ``on_end``
    gets the reason once the process has ended and its pipes are closed;
    ``ended`` fires after that. ``log_stderr=False`` keeps stderr lines out of
    the log (only :attr:`stderr_tail` keeps them), and garbage too (only
    :attr:`garbage` keeps it): for a child whose owner reports its failure.
    """

    def __init__(
        self,
        name: str,
        *,
        on_frame: Callable[[bytes], None],
        on_end: Callable[[Failure], None],
        max_frame: int,
        log_stderr: bool = True,
    ) -> None:
        self.name = name
        self.on_frame = on_frame
        self.on_end = on_end
        self.log_stderr = log_stderr
        self.reader = FrameReader(max_frame)
        self.pid: int | None = None
        self.started_at = 0.0
        self.killed = False  # SIGKILL sent: read nothing more
        self.dead = False
        self.garbage: FrameError | None = None  # why it was killed for its output
        self.ended: Deferred[None] = Deferred()
        self.stderr_tail = b""
        self._err = bytearray()
        self._proc: IProcessTransport | None = None
        self._stdin: Any = None  # the stdin writer while direct writes are fine
        self._pipes: Mapping[int, Any] = {}

    def spawn(
        self, reactor: Any, argv: Sequence[str], env: Mapping[str, str], path: str | None = None
    ) -> None:
        """Start the process (``argv[0]`` is the executable); raises OSError if it cannot."""
        self.started_at = reactor.seconds()
        self._proc = reactor.spawnProcess(
            self, argv[0], list(argv), env=dict(env), path=path,
            childFDs={0: "w", 1: "r", 2: "r"},
        )  # fmt: skip
        self.pid = getattr(self._proc, "pid", None)
        self._pipes = getattr(self._proc, "pipes", {})
        writer = self._pipes.get(0)
        if isinstance(getattr(writer, "fd", None), int):
            self._stdin = writer

    # --- to the child -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write at once when the pipe takes all of ``data``, else through Twisted.

        Why not just ``transport.write``: it only buffers, and the bytes leave one
        reactor iteration later after four ``epoll_ctl`` calls (stop watching the
        child's EOF, watch writability, and back). On the signing hot path a request
        is a few KiB and the pipe holds 64 KiB, so one ``os.write`` nearly always
        takes it (measured, docs/design-signing.md). The first short write hands the
        pipe back to Twisted for good, which keeps the byte order; the writer still
        being in ``pipes`` means Twisted has not closed (and the kernel not reused)
        its fd.
        """
        if self._proc is None or self.dead:
            return
        writer: Any = self._stdin
        if writer is not None and writer.connected and self._pipes.get(0) is writer:
            fd: int = self._stdin.fd
            try:
                written = os.write(fd, data)
            except OSError:  # EAGAIN, or EPIPE (the child is dying): Twisted copes
                written = 0
            if written == len(data):
                return
            data = data[written:]
            self._stdin = None
        self._proc.write(data)

    def write_frame(self, body: bytes) -> None:
        self.write(encode_frame(body))

    def close_stdin(self) -> None:
        """EOF on the child's stdin: every child of ours exits on it."""
        self._stdin = None
        if self._proc is not None and not self.dead:
            self._proc.closeStdin()

    def kill(self) -> None:
        """SIGKILL; nothing more is read from it."""
        self.killed = True
        if self._proc is not None and not self.dead:
            try:
                self._proc.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    # --- from the child -----------------------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._stderr(data)
            return
        if childFD != 1 or self.killed:
            return
        try:
            for body in self.reader.feed(data):
                self.on_frame(body)
                if self.killed or self.dead:
                    return
        except FrameError as err:
            self.garbage = err
            if self.log_stderr:
                log.error("{name} sent garbage ({err}); killing it", name=self.name, err=err)
            self.kill()

    def _stderr(self, data: bytes) -> None:
        self._err += data
        while b"\n" in self._err:
            line, _, rest = bytes(self._err).partition(b"\n")
            self._err = bytearray(rest)
            self._keep(line + b"\n")
            if self.log_stderr and line.strip():
                log.warn("{name}: {line}", name=self.name, line=line.decode(errors="replace"))
        if len(self._err) > _STDERR_KEEP:
            del self._err[:-_STDERR_KEEP]

    def _keep(self, data: bytes) -> None:
        self.stderr_tail = (self.stderr_tail + data)[-_STDERR_KEEP:]

    def processEnded(self, reason: Failure) -> None:
        if self._err:
            self._keep(bytes(self._err))
            if self.log_stderr and self._err.strip():
                log.warn("{name}: {line}", name=self.name,
                         line=self._err.decode(errors="replace"))  # fmt: skip
            self._err = bytearray()
        self.dead = True
        self._stdin = None
        self.on_end(reason)
        self.ended.callback(None)

    def last_stderr_line(self) -> str:
        lines = self.stderr_tail.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""


def stop_children(reactor: Any, children: Iterable[Child], grace: float) -> Deferred[None]:
    """Close every child's stdin (each exits once done), SIGKILL any still there after
    ``grace`` seconds; fires when all have ended."""
    children = [c for c in children if not c.dead]
    for child in children:
        child.close_stdin()
    if not children:
        return defer.succeed(None)

    def kill_all() -> None:
        for child in children:
            child.kill()

    killer = reactor.callLater(grace, kill_all)

    def done(_: object) -> None:
        if killer.active():
            killer.cancel()

    d = defer.DeferredList([c.ended for c in children], consumeErrors=True)
    return d.addCallback(done)


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``first`` after a child that had run stably, then ``initial``
    growing by ``factor`` per further failure, never above ``cap``."""

    first: float
    initial: float
    cap: float
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """The pause before the next start after ``failures`` ends in a row (>= 1)."""
        if failures <= 1:
            return min(self.first, self.cap)
        return float(min(self.cap, self.initial * self.factor ** (failures - 2)))


class Supervisor:
    """Keeps children numbered 1..``count`` running.

    The owner builds and spawns a child in ``spawn(number)`` (raising if it
    cannot start), then reports :meth:`ready` (the child is doing its job: logged
    in, listening) and :meth:`ended` (whatever it was). The supervisor decides
    when to call ``spawn`` again: at once or after a back-off pause, one start
    at a time if ``serial``, never while :meth:`hold` is in force or before
    :meth:`run`. A child that ran for ``stable_after`` seconds resets the count
    of failures, as ProcessMonitor's ``threshold`` does; with ``stable_after`` 0,
    a child that got ready does (a worker that logged in).
    """

    def __init__(
        self,
        reactor: Any,
        spawn: Callable[[int], None],
        *,
        count: int,
        backoff: Backoff,
        stable_after: float = 0.0,
        serial: bool = False,
    ) -> None:
        self._reactor = reactor
        self._spawn = spawn
        self.count = count
        self.backoff = backoff
        self.stable_after = stable_after
        self.serial = serial
        self.running = False
        self.held: str | None = None
        self.failures = 0  # ends in a row without a stable run
        self._states: dict[int, str] = {}  # number -> "starting" | "ready"
        self._started_at: dict[int, float] = {}
        self._timer: IDelayedCall | None = None

    # --- queries -----------------------------------------------------------------------

    def starting(self) -> bool:
        return "starting" in self._states.values()

    def ready_count(self) -> int:
        return sum(1 for state in self._states.values() if state == "ready")

    def waiting(self) -> bool:
        """A restart is scheduled (back-off pause)."""
        return self._timer is not None and self._timer.active()

    # --- the owner's reports -------------------------------------------------------------

    def start_one(self, number: int) -> None:
        """Spawn child ``number`` now, running or not (a serial start-up drives this)."""
        self._states[number] = "starting"
        self._started_at[number] = self._reactor.seconds()
        try:
            self._spawn(number)
        except Exception:
            self._states.pop(number, None)
            raise

    def ready(self, number: int) -> None:
        self._states[number] = "ready"
        if self.stable_after <= 0:
            self.failures = 0
        self._fill()

    def ended(self, number: int) -> None:
        self._states.pop(number, None)
        started_at = self._started_at.pop(number, None)
        if self.stable_after > 0 and started_at is not None:
            if self._reactor.seconds() - started_at >= self.stable_after:
                self.failures = 0
        self.failures += 1
        if not self.running or self.held is not None:
            return
        delay = self.backoff.delay(self.failures)
        if delay <= 0:
            # At once, so there is no instant with nobody starting (callers would
            # see "nobody up" and fail fast).
            self._fill()
        elif not self.waiting():
            self._timer = self._reactor.callLater(delay, self._after_pause)

    # --- control -----------------------------------------------------------------------

    def run(self) -> None:
        """Start keeping ``count`` children up (after the owner's own start-up)."""
        self.running = True
        self._fill()

    def hold(self, reason: str) -> None:
        """No more starts until :meth:`release` (e.g. the token refused the PIN)."""
        self.held = reason
        self._cancel_timer()

    def release(self) -> None:
        self.held = None
        self.failures = 0
        self._fill()

    def stop(self) -> None:
        self.running = False
        self._cancel_timer()

    # --- internals ---------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _after_pause(self) -> None:
        self._timer = None
        self._fill()

    def _fill(self) -> None:
        if not self.running or self.held is not None or self.waiting():
            return
        for number in range(1, self.count + 1):
            if self.serial and self.starting():
                return
            if number in self._states:
                continue
            try:
                self.start_one(number)
            except Exception as err:  # e.g. fork failed: out of processes or memory
                log.error("cannot start child {n}: {err}", n=number, err=err)
                self.ended(number)
                return
