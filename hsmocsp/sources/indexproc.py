"""Parse ``index.txt`` in a child process, so a reload never pauses serving.

Parsing a million-line index in a thread of the responder's own process
stalled the reactor for 190-380 ms at a time (measured with
``bench/index_load.py --reactor``): the parse holds the GIL in long C calls
(sorting, freeing a million ints, cyclic GC passes over what it allocated).
A child process has its own GIL and its own peak memory; only the result
crosses back: the good serials as the one ``bytes`` array of
:class:`~hsmocsp.sources.index.SerialSet` (about 20 MB for a million) and
the revoked rows in small pickled chunks, which the parent decodes in a
thread one chunk at a time so that no single call holds the GIL for long.

Run as ``python -m hsmocsp.sources.indexproc PATH``; it writes frames to
stdout: a 4-byte big-endian length, a 1-byte type, the payload.

* ``H`` header (JSON): file signature, serial width, line count, negative serials;
* ``G`` the good-serial array (raw bytes);
* ``R`` a pickled list of ``(serial, CertStatus)`` pairs (revoked rows);
* ``O`` a pickled dict of hold instructions;
* ``E`` an error message (UTF-8): the file could not be read or parsed;
* ``D`` end of output.

Exit status 0 whenever the protocol completed (``E`` included); anything
else is a crash that the parent reports with the child's last stderr line.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from hsmocsp.childenv import minimal_env
from hsmocsp.errors import SourceError
from hsmocsp.sources.index import IndexData, SerialSet, parse_index_file
from hsmocsp.status import CertStatus

__all__ = ["IndexSig", "ProcessIndexReader", "decode", "read_index"]

_T = TypeVar("_T")

# (st_mtime_ns, st_size, st_ino): what tells us a file changed.
IndexSig = tuple[int, int, int]

_FRAME = struct.Struct(">IB")
_CHUNK = 2048  # revoked rows per R frame: ~2 ms to unpickle
_STDERR_KEEP = 4096


def read_index(path: Path) -> tuple[IndexData, IndexSig]:
    """Parse ``path`` streaming; the signature is taken from the open file.

    Raises :class:`SourceError` naming the file (and line) on any problem.
    """
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            return parse_index_file(f, str(path)), sig
    except OSError as err:
        raise SourceError(f"{path}: cannot read: {err.strerror or err}") from err


# --- child side -------------------------------------------------------------------------


def _write_frame(out: IO[bytes], kind: bytes, payload: bytes) -> None:
    out.write(_FRAME.pack(len(payload), kind[0]))
    out.write(payload)


def encode(out: IO[bytes], path: Path) -> None:
    """Parse ``path`` and write the frames described in the module docstring."""
    try:
        data, sig = read_index(path)
    except SourceError as err:
        _write_frame(out, b"E", str(err).encode("utf-8", "replace"))
        _write_frame(out, b"D", b"")
        return
    blob, width, negative = data.good.parts()
    header = {
        "sig": list(sig),
        "width": width,
        "lines": data.lines,
        "negative": sorted(negative),
    }
    _write_frame(out, b"H", json.dumps(header).encode())
    _write_frame(out, b"G", blob)
    items = list(data.revoked.items())
    for start in range(0, len(items), _CHUNK):
        _write_frame(out, b"R", pickle.dumps(items[start : start + _CHUNK], protocol=5))
    if data.hold_instructions:
        _write_frame(out, b"O", pickle.dumps(data.hold_instructions, protocol=5))
    _write_frame(out, b"D", b"")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hsmocsp.sources.indexproc PATH", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    encode(out, Path(args[0]))
    out.flush()
    return 0


# --- parent side ------------------------------------------------------------------------


class _ProtocolError(Exception):
    """The child's output does not follow the frame format."""


