"""The diff_id's sha256 on a thread of its own (agent/store.py ``_HashBehind``): the digest is
of exactly the bytes read, the hashing stays within its limit behind the reads, the byte limit
still holds, and the thread ends on ``close`` as on ``digest``."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from agent.layers import LayerError
from agent.store import _HashBehind


def _hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hash-behind"]


def _wait_for_no_hash_thread() -> None:
    deadline = time.monotonic() + 5
    while _hash_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _hash_threads()


def test_the_digest_is_of_exactly_the_bytes_read() -> None:
    data = os.urandom(500_000)
    r = _HashBehind(io.BytesIO(data), what="layer x", behind=2)  # reads wait for the hash
    got = b""
    while chunk := r.read(7777):
        got += chunk
    assert got == data and r.n == len(data)
    assert r.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert r.digest == "sha256:" + hashlib.sha256(data).hexdigest()  # asked again: the same
    _wait_for_no_hash_thread()


def test_drain_hashes_the_rest_too() -> None:
    data = os.urandom(100_000)
    r = _HashBehind(io.BytesIO(data), what="layer x")
    assert r.read(10) == data[:10]
    r.drain()
    assert r.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_the_byte_limit_holds_and_close_ends_the_thread() -> None:
    r = _HashBehind(io.BytesIO(b"x" * 5000), limit=4096, what="layer x")
    with pytest.raises(LayerError, match="layer x exceeds the limit of 4096 bytes"):
        r.read(5000)
    r.close()
    r.close()  # twice is harmless
    _wait_for_no_hash_thread()


class _SlowHash:
    """A hasher that takes its time, to see how far the reads run ahead of it."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen = 0

    def update(self, data: bytes) -> None:
        time.sleep(0.01)
        self.h.update(data)
        self.seen += len(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def test_the_reads_wait_when_the_hash_falls_behind_its_limit() -> None:
    data = os.urandom(200_000)
    r = _HashBehind(io.BytesIO(data), what="layer x", behind=3)
    r.h = _SlowHash()  # type: ignore[assignment]
    read = 0
    while chunk := r.read(10_000):
        read += len(chunk)
        hashed = len(data) if r._done.is_set() else r.h.seen
        assert read - hashed <= 10_000 * (3 + 2)  # queued, being hashed, just read
    assert r.digest == "sha256:" + hashlib.sha256(data).hexdigest()


class _BrokenHash(_SlowHash):
    def update(self, data: bytes) -> None:
        raise MemoryError("no room")


def test_a_hash_that_breaks_cannot_hang_the_reads_or_the_digest() -> None:
    data = os.urandom(100_000)
    r = _HashBehind(io.BytesIO(data), what="layer x", behind=2)
    r.h = _BrokenHash()  # type: ignore[assignment]
    got = b""
    while chunk := r.read(5_000):  # none waits on a thread that is gone
        got += chunk
    assert got == data
    assert r.digest != "sha256:" + hashlib.sha256(data).hexdigest()
    _wait_for_no_hash_thread()
