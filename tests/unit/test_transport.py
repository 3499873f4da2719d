"""Local sockets: unix with mode 0600 on POSIX; TCP + token on Windows (forced here)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from vmkit import transport


def _echo_once(listener: transport.Listener, result: list) -> None:
    try:
        conn = listener.accept()
        result.append(conn.recv(100))
        conn.sendall(b"pong")
        conn.close()
    except OSError as exc:
        result.append(exc)


def test_unix_socket_is_private(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    lst = transport.Listener(path, platform="linux")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        got: list = []
        t = threading.Thread(target=_echo_once, args=(lst, got))
        t.start()
        s = transport.connect(path, platform="linux")
        s.sendall(b"ping")
        assert s.recv(4) == b"pong"
        t.join(5)
        assert got == [b"ping"]
    finally:
        lst.close()
    assert not path.exists()  # closing removes the socket file


def test_windows_transport_requires_the_token(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    lst = transport.Listener(path, platform="win32")
    try:
        port_file = path.with_suffix(".port")
        assert stat.S_IMODE(os.stat(port_file).st_mode) == 0o600
        port = int(port_file.read_text().split()[0])
        got: list = []
        t = threading.Thread(target=_echo_once, args=(lst, got))
        t.start()
        # a client without the token is dropped
        intruder = socket.create_connection(("127.0.0.1", port))
        intruder.sendall(b"x" * transport.TOKEN_BYTES)
        assert intruder.recv(10) == b""
        intruder.close()
        # the real client gets through
        s = transport.connect(path, platform="win32")
        s.sendall(b"ping")
        assert s.recv(4) == b"pong"
        t.join(5)
        assert got == [b"ping"]
    finally:
        lst.close()
    assert not path.with_suffix(".port").exists()


def test_qemu_endpoints_per_platform(tmp_path: Path) -> None:
    assert transport.qemu_endpoint(tmp_path / "q.sock", platform="linux").path == str(tmp_path / "q.sock")
    ep = transport.qemu_endpoint(tmp_path / "q.sock", platform="win32")
    assert ep.path is None and ep.host == "127.0.0.1" and ep.port


def test_connect_to_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        transport.connect(tmp_path / "none.sock", platform="linux")
    with pytest.raises(OSError):
        transport.connect(tmp_path / "none.sock", platform="win32")