def decode(output: bytes) -> tuple[IndexData, IndexSig]:
    """Rebuild what :func:`encode` wrote; runs in a thread of the parent.

    Each frame is decoded by its own short call (a ``bytes`` copy or a
    ``pickle.loads`` of one chunk), so the GIL is never held for long.
    Raises :class:`SourceError` for an ``E`` frame, ``_ProtocolError`` for
    anything malformed.
    """
    view = memoryview(output)
    pos = 0
    header: dict[str, Any] | None = None
    blob = b""
    revoked: dict[int, CertStatus] = {}
    holds: dict[int, str] = {}
    while True:
        if pos + _FRAME.size > len(view):
            raise _ProtocolError("output ended without an end frame")
        length, kind = _FRAME.unpack_from(view, pos)
        pos += _FRAME.size
        payload = view[pos : pos + length]
        if len(payload) != length:
            raise _ProtocolError("output ended inside a frame")
        pos += length
        if kind == ord("D"):
            break
        if kind == ord("E"):
            raise SourceError(bytes(payload).decode("utf-8", "replace"))
        if kind == ord("H"):
            header = json.loads(bytes(payload))
        elif kind == ord("G"):
            blob = bytes(payload)
        elif kind == ord("R"):
            revoked.update(pickle.loads(payload))
        elif kind == ord("O"):
            holds = pickle.loads(payload)
        else:
            raise _ProtocolError(f"unknown frame type {kind}")
    if header is None:
        raise _ProtocolError("no header frame")
    try:
        good = SerialSet(blob, header["width"], frozenset(header["negative"]))
        sig = tuple(header["sig"])
        if len(sig) != 3:
            raise _ProtocolError("bad file signature in header")
        return IndexData(good, revoked, holds, header["lines"]), (sig[0], sig[1], sig[2])
    except (KeyError, TypeError, ValueError) as err:
        raise _ProtocolError(f"bad header: {err}") from err


ThreadRunner = Callable[[Callable[[], _T]], Deferred[_T]]


class _ChildProtocol(ProcessProtocol):
    def __init__(self, done: Deferred[tuple[bytes, bytes, Failure]]) -> None:
        self._done = done
        self._out: list[bytes] = []
        self._err = bytearray()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._out.append(data)
        elif childFD == 2:
            self._err += data
            del self._err[:-_STDERR_KEEP]

    def processEnded(self, reason: Failure) -> None:
        if not self._done.called:
            self._done.callback((b"".join(self._out), bytes(self._err), reason))


class ProcessIndexReader:
    """Reads an index file by parsing it in a short-lived child process.

    Call it with a path; the Deferred fires with ``(IndexData, signature)``
    or fails with :class:`SourceError` (unreadable or invalid file, a child
    that crashed, or one that ran longer than ``timeout`` seconds and was
    killed). Cancelling the Deferred kills the child. ``run_in_thread``
    decodes the child's output off the reactor thread. ``argv`` is the
    command that runs the parser, the path is appended (tests replace it).
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        run_in_thread: ThreadRunner[tuple[IndexData, IndexSig]],
        *,
        timeout: float = 600.0,
        argv: Sequence[str] = (sys.executable, "-m", "hsmocsp.sources.indexproc"),
    ) -> None:
        self._reactor = reactor
        self._run = run_in_thread
        self.timeout = timeout
        self._argv = tuple(argv)

    def __call__(self, path: Path) -> Deferred[tuple[IndexData, IndexSig]]:
        ended: Deferred[tuple[bytes, bytes, Failure]] = Deferred()
        protocol = _ChildProtocol(ended)
        try:
            transport = self._reactor.spawnProcess(
                protocol,
                self._argv[0],
                [*self._argv, str(path)],
                env=minimal_env(),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as err:
            raise_later: Deferred[tuple[IndexData, IndexSig]] = Deferred()
            raise_later.errback(SourceError(f"{path}: cannot start the index parser: {err}"))
            return raise_later
        transport.closeStdin()
        why: list[str] = []

        def kill(reason: str) -> None:
            why.append(reason)
            _kill(transport)

        timer: IDelayedCall = self._reactor.callLater(  # type: ignore[attr-defined]
            self.timeout, kill, f"took longer than {self.timeout:g} s; killed"
        )

        def cancel(_: Deferred[tuple[IndexData, IndexSig]]) -> None:
            kill("cancelled")

        result: Deferred[tuple[IndexData, IndexSig]] = Deferred(cancel)

        def finished(outcome: tuple[bytes, bytes, Failure]) -> None:
            if timer.active():
                timer.cancel()
            output, stderr, reason = outcome
            if why:
                if not result.called:
                    result.errback(SourceError(f"{path}: index parser {why[0]}"))
                return
            if not isinstance(reason.value, ProcessDone):
                last = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
                problem = f"{path}: index parser failed ({reason.value}) {last[0]}".rstrip()
                result.errback(SourceError(problem))
                return
            self._run(lambda: decode(output)).addCallbacks(
                result.callback, lambda f: result.errback(_as_source_error(f, path))
            )

        ended.addCallback(finished)
        return result


def _kill(transport: IProcessTransport) -> None:
    try:
        transport.signalProcess("KILL")
    except ProcessExitedAlready:
        pass


def _as_source_error(failure: Failure, path: Path) -> Failure | SourceError:
    if isinstance(failure.value, _ProtocolError):
        return SourceError(f"{path}: index parser output unreadable: {failure.value}")
    return failure


if __name__ == "__main__":
    raise SystemExit(main())
