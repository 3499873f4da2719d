"""ReadAhead (agent/readahead.py): the consumer gets exactly the source's bytes in reads of the
size it asks for, an error after the bytes that came before it, and the reader never runs
more than its limit ahead."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest

from agent.readahead import ReadAhead


class Source:
    """A source of ``data`` in chunks of ``step``, optionally failing after ``fail_after`` bytes."""

    def __init__(self, data: bytes, step: int = 1000, fail_after: int | None = None) -> None:
        self.f = io.BytesIO(data)
        self.step = step
        self.fail_after = fail_after
        self.reads = 0
        self.lock = threading.Lock()

    def read(self, n: int) -> bytes:
        with self.lock:
            self.reads += 1
            if self.fail_after is not None and self.f.tell() >= self.fail_after:
                raise ConnectionResetError("connection lost")
            return self.f.read(min(n, self.step))

    @property
    def position(self) -> int:
        with self.lock:
            return self.f.tell()


def test_the_consumer_gets_every_byte_in_reads_of_the_size_it_asks() -> None:
    data = os.urandom(300_000)
    with ReadAhead(Source(data, step=7777), chunk=5000, limit=20_000) as ra:
        got = []
        while chunk := ra.read(4096):
            got.append(chunk)
    assert b"".join(got) == data
    assert all(len(c) == 4096 for c in got[:-1]) and 0 < len(got[-1]) <= 4096
    with ReadAhead(Source(data)) as ra:
        assert ra.read() == data and ra.read(10) == b""


def test_an_error_comes_after_the_bytes_before_it() -> None:
    data = os.urandom(50_000)
    with ReadAhead(Source(data, fail_after=30_000), chunk=10_000) as ra:
        got = b""
        with pytest.raises(ConnectionResetError, match="connection lost"):
            while True:
                chunk = ra.read(4096)
                assert chunk, "the end must not come before the error"
                got += chunk
    assert got == data[:30_000]


def test_the_reader_stays_within_its_limit_and_stops_on_close() -> None:
    data = os.urandom(1_000_000)
    src = Source(data, step=10_000)
    ra = ReadAhead(src, chunk=10_000, limit=50_000)
    time.sleep(0.3)
    assert 50_000 <= src.position <= 60_000  # ahead by the limit (plus the read under way), no more
    assert ra.read(25_000) == data[:25_000]
    time.sleep(0.3)
    assert src.position <= 25_000 + 60_000
    ra.close()
    reads = src.reads
    time.sleep(0.3)
    assert src.reads <= reads + 1 and ra.read(10) == b""
