"""The worker's fast copy of PyKCS11 results (``ckbytelist``) into ``bytes``."""

from __future__ import annotations

import os

import PyKCS11
import pytest

from hsmocsp.signing.worker import _swig_vector_reader


def test_fast_reader_is_chosen_here() -> None:
    # On this platform (CPython + libstdc++) the layout check passes; if it ever
    # stops passing, signing still works but this test says where the speed went.
    assert _swig_vector_reader() is not bytes


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(range(256)), os.urandom(4096)])
def test_reads_exactly_what_bytes_reads(data: bytes) -> None:
    read = _swig_vector_reader()
    vector = PyKCS11.ckbytelist(data)
    assert read(vector) == bytes(vector) == data


def test_spare_capacity_is_not_read() -> None:
    read = _swig_vector_reader()
    vector = PyKCS11.ckbytelist(b"abcdef")
    vector.reserve(1024)
    vector.pop_back()
    vector.append(0x7A)
    assert read(vector) == b"abcdez"
