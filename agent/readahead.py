"""Reading a download ahead of its consumer.

A layer is unpacked while it downloads (store.ingest_layer): gunzip, two sha256s, the tar
and the file writes take ~0.8 s of guest CPU for a 4 MB layer under TCG, and the download
itself ~0.5 s. Read by one thread, the two took turns (the socket buffer fills while the
unpacker works, and the sender waits). ReadAhead reads the source on a thread of its own, up
to ``limit`` bytes ahead, so the download goes on while the consumer works: the socket reads
and, under TCG, zlib and hashlib release the interpreter lock, so the two use both vCPUs.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, BinaryIO

from agent import workers

CHUNK = 256 * 1024
LIMIT = 8 * 1024 * 1024


class ReadAhead:
    """``read(n)`` returns n bytes (fewer only at the end), as the source would; whatever the
    source raises is raised to the consumer after the bytes that came before it. Use it as a
    context manager: leaving it stops the reading (the source is the caller's to close)."""

    def __init__(self, src: BinaryIO | Any, chunk: int = CHUNK, limit: int = LIMIT, name: str = "read-ahead") -> None:
        self._src = src
        self._chunk = chunk
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # how much of the first chunk has been read
        self._buffered = 0
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        workers.spawn(self._fill, name=name)  # a waiting worker: no thread start

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._buffered >= self._limit and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                data = self._src.read(self._chunk)
                with self._cond:
                    if not data:
                        self._ended = True
                        return
                    self._chunks.append(data)
                    self._buffered += len(data)
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the consumer, after the bytes before it
            with self._cond:
                self._error = exc
                self._ended = True
        finally:
            with self._cond:
                self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(self._chunk), b""))
        out: list[bytes] = []
        want = size
        with self._cond:
            while want > 0:
                while not self._chunks and not self._ended and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    if out or self._closed:
                        break
                    if self._error is not None:
                        raise self._error
                    break
                head = self._chunks[0]
                take = min(want, len(head) - self._offset)
                out.append(head[self._offset:self._offset + take] if take < len(head) else head)
                self._offset += take
                if self._offset == len(head):
                    self._chunks.popleft()
                    self._offset = 0
                want -= take
                self._buffered -= take
            self._cond.notify_all()
        return b"".join(out)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify_all()
