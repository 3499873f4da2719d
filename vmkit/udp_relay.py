"""Published UDP ports: datagrams carried over the agent channel.

QEMU's user network can forward UDP too, but not when the VM runs with ``--restrict-network``
(libslirp then drops every datagram the guest sends, replies included), and a published port
must not depend on that setting. So for UDP the daemon binds the host port itself and relays
each client's datagrams over its own stream to the guest engine's relay socket, which hands
them to the container. Frames are a 2-byte big-endian length and the payload; the stream opens
with one JSON line naming the binding's guest port. A client's stream is closed after
``IDLE_TIMEOUT`` seconds without traffic, as NAT tables expire UDP flows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

GUEST_SOCKET = "/run/pydesk/udp.sock"
IDLE_TIMEOUT = 60.0
MAX_DATAGRAM = 65507


def frame(payload: bytes) -> bytes:
    return struct.pack("!H", len(payload)) + payload


def read_exact(recv: Callable[[int], bytes], n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame(recv: Callable[[int], bytes]) -> bytes | None:
    head = read_exact(recv, 2)
    if head is None:
        return None
    return read_exact(recv, struct.unpack("!H", head)[0])


class _Session:
    def __init__(self, chan: Any) -> None:
        self.chan = chan
        self.last = time.monotonic()
        self.lock = threading.Lock()


class UdpRelay:
    """One published UDP port on the host: ``host_ip:host_port`` -> the guest's binding."""

    def __init__(self, host_ip: str, host_port: int, guest_port: int,
                 open_stream: Callable[[str], Any]) -> None:
        self.guest_port = guest_port
        self.open_stream = open_stream
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host_ip, host_port))
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, f"Bind for {host_ip}:{host_port} failed: port is already allocated"
                          if exc.errno == 98 else f"cannot listen on {host_ip}:{host_port}: {exc.strerror}") from exc
        self.host_ip, self.host_port = self.sock.getsockname()
        self.sessions: dict[tuple[str, int], _Session] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._receive, name=f"udp-{self.host_port}", daemon=True).start()
        threading.Thread(target=self._expire, name=f"udp-expire-{self.host_port}", daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):  # wakes the receiving thread, which holds the fd
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        with self.lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            with contextlib.suppress(Exception):
                s.chan.close()

    def _receive(self) -> None:
        while not self.closed.is_set():
            try:
                data, client = self.sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                return
            if self.closed.is_set():
                return
            try:
                session = self._session(client)
                with session.lock:
                    session.chan.sendall(frame(data))
                session.last = time.monotonic()
            except Exception as exc:  # the guest side is gone: drop this datagram, as UDP may
                log.info("udp %s:%d -> guest: %s", self.host_ip, self.host_port, exc)
                self._drop(client)

    def _session(self, client: tuple[str, int]) -> _Session:
        with self.lock:
            s = self.sessions.get(client)
        if s is not None:
            return s
        chan = self.open_stream(GUEST_SOCKET)
        chan.sendall(json.dumps({"guest_port": self.guest_port}).encode() + b"\n")
        s = _Session(chan)
        with self.lock:
            self.sessions[client] = s
        threading.Thread(target=self._replies, args=(client, s), daemon=True).start()
        return s

    def _replies(self, client: tuple[str, int], s: _Session) -> None:
        try:
            while True:
                data = read_frame(s.chan.recv)
                if data is None:
                    break
                s.last = time.monotonic()
                self.sock.sendto(data, client)
        except OSError:
            pass
        finally:
            self._drop(client, s)

    def _drop(self, client: tuple[str, int], only: _Session | None = None) -> None:
        with self.lock:
            s = self.sessions.get(client)
            if s is None or (only is not None and s is not only):
                return
            del self.sessions[client]
        with contextlib.suppress(Exception):
            s.chan.close()

    def _expire(self) -> None:
        while not self.closed.wait(IDLE_TIMEOUT / 4):
            now = time.monotonic()
            with self.lock:
                idle = [c for c, s in self.sessions.items() if now - s.last > IDLE_TIMEOUT]
            for c in idle:
                self._drop(c)
