"""The engine link's two ends in one process (vmkit/engine_link.py and agent/engine_port.py's
relay), joined by a stand-in for QEMU's chardev socket, with a unix-socket server as the
engine. Shared by tests/unit/test_engine_link.py and the daemon's named-pipe test."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.engine_port import Relay
from vmkit.engine_link import EngineLink
from vmkit.spec import Endpoint


def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class FakeQemu:
    """QEMU's side of the port: a chardev socket server for the host (one client at a time),
    bridged to the relay's fd. Unlike a virtio port, the relay sees no end-of-file when the
    host goes; what it sees next is a new hello, which it must handle as out of step."""

    def __init__(self, path: Path, port: socket.socket) -> None:
        self.path = path
        self.port = port
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.client: socket.socket | None = None
        self.accepts = 0
        threading.Thread(target=self._serve, daemon=True).start()
        threading.Thread(target=self._to_host, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.client = conn
            self.accepts += 1
            try:
                while data := conn.recv(65536):
                    self.port.sendall(data)
            except OSError:
                pass
            self.client = None

    def _to_host(self) -> None:
        while True:
            try:
                data = self.port.recv(65536)
            except OSError:
                return
            if not data:
                return
            c = self.client
            if c is not None:
                with contextlib.suppress(OSError):
                    c.sendall(data)

    def drop_host(self) -> None:
        c = self.client
        if c is not None:
            c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        self.drop_host()
        self.port.close()


class EchoEngine:
    """The engine: echoes every connection until its EOF, then half-closes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.handlers: list[Callable[[socket.socket], None]] = []
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            handler = self.handlers.pop(0) if self.handlers else self.echo
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    @staticmethod
    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


class Link:
    """A relay, a fake QEMU and a started EngineLink; ``client()`` is one Docker API client."""

    def __init__(self, tmp: Path, engine_path: Path) -> None:
        guest, qemu_side = socket.socketpair()
        self.relay = Relay(guest.detach(), str(engine_path))
        self.relay_thread = threading.Thread(target=self.relay.run, daemon=True)
        self.relay_thread.start()
        self.qemu = FakeQemu(tmp / "engine-port.sock", qemu_side)
        self.refused: list[socket.socket] = []
        self.link = EngineLink(Endpoint(path=str(tmp / "engine-port.sock")), refused=self._refuse).start()
        self.forwards: list[threading.Thread] = []

    def _refuse(self, conn: socket.socket) -> None:
        self.refused.append(conn)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    def in_use(self) -> tuple[set[int], set[int]]:
        """The ids of the streams carried for clients on the host and in the relay (spares,
        open on both sides and waiting for a client, left out)."""
        spares = {s.sid for s in list(self.link.spares)}
        return set(self.link.streams) - spares, set(self.relay.streams) - spares

    def idle(self) -> bool:
        return self.in_use() == (set(), set())

    def client(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        t = threading.Thread(target=self.link.forward, args=(theirs, 10.0), daemon=True)
        t.start()
        self.forwards.append(t)
        return ours

    def close(self) -> None:
        self.link.close()
        self.relay.stop()
        self.relay_thread.join(5)
        self.qemu.close()


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)
