"""Parsing index.txt in a child process: the frame format and the real child.

The format tests run in-process (``encode`` into a buffer, ``decode`` back);
the reader tests spawn the real ``python -m hsmocsp.sources.indexproc`` on the
real reactor, including the ways a child can fail (bad file, crash, hang,
cancellation).
"""

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThread

from hsmocsp.errors import SourceError
from hsmocsp.sources import indexproc
from hsmocsp.sources.index import IndexData
from hsmocsp.sources.indexproc import ProcessIndexReader, decode, encode, read_index
from hsmocsp.status import Status

ROWS = (
    "V\t301231235959Z\t\t01\tunknown\t/CN=a\n"
    "E\t200101000000Z\t\t02\tunknown\t/CN=b\n"
    "R\t301231235959Z\t240506070809Z,superseded\t03\tunknown\t/CN=c\n"
    "R\t301231235959Z\t240506070809Z,holdInstruction,holdInstructionReject\t04\tu\t/CN=d\n"
    "R\t301231235959Z\t240506070809Z,removeFromCRL\t05\tunknown\t/CN=e\n"
    "V\t301231235959Z\t\t-07\tunknown\t/CN=negative\n"
)


def _same(a: IndexData, b: IndexData) -> None:
    assert a.good == b.good
    assert a.good.parts() == b.good.parts()
    assert a.revoked == b.revoked
    assert a.hold_instructions == b.hold_instructions
    assert a.lines == b.lines


def _encoded(path: Path) -> bytes:
    buf = io.BytesIO()
    encode(buf, path)
    return buf.getvalue()


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "index.txt"
    # Enough revoked rows for several R frames.
    extra = "".join(
        f"R\t301231235959Z\t240506070809Z,keyCompromise\t{0x1000 + i:X}\tu\t/CN=r{i}\n"
        for i in range(5000)
    )
    path.write_text(ROWS + extra)
    direct, sig = read_index(path)
    output = _encoded(path)
    assert output.count(b"R") >= 3
    back, back_sig = decode(output)
    _same(back, direct)
    assert back_sig == sig
    assert back.status(4).status is Status.revoked
    assert back.hold_instructions == {4: "1.2.840.10040.2.3"}
    assert -7 in back.good and 5 in back.good


def test_frame_layout(tmp_path: Path) -> None:
    path = tmp_path / "index.txt"
    path.write_text("V\t301231235959Z\t\t0A\tunknown\t/CN=a\n")
    output = _encoded(path)
    kinds = []
    pos = 0
    while pos < len(output):
        # the child-process layer's framing: a length, then a body of type + payload
        length, kind = struct.unpack_from(">IB", output, pos)
        kinds.append(chr(kind))
        if kind == ord("G"):
            # one serial, 8 bytes wide (the minimum width), big-endian
            assert output[pos + 5 : pos + 4 + length] == (10).to_bytes(8, "big")
        pos += 4 + length
    assert kinds == ["H", "G", "D"]


def test_error_frame_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "index.txt"
    path.write_text(ROWS + "X\t301231235959Z\t\t09\tunknown\t/CN=x\n")
    with pytest.raises(SourceError, match=r"index.txt:7: bad status 'X'"):
        decode(_encoded(path))


@pytest.mark.parametrize(
    "output, problem",
    [
        (b"", "without an end frame"),
        (struct.pack(">IB", 11, ord("G")) + b"abc", "inside a frame"),
        (struct.pack(">IB", 1, ord("D")), "no header"),
        (struct.pack(">IB", 1, ord("Z")), "unknown frame type"),
        (struct.pack(">IB", 3, ord("H")) + b"{}" + struct.pack(">IB", 1, ord("D")), "bad header"),
        (struct.pack(">I", 0), "empty frame"),
        (struct.pack(">I", 0xFFFFFFFF), "exceeds"),
    ],
)
def test_malformed_output(output: bytes, problem: str) -> None:
    with pytest.raises(indexproc._ProtocolError, match=problem):
        decode(output)


# --- the real child on the real reactor --------------------------------------------------


def _reader(**kwargs: Any) -> ProcessIndexReader:
    from twisted.internet import reactor

    def run(f: Any) -> Deferred[Any]:
        return deferToThread(f)

    return ProcessIndexReader(reactor, run, **kwargs)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_child_parses(tmp_path: Path) -> None:
    path = tmp_path / "index.txt"
    path.write_text(ROWS)
    data, sig = await _reader()(path)
    direct, direct_sig = read_index(path)
    _same(data, direct)
    assert sig == direct_sig


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_child_parses_crlf_with_blank_line(tmp_path: Path) -> None:
    """The child parser reads CRLF files like the in-process one: ``\\r\\n`` is blank."""
    path = tmp_path / "index.txt"
    path.write_bytes(ROWS.replace("\n", "\r\n").encode() + b"\r\n")
    data, _ = await _reader()(path)
    assert data.status(3).status is Status.revoked
    assert data.status(1).status is Status.good
    _same(data, read_index(path)[0])


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_child_reports_bad_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "index.txt"
    path.write_text("V\t301231235959Z\t\t01\tunknown\t/CN=a")  # no final newline
    with pytest.raises(SourceError, match=r"index.txt:1: last line has no newline"):
        await _reader()(path)
    with pytest.raises(SourceError, match=r"missing.txt: cannot read: No such file"):
        await _reader()(tmp_path / "missing.txt")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_child_crash_is_a_source_error(tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "import sys; sys.stderr.write('out of cheese\\n'); sys.exit(3)"]
    with pytest.raises(SourceError, match=r"index parser failed .*code 3.* out of cheese"):
        await _reader(argv=crash)(tmp_path / "index.txt")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_child_garbage_output_is_a_source_error(tmp_path: Path) -> None:
    garbage = [sys.executable, "-c", "print('hello')"]
    with pytest.raises(SourceError, match=r"index parser output unreadable"):
        await _reader(argv=garbage)(tmp_path / "index.txt")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_hung_child_is_killed_after_timeout(tmp_path: Path) -> None:
    fifo = tmp_path / "index.txt"
    os.mkfifo(fifo)  # open() blocks: no writer ever comes
    with pytest.raises(SourceError, match=r"index parser took longer than 0.5 s; killed"):
        await _reader(timeout=0.5)(fifo)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_cancel_kills_the_child(tmp_path: Path) -> None:
    fifo = tmp_path / "index.txt"
    os.mkfifo(fifo)
    reading = _reader(timeout=60)(fifo)
    reading.cancel()
    with pytest.raises(CancelledError):
        await reading


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_child_gets_none_of_our_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSM_PIN", "1234")
    tell = [
        sys.executable, "-c",
        "import os, sys; sys.stderr.write('pin=' + os.environ.get('HSM_PIN', 'absent'));"
        " sys.exit(3)",
    ]  # fmt: skip
    with pytest.raises(SourceError, match=r"pin=absent"):
        await _reader(argv=tell)(tmp_path / "index.txt")
