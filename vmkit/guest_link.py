"""A long-lived JSON-lines stream from the host daemon to a unix socket of the guest engine.

The engine listens on a unix socket in the guest (``/run/pydesk/ports.sock``,
``/run/pydesk/changes.sock``); the daemon opens a stream to it over the agent connection and
keeps it open, opening it again whenever it ends (engine restart, VM reboot, agent
reconnect). Messages are one JSON object a line in both directions. Subclasses say what a
message from the guest means (``on_message``) and what to say after each (re)connect
(``on_connect``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024 * 1024


class GuestLink:
    """One guest socket, served from a thread of its own until ``close``."""

    def __init__(self, path: str, open_stream: Callable[[str], Any], name: str) -> None:
        self.path = path
        self.open_stream = open_stream
        self.name = name
        self.closed = threading.Event()
        self.connected = threading.Event()
        self._chan: Any = None
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GuestLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.closed.set()
        chan = self._chan
        if chan is not None:
            with contextlib.suppress(Exception):
                chan.shutdown(2)  # wakes a recv() in our thread (a plain socket's close does not)
            with contextlib.suppress(Exception):
                chan.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    # --- to override -------------------------------------------------------------------
    def on_connect(self) -> None:
        """Called in the link's thread after each (re)connect, before any message is read."""

    def on_message(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A message from the guest; the reply to send back, if any."""
        return None

    # --- the stream ------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> bool:
        """Send one message; False when there is no stream (it is sent again by
        ``on_connect`` after the next connect, if it still matters)."""
        chan = self._chan
        if chan is None:
            return False
        try:
            with self._send_lock:
                chan.sendall(json.dumps(msg).encode() + b"\n")
        except Exception as exc:  # the stream is going away; _run reconnects
            log.debug("%s: send failed: %s", self.name, exc)
            return False
        return True

    def _run(self) -> None:
        delay = 0.2
        while not self.closed.is_set():
            try:
                chan = self.open_stream(self.path)
            except Exception as exc:  # engine not up yet, or the agent is reconnecting
                log.debug("%s: %s not reachable yet: %s", self.name, self.path, exc)
                self.closed.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            self._chan = chan
            self.connected.set()
            log.info("%s: connected to %s", self.name, self.path)
            try:
                self.on_connect()
                self._serve(chan)
            except Exception as exc:
                log.warning("%s: stream ended: %s", self.name, exc)
            finally:
                self.connected.clear()
                self._chan = None
                with contextlib.suppress(Exception):
                    chan.close()
            self.closed.wait(0.2)

    def _serve(self, chan: Any) -> None:
        buf = b""
        while not self.closed.is_set():
            data = chan.recv(65536)
            if not data:
                return
            buf += data
            if len(buf) > MAX_LINE and b"\n" not in buf:
                raise ValueError(f"a message from the guest is longer than {MAX_LINE} bytes")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("%s: bad message from the guest: %r", self.name, line[:200])
                    continue
                if not isinstance(msg, dict):
                    log.warning("%s: bad message from the guest: %r", self.name, line[:200])
                    continue
                reply = self.on_message(msg)
                if reply is not None:
                    self.send(reply)
