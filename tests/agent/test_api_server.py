"""The engine API's server (agent/api.py ``Server``): a thread per connection, from a pool
(agent/workers.py) whose threads wait for the next connection rather than exit."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from agent.api import Server
from agent.workers import Workers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    threads: set[int] = set()
    release = threading.Event()

    def do_GET(self) -> None:
        _Handler.threads.add(threading.get_ident())
        if self.path == "/hold":
            _Handler.release.wait(10)
        body = str(threading.get_ident()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    path = str(tmp_path / "engine.sock")
    srv = Server(path, _Handler, Workers(idle_seconds=0.5))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Handler.threads.clear()
    _Handler.release.clear()
    try:
        yield srv, path
    finally:
        _Handler.release.set()
        srv.shutdown()
        srv.server_close()


def get(path: str, url: str = "/") -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return int(body)


def test_connections_one_after_another_reuse_one_thread(server: tuple[Server, str]) -> None:
    srv, path = server
    idents = set()
    for _ in range(10):
        idents.add(get(path))
        # the answer is out before its thread is back waiting; a busy machine may let the next
        # connection in first (and that one rightly gets a thread of its own)
        deadline = time.monotonic() + 5
        while srv.pool.idle() < 1:
            assert time.monotonic() < deadline, "the thread never went back to waiting"
            time.sleep(0.005)
    assert len(idents) == 1


def test_concurrent_connections_each_get_a_thread_and_idle_ones_retire(server: tuple[Server, str]) -> None:
    srv, path = server
    before = threading.active_count()
    results: list[int] = []
    held = [threading.Thread(target=lambda: results.append(get(path, "/hold"))) for _ in range(4)]
    for t in held:
        t.start()
    deadline = time.monotonic() + 10
    while len(_Handler.threads) < 4:  # all four are being served at once
        assert time.monotonic() < deadline, "connections were not served concurrently"
        time.sleep(0.01)
    busy = set(_Handler.threads)
    assert get(path) not in busy  # a fifth connection is answered meanwhile, by another thread
    _Handler.release.set()
    for t in held:
        t.join(10)
    assert len(set(results)) == 4
    deadline = time.monotonic() + 10
    while threading.active_count() > before:  # after idle_seconds the spare threads exit
        assert time.monotonic() < deadline, "idle threads did not exit"
        time.sleep(0.05)
    assert srv.pool.idle() == 0
    assert get(path) > 0  # and a new connection still gets a thread


def test_a_client_that_goes_away_is_not_reported_as_an_error(server: tuple[Server, str],
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    srv, path = server
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = time.monotonic() + 10
    while not _Handler.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()  # gone before the answer: its write fails with EPIPE
    _Handler.release.set()
    time.sleep(0.3)
    assert get(path) in _Handler.threads  # answered: a thread was free for the next connection
    assert "Traceback" not in capfd.readouterr().err


def test_an_error_after_a_stream_began_cuts_the_stream_short(tmp_path: Path) -> None:
    """The engine's own handler: an error before the answer is a Docker-shaped error answer;
    one after a streamed answer began ends the connection with the stream unfinished (no
    last chunk), never a second response inside the body."""
    from types import SimpleNamespace

    from agent import api

    class Engine:
        housekeeper = SimpleNamespace(request_started=lambda: None)

    class Handler(api.Handler):
        engine = Engine()  # type: ignore[assignment]

    def broken_stream(h: api.Handler) -> None:
        h.start_stream("application/x-tar")
        h.chunk(b"part of an archive")
        raise api.EngineError(500, "the store broke half-way")

    def broken_early(h: api.Handler) -> None:
        raise api.EngineError(409, "refused before answering")

    api.routes.add("GET", "/test/broken-stream")(broken_stream)
    api.routes.add("GET", "/test/broken-early")(broken_early)
    path = str(tmp_path / "engine.sock")
    srv = Server(path, Handler, Workers(idle_seconds=0.5))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        def fetch(url: str) -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(path)
                s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # keep-alive: only a close ends it
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

        cut = fetch("/test/broken-stream")
        assert cut.startswith(b"HTTP/1.1 200 ") and cut.endswith(b"part of an archive\r\n"), cut
        assert cut.count(b"HTTP/1.1") == 1 and b"\r\n0\r\n\r\n" not in cut
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(b"GET /test/broken-early HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            early = b""
            while chunk := s.recv(4096):
                early += chunk
        assert early.startswith(b"HTTP/1.1 409 ") and early.endswith(b'{"message": "refused before answering"}\n'), early
    finally:
        api.routes.table[:] = [r for r in api.routes.table if not r[1].pattern.startswith("^/test/")]
        srv.shutdown()
        srv.server_close()
