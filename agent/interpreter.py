"""The interpreter's switch interval: short while the engine answers requests, the default
while it unpacks images.

Every thread of the engine shares one interpreter lock, and a thread that wants it back from
another waits up to the switch interval (5 ms by default) for it. Around a container's start
and exit three or four threads take turns (the request, crun's reaper, its output reader,
the record writer, the spare-namespace maker), each for a fraction of a millisecond, so each
hand-over can cost a request the full interval. With 0.5 ms, `docker run --rm` took ~9 % less
time in an interleaved A/B in the guest. A pull is the opposite case: the download and the
unpacking are long stretches of pure Python on two threads, and more hand-overs made a pull of
nginx ~12 % slower. So the interval is short, except while a pull or a load is running.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

REQUESTS = 0.0005
BULK = 0.005  # CPython's default

_lock = threading.Lock()
_bulk = 0
_normal = sys.getswitchinterval()  # what bulk work goes back to: REQUESTS once the engine serves


def for_requests() -> None:
    """Set the short interval (the engine's entry point, once started)."""
    global _normal
    with _lock:
        _normal = REQUESTS
        sys.setswitchinterval(BULK if _bulk else REQUESTS)


@contextlib.contextmanager
def bulk_work() -> Iterator[None]:
    """The default interval while the body runs (and while any other bulk work does)."""
    global _bulk
    with _lock:
        _bulk += 1
        sys.setswitchinterval(BULK)
    try:
        yield
    finally:
        with _lock:
            _bulk -= 1
            if not _bulk:
                sys.setswitchinterval(_normal)
