"""Decompress a gzip stream in large reads, for layer unpacking.

``gzip.GzipFile`` reads its input 8 KiB at a time and goes through several Python layers per
read; under TCG emulation those calls cost more than the inflating. This reader takes 1 MiB of
input at a time and lets zlib parse the gzip framing, so zlib itself checks every member's
header, CRC-32 and length. Multi-member streams and zero padding after a member are accepted,
as ``gzip`` does; anything else after a member is an error (zlib.error), and input that ends
inside a member raises EOFError.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO

_READ = 1 << 20   # input read from ``raw`` at a time
_FEED = 1 << 16   # input given to zlib at a time: zlib copies what it leaves unconsumed
_OUT = 1 << 20    # output made at a time (bounds memory on a "zip bomb")
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class GunzipReader:
    """A read-only file object over the decompressed content of ``raw``."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self._d = zlib.decompressobj(_GZIP_WBITS)
        self._in = memoryview(b"")  # input read but not yet given to zlib
        self._out = b""             # output not yet returned, from offset ``_pos``
        self._pos = 0
        self._started = False       # a member's first bytes were seen
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes, fewer only at the end, as a buffered file reads (``tarfile``'s copy
        takes a short read for the end of the data)."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read1(_READ), b""))
        first = self.read1(size)
        if len(first) == size or not first:
            return first
        parts, got = [first], len(first)
        while got < size and (more := self.read1(size - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes: fewer where what zlib made last runs out, so nothing is
        copied to make up a full read; empty only at the end."""
        if size is None or size < 0:
            size = _OUT
        while self._pos >= len(self._out):
            if self._eof or not size:
                return b""
            self._refill()
        out = self._out[self._pos:self._pos + size]
        self._pos += len(out)
        return out

    def _refill(self) -> None:
        if self._d.eof:
            self._next_member()
            return
        data = self._d.unconsumed_tail
        if not data:
            if not self._in:
                chunk = self.raw.read(_READ)
                if not chunk:
                    if self._started:
                        raise EOFError("compressed file ended before the end-of-stream marker was reached")
                    self._eof = True  # empty input: an empty stream, as gzip reads it
                    return
                self._in = memoryview(chunk)
            data, self._in = self._in[:_FEED], self._in[_FEED:]
        self._started = True
        self._out, self._pos = self._d.decompress(data, _OUT), 0

    def _next_member(self) -> None:
        """After a member's end: skip zero padding, then start the next member or end."""
        rest = (self._d.unused_data + bytes(self._in)).lstrip(b"\0")
        while not rest:
            chunk = self.raw.read(_READ)
            if not chunk:
                self._eof = True
                return
            rest = chunk.lstrip(b"\0")
        self._d = zlib.decompressobj(_GZIP_WBITS)
        self._in = memoryview(rest)
