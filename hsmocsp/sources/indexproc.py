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
stdout in the child-process layer's framing (:mod:`hsmocsp.childproc`: a 4-byte
big-endian length, then the body); a body is a 1-byte type and the payload.

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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess
from twisted.python.failure import Failure

from hsmocsp.childenv import minimal_env
from hsmocsp.childproc import HEADER, Child, FrameError, FrameReader
from hsmocsp.errors import SourceError
from hsmocsp.sources.index import IndexData, SerialSet, parse_index_file
from hsmocsp.status import CertStatus

__all__ = ["IndexSig", "ProcessIndexReader", "decode", "read_index"]

_T = TypeVar("_T")

# (st_mtime_ns, st_size, st_ino): what tells us a file changed.
IndexSig = tuple[int, int, int]

_CHUNK = 2048  # revoked rows per R frame: ~2 ms to unpickle
# The good-serial array of a million serials is ~20 MB; a frame near this bound
# means the stream is corrupt.
MAX_FRAME = 1 << 30


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
    out.write(HEADER.pack(1 + len(payload)) + kind)
    out.write(payload)  # apart: no copy of a 20 MB payload


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


def decode(output: bytes | Sequence[bytes], incomplete: int = 0) -> tuple[IndexData, IndexSig]:
    """Rebuild what :func:`encode` wrote (its whole output, or the frame bodies the
    parent's :class:`~hsmocsp.childproc.Child` collected, with the size of an
    ``incomplete`` frame left over); runs in a thread of the parent.

    Each frame is decoded by its own short call (a ``bytes`` copy or a
    ``pickle.loads`` of one chunk), so the GIL is never held for long.
    Raises :class:`SourceError` for an ``E`` frame, ``_ProtocolError`` for
    anything malformed.
    """
    if isinstance(output, bytes):
        reader = FrameReader(MAX_FRAME)
        try:
            bodies = reader.feed(output)
        except FrameError as err:
            raise _ProtocolError(str(err)) from err
        incomplete = reader.pending
    else:
        bodies = list(output)
    header: dict[str, Any] | None = None
    blob = b""
    revoked: dict[int, CertStatus] = {}
    holds: dict[int, str] = {}
    for body in bodies:
        if not body:
            raise _ProtocolError("empty frame")
        kind = body[0]
        payload = memoryview(body)[1:]
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
    else:
        if incomplete:
            raise _ProtocolError("output ended inside a frame")
        raise _ProtocolError("output ended without an end frame")
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
        bodies: list[bytes] = []
        ended: Deferred[Failure] = Deferred()
        # Not logged by the layer: a failure is reported once, as this SourceError.
        child = Child("index parser", on_frame=bodies.append, on_end=ended.callback,
                      max_frame=MAX_FRAME, log_stderr=False)  # fmt: skip
        try:
            child.spawn(self._reactor, [*self._argv, str(path)], minimal_env())
        except OSError as err:
            raise_later: Deferred[tuple[IndexData, IndexSig]] = Deferred()
            raise_later.errback(SourceError(f"{path}: cannot start the index parser: {err}"))
            return raise_later
        child.close_stdin()
        why: list[str] = []

        def kill(reason: str) -> None:
            why.append(reason)
            child.kill()

        timer: IDelayedCall = self._reactor.callLater(  # type: ignore[attr-defined]
            self.timeout, kill, f"took longer than {self.timeout:g} s; killed"
        )

        def cancel(_: Deferred[tuple[IndexData, IndexSig]]) -> None:
            if timer.active():  # killed now: no deadline left to keep on the reactor
                timer.cancel()
            kill("cancelled")

        result: Deferred[tuple[IndexData, IndexSig]] = Deferred(cancel)

        def finished(reason: Failure) -> None:
            if timer.active():
                timer.cancel()
            if why:
                if not result.called:
                    result.errback(SourceError(f"{path}: index parser {why[0]}"))
                return
            if child.garbage is not None:
                result.errback(
                    SourceError(f"{path}: index parser output unreadable: {child.garbage}")
                )
                return
            if not isinstance(reason.value, ProcessDone):
                problem = f"{path}: index parser failed ({reason.value}) {child.last_stderr_line()}"
                result.errback(SourceError(problem.rstrip()))
                return
            pending = child.reader.pending
            self._run(lambda: decode(bodies, pending)).addCallbacks(
                result.callback, lambda f: result.errback(_as_source_error(f, path))
            )

        ended.addBoth(finished)  # the reason is a Failure: it arrives as an errback
        return result


def _as_source_error(failure: Failure, path: Path) -> Failure | SourceError:
    if isinstance(failure.value, _ProtocolError):
        return SourceError(f"{path}: index parser output unreadable: {failure.value}")
    return failure


if __name__ == "__main__":
    raise SystemExit(main())
