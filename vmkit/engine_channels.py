"""Streams to the engine's socket in the guest, one kept open ahead of need.

Each Engine API connection on the host becomes an SSH channel to
``/run/pydesk/engine.sock`` in the guest. Opening one is a round trip through the guest's
sshd, which connects to the engine, which starts a handler thread: 10–15 ms under TCG, and
clients open many (docker-py keeps a connection pool per URL, so most of its requests open
one). :class:`EngineChannels` hands out a channel that was opened in the background before
it was asked for, and opens the next one after handing it out.

A spare is only an idle connection to the engine (which has no idle timeout); one that the
guest closed meanwhile (an engine restart, a lost agent connection) is dropped unused.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Opener = Callable[[float], Any]  # timeout -> an open paramiko.Channel (or an equivalent stream)


def usable(chan: Any) -> bool:
    """Whether a spare channel is still open both ways and nothing has arrived on it (an idle
    HTTP connection never sends first)."""
    return bool(chan.active) and not chan.closed and not chan.eof_received and not chan.recv_ready()


class EngineChannels:
    def __init__(self, opener: Opener, spares: int = 1) -> None:
        self._opener = opener
        self._spares = spares
        self._lock = threading.Lock()
        self._ready: list[Any] = []
        self._opening = 0
        self._closed = False

    def get(self, timeout: float) -> Any:
        """A channel to the engine: a spare if one is ready, else a new one."""
        chan = None
        with self._lock:
            while self._ready and chan is None:
                candidate = self._ready.pop()
                if usable(candidate):
                    chan = candidate
                else:
                    _close(candidate)
        if chan is None:
            chan = self._opener(timeout)
        self.fill()
        return chan

    def fill(self) -> None:
        """Open spares in the background up to the number wanted."""
        with self._lock:
            missing = self._spares - len(self._ready) - self._opening
            if self._closed or missing <= 0:
                return
            self._opening += missing
        for _ in range(missing):
            threading.Thread(target=self._open_spare, name="engine-spare", daemon=True).start()

    def _open_spare(self) -> None:
        chan = None
        try:
            chan = self._opener(10.0)
        except Exception as exc:  # no spare now; the next get() opens its own channel
            log.debug("no spare engine channel: %s", exc)
        with self._lock:
            self._opening -= 1
            if chan is not None and not self._closed:
                self._ready.append(chan)
                return
        if chan is not None:
            _close(chan)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for chan in ready:
            _close(chan)


def _close(chan: Any) -> None:
    with contextlib.suppress(Exception):
        chan.close()
