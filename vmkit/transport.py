"""Local stream sockets between pydesk's own processes (CLI, tray, daemon).

POSIX hosts use a unix socket created with mode 0600 in the private runtime dir. Windows
uses TCP on 127.0.0.1 with a random token stored in a file only the user can read: a
connection must present it first. The choice is made in one place (``endpoint_for``) and
both sides are testable on any OS.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from vmkit.spec import Endpoint

TOKEN_BYTES = 32


def use_unix_sockets(platform: str = sys.platform) -> bool:
    return platform != "win32"


class Listener:
    """A listening socket for one named endpoint; removes its files on close."""

    def __init__(self, sock_path: Path, platform: str = sys.platform) -> None:
        self.sock_path = sock_path
        self.port_file = sock_path.with_suffix(".port")
        self.unix = use_unix_sockets(platform)
        self.token = b""
        if self.unix:
            sock_path.unlink(missing_ok=True)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # created 0600: never a window where others can connect
            try:
                self.sock.bind(str(sock_path))
            finally:
                os.umask(old)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.token = secrets.token_hex(TOKEN_BYTES // 2).encode()
            port = self.sock.getsockname()[1]
            fd = os.open(self.port_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{port}\n{self.token.decode()}\n")
        self.sock.listen(64)

    def accept(self) -> socket.socket:
        """Accept one authenticated connection (raises OSError when closed)."""
        while True:
            conn, _ = self.sock.accept()
            if self.unix:
                return conn
            conn.settimeout(5)
            try:
                got = _recv_exact(conn, len(self.token))
            except OSError:
                conn.close()
                continue
            if hmac.compare_digest(got, self.token):
                conn.settimeout(None)
                return conn
            conn.close()

    def close(self) -> None:
        try:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
            self.sock.close()
        finally:
            self.sock_path.unlink(missing_ok=True)
            self.port_file.unlink(missing_ok=True)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed during handshake")
        buf += chunk
    return buf


def endpoint_exists(sock_path: Path, platform: str = sys.platform) -> bool:
    return sock_path.exists() if use_unix_sockets(platform) else sock_path.with_suffix(".port").exists()


def connect(sock_path: Path, timeout: float | None = 5.0, platform: str = sys.platform) -> socket.socket:
    """Connect to the endpoint a Listener made at ``sock_path``."""
    if use_unix_sockets(platform):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(sock_path))
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return s
    try:
        port_s, token = sock_path.with_suffix(".port").read_text().split()
    except (OSError, ValueError) as exc:
        raise ConnectionRefusedError(f"no endpoint at {sock_path}") from exc
    s = socket.create_connection(("127.0.0.1", int(port_s)), timeout=timeout)
    s.sendall(token.encode())
    s.settimeout(None)
    return s


def qemu_endpoint(sock_path: Path, platform: str = sys.platform) -> Endpoint:
    """Where QEMU should listen for a chardev: the unix path, or a free loopback port."""
    if use_unix_sockets(platform):
        return Endpoint(path=str(sock_path))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return Endpoint(port=s.getsockname()[1])


def connect_endpoint(ep: Endpoint, timeout: float | None = 5.0) -> socket.socket:
    if ep.path is not None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(ep.path)
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return s
    s = socket.create_connection((ep.host, ep.port), timeout=timeout)
    s.settimeout(None)
    return s



def pump(a: Any, b: Any) -> None:
    """Copy bytes from a to b until EOF, then half-close b."""
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, EOFError, AttributeError):
            if isinstance(b, socket.socket):
                b.shutdown(socket.SHUT_WR)
            else:
                b.shutdown_write()
