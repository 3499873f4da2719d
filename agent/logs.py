"""Container output: captured to a json-file log (Docker's format), size-capped and rotated,
and fanned out live to attached clients.

One line per record: ``{"log": "...\\n", "stream": "stdout", "time": "2024-...Z"}``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

MAX_SIZE = 10 * 1024 * 1024
MAX_FILES = 3
FOLLOW_WAIT = 0.5  # a follower's longest sleep between looks (a missed wake-up costs this)


def now_rfc3339() -> str:
    t = time.time_ns()
    return dt.datetime.fromtimestamp(t // 1_000_000_000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{t % 1_000_000_000:09d}Z"


def parse_time(value: str) -> float:
    """RFC 3339 (with nanoseconds) -> seconds since the epoch."""
    main, _, frac = value.rstrip("Z").partition(".")
    base = dt.datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


class LogFile:
    """The writer side: one per running container."""

    def __init__(self, path: Path, max_size: int = MAX_SIZE, max_files: int = MAX_FILES) -> None:
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        self._lock = threading.Lock()
        self._f = open(path, "ab")
        self._subscribers: list[queue.Queue[tuple[str, bytes] | None]] = []
        self.changed = threading.Condition()
        self.seq = 0  # bumped (under ``changed``) at every write and at close: followers wait on it

    def subscribe(self) -> queue.Queue[tuple[str, bytes] | None]:
        q: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def write(self, stream: str, data: bytes) -> None:
        """Record raw output (split into lines as Docker does) and pass it to subscribers."""
        with self._lock:
            for sub in self._subscribers:
                sub.put((stream, data))
            for line in data.splitlines(keepends=True):
                rec = json.dumps({"log": line.decode("utf-8", errors="replace"), "stream": stream,
                                  "time": now_rfc3339()}).encode() + b"\n"
                if self._f.tell() + len(rec) > self.max_size:
                    self._rotate()
                self._f.write(rec)
            self._f.flush()
        with self.changed:
            self.seq += 1
            self.changed.notify_all()

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.max_files - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i - 1}" if i > 1 else self.path.name)
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
        self._f = open(self.path, "ab")

    def close(self) -> None:
        with self._lock:
            for sub in self._subscribers:
                sub.put(None)
            self._subscribers.clear()
            self._f.close()
        with self.changed:
            self.seq += 1
            self.changed.notify_all()


class LogReader:
    """A reader of a container's log: ``records`` what is logged so far, then ``follow``
    what is written after it.

    Every file of the log is opened when the reader is made. An API handler makes it before
    it answers: docker-py's `run` sends `wait` and then `rm` as soon as the answer's head of
    `logs -f` is in, and `rm` moves the container's directory away (the open files still read
    what was written).
    """

    def __init__(self, path: Path, max_files: int = MAX_FILES) -> None:
        self.path = path
        self._rotated: list[BinaryIO] = []
        self._f: BinaryIO | None = None
        try:
            for i in range(max_files - 1, 0, -1):  # oldest first
                with contextlib.suppress(FileNotFoundError):
                    self._rotated.append(open(path.with_name(f"{path.name}.{i}"), "rb"))
            with contextlib.suppress(FileNotFoundError):
                self._f = open(path, "rb")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in [*self._rotated, *([self._f] if self._f is not None else [])]:
            f.close()
        self._rotated, self._f = [], None

    def records(self, *, stdout: bool = True, stderr: bool = True, tail: int | None = None,
                since: float = 0.0, until: float = 0.0) -> list[dict]:
        """The records logged so far; ``follow`` goes on just past the last complete one, so
        nothing written meanwhile is sent twice or skipped."""
        wanted = {s for s, on in (("stdout", stdout), ("stderr", stderr)) if on}
        found: list[dict] = []
        for f in self._rotated:
            found.extend(_read(f))
        if self._f is not None:
            found.extend(_read(self._f))
        recs = [r for r in found if r.get("stream") in wanted
                and (not since or parse_time(r["time"]) >= since) and (not until or parse_time(r["time"]) <= until)]
        if tail is not None and tail >= 0:
            recs = recs[-tail:] if tail else []
        return recs

    def follow(self, is_running: Callable[[], bool], source: LogFile | None,
               stdout: bool = True, stderr: bool = True) -> Iterator[dict]:
        """Records written after those ``records`` returned, until the container stops.

        ``source`` is the container's LogFile while it runs: we sleep until its next write
        (or its close, which comes after the exit is recorded), never past one. Without it
        we poll."""
        wanted = {s for s, on in (("stdout", stdout), ("stderr", stderr)) if on}
        buf = b""
        last_look = False
        while True:
            seen = source.seq if source is not None else 0
            chunk = self._f.read(65536) if self._f is not None else b""
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("stream") in wanted:
                        yield rec
                continue
            if self._rotated_away():
                continue
            if not is_running():
                if last_look:
                    return
                last_look = True  # what was written before the exit was recorded is read first
                continue
            if source is not None:
                with source.changed:
                    if source.seq == seen:
                        source.changed.wait(FOLLOW_WAIT)
            else:
                time.sleep(0.2)

    def _rotated_away(self) -> bool:
        """Whether the path now names another file than the one read so far (rotated, or
        made since the reader was), which is then read from here on. A path that is gone is
        not a rotation: the container was removed, and its open file still reads."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            return False
        if self._f is not None and ino == os.fstat(self._f.fileno()).st_ino:
            return False
        new = open(self.path, "rb")
        if self._f is not None:
            self._f.close()
        self._f = new
        return True


def _read(f: BinaryIO) -> Iterator[dict]:
    """The complete records from ``f``'s position on; ``f`` is left just past the last one
    (a record being written right now is the follower's to read whole)."""
    pos = f.tell()
    for line in f:
        if not line.endswith(b"\n"):
            break
        pos += len(line)
        try:
            yield json.loads(line)
        except ValueError:
            continue
    f.seek(pos)


def read_logs(path: Path, *, stdout: bool = True, stderr: bool = True, tail: int | None = None,
              since: float = 0.0, until: float = 0.0) -> list[dict]:
    """The records logged so far."""
    with LogReader(path) as reader:
        return reader.records(stdout=stdout, stderr=stderr, tail=tail, since=since, until=until)
