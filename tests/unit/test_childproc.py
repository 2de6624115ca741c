"""The child-process layer: framing, back-off and the supervisor (fakes; the real
children are exercised by the signing, index and front tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from hsmocsp.childproc import Backoff, FrameError, FrameReader, Supervisor, encode_frame


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_frames_survive_any_split(bodies: list[bytes], step: int) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    reader = FrameReader(1000)
    got = []
    for i in range(0, len(stream), step):
        got += reader.feed(stream[i : i + step])
    assert got == bodies
    assert reader.pending == 0


def test_large_frame_in_small_reads_is_joined_once() -> None:
    body = bytes(range(256)) * 4000  # ~1 MB
    stream = encode_frame(body) + encode_frame(b"next")
    reader = FrameReader(2 << 20)
    got = []
    for i in range(0, len(stream), 65536):
        got += reader.feed(stream[i : i + 65536])
        if not got:
            assert reader.pending == min(i + 65536, len(stream))
    assert got == [body, b"next"]


def test_oversized_length_is_an_error_before_buffering() -> None:
    reader = FrameReader(100)
    with pytest.raises(FrameError, match="exceeds 100"):
        reader.feed(b"\x00\x00\x01\x00")


def test_backoff_sequence() -> None:
    pool = Backoff(first=0.0, initial=0.1, cap=4.0)
    assert [pool.delay(n) for n in range(1, 9)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 4.0]
    fronts = Backoff(first=1.0, initial=2.0, cap=30.0)
    assert [fronts.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


class Owner:
    def __init__(self) -> None:
        self.spawned: list[int] = []
        self.fail = False

    def spawn(self, number: int) -> None:
        if self.fail:
            raise OSError("fork failed")
        self.spawned.append(number)


def test_serial_supervisor_restarts_with_backoff_and_holds() -> None:
    clock = Clock()
    owner = Owner()
    sup = Supervisor(clock, owner.spawn, count=2, backoff=Backoff(0.0, 0.1, 0.4), serial=True)
    sup.run()
    assert owner.spawned == [1]  # one at a time
    sup.ready(1)
    assert owner.spawned == [1, 2]
    sup.ready(2)
    sup.ended(1)  # a ready one died: at once
    assert owner.spawned == [1, 2, 1]
    sup.ended(1)  # its replacement failed: after 0.1 s
    assert owner.spawned == [1, 2, 1]
    clock.advance(0.1)
    assert owner.spawned == [1, 2, 1, 1]
    sup.ended(1)
    clock.advance(0.19)
    assert owner.spawned == [1, 2, 1, 1]
    clock.advance(0.01)
    assert owner.spawned == [1, 2, 1, 1, 1]
    sup.hold("PIN refused")
    sup.ended(1)
    clock.advance(10)
    assert owner.spawned == [1, 2, 1, 1, 1]  # held: no more tries
    sup.release()
    assert owner.spawned == [1, 2, 1, 1, 1, 1]


def test_stable_after_resets_only_a_long_run() -> None:
    clock = Clock()
    owner = Owner()
    sup = Supervisor(clock, owner.spawn, count=1, backoff=Backoff(1.0, 2.0, 30.0),
                     stable_after=10.0)  # fmt: skip
    sup.run()
    clock.advance(1)
    sup.ended(1)  # ran 1 s: counts as a failure in a row
    clock.advance(1.0)
    assert owner.spawned == [1, 1]
    sup.ready(1)  # ready does not matter here: how long it ran does
    clock.advance(2)
    sup.ended(1)
    clock.advance(1.99)
    assert owner.spawned == [1, 1]
    clock.advance(0.01)
    assert owner.spawned == [1, 1, 1]
    clock.advance(11)
    sup.ended(1)  # ran stably: the short delay again
    clock.advance(1.0)
    assert owner.spawned == [1, 1, 1, 1]


def test_spawn_that_raises_is_retried_after_a_pause() -> None:
    clock = Clock()
    owner = Owner()
    owner.fail = True
    sup = Supervisor(clock, owner.spawn, count=1, backoff=Backoff(0.0, 0.5, 1.0), serial=True)
    sup.run()
    assert owner.spawned == [] and sup.waiting()
    owner.fail = False
    clock.advance(0.5)
    assert owner.spawned == [1]
    sup.stop()
