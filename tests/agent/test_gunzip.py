"""agent.gunzip.GunzipReader: the same content and the same refusals as gzip.GzipFile."""

from __future__ import annotations

import gzip
import io
import os
import zlib

import pytest

from agent.gunzip import GunzipReader

DATA = os.urandom(300_000) + b"a" * 3_000_000


def read_all(blob: bytes, size: int = 10240) -> bytes:
    r = GunzipReader(io.BytesIO(blob))
    out = []
    while chunk := r.read(size):
        assert len(chunk) <= size
        out.append(chunk)
    return b"".join(out)


@pytest.mark.parametrize("size", [1, 512, 10240, 1 << 20])
def test_round_trip_in_bounded_reads(size: int) -> None:
    data = DATA if size > 1 else DATA[:5000]
    assert read_all(gzip.compress(data), size) == data


def test_read_is_whole_and_read1_may_be_short() -> None:
    blob = gzip.compress(DATA)
    r = GunzipReader(io.BytesIO(blob))
    sizes = []
    while chunk := r.read(100_000):
        sizes.append(len(chunk))
    whole, rest = divmod(len(DATA), 100_000)
    assert sizes == [100_000] * whole + ([rest] if rest else [])
    r = GunzipReader(io.BytesIO(blob))
    pieces = []
    while chunk := r.read1(1 << 20):
        pieces.append(chunk)
    assert b"".join(pieces) == DATA and min(len(p) for p in pieces[:-1]) < 1 << 20


def test_read_everything_and_empty_input() -> None:
    assert GunzipReader(io.BytesIO(gzip.compress(DATA))).read() == DATA
    assert GunzipReader(io.BytesIO(b"")).read(100) == b""


def test_multi_member_and_zero_padding() -> None:
    blob = gzip.compress(b"one ") + b"\0" * 1000 + gzip.compress(b"two") + b"\0" * 10
    assert read_all(blob) == b"one two"
    assert gzip.decompress(blob) == b"one two"  # what gzip itself accepts


def test_trailing_garbage_is_an_error() -> None:
    with pytest.raises(zlib.error):
        read_all(gzip.compress(b"data") + b"junk")


def test_truncated_stream_is_an_error() -> None:
    blob = gzip.compress(DATA)
    for cut in (len(blob) - 4, len(blob) // 2, 5):
        with pytest.raises((EOFError, zlib.error)):
            read_all(blob[:cut])


def test_crc_and_length_are_checked() -> None:
    blob = bytearray(gzip.compress(b"x" * 1000))
    blob[-8] ^= 0xFF  # CRC-32 in the trailer
    with pytest.raises(zlib.error):
        read_all(bytes(blob))
    blob = bytearray(gzip.compress(b"x" * 1000))
    blob[-1] ^= 0x01  # ISIZE
    with pytest.raises(zlib.error):
        read_all(bytes(blob))


def test_not_gzip_is_an_error() -> None:
    with pytest.raises(zlib.error):
        read_all(b"plain tar, not gzip" * 10)
