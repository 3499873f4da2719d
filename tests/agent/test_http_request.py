"""The engine's request-head parsing (agent/http_request.py) over a real unix socket, and
against the standard library's parser for the same bytes."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import Server
from agent.http_request import Headers, RequestParsing, read_headers


class _Echo(RequestParsing):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "fields": self.headers.items(),
                           "host": self.headers.get("HOST"), "auth": self.headers.get_all("x-auth")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "api.sock")
    srv = Server(path, _Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield path
    finally:
        srv.shutdown()
        srv.server_close()


def _exchange(path: str, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def test_a_docker_py_request_and_the_next_on_the_same_connection(sock_path: str) -> None:
    req = (b"GET /v1.44/containers/abc/json HTTP/1.1\r\nHost: localhost\r\nUser-Agent: docker-sdk-python/7.1.0\r\n"
           b"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
           b"X-Auth: one\r\nx-auth:  two  \r\n\r\n")
    (s1, b1), (s2, b2) = _responses(_exchange(sock_path, req + b"GET //x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
    first = json.loads(b1)
    assert (s1, first["path"], first["host"], first["auth"]) == (200, "/v1.44/containers/abc/json", "localhost", ["one", "two"])
    assert first["fields"][1] == ["User-Agent", "docker-sdk-python/7.1.0"]
    assert (s2, json.loads(b2)["path"]) == (200, "/x")  # '//' reduced as the standard parser does


def test_expect_100_continue_gets_its_interim_answer(sock_path: str) -> None:
    data = _exchange(sock_path, b"POST /load HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n folded first: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTQ/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / extra HTTP/1.1\r\n\r\n", 400),
    (b"POST /\r\n\r\n", 400),
])
def test_a_malformed_head_gets_an_error_status_and_the_connection_closes(sock_path: str, raw: bytes, status: int) -> None:
    data = _exchange(sock_path, raw + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    if not data.startswith(b"HTTP/"):  # no version known: the answer has no head (as http.server)
        assert b"Error code: %d" % status in data and b"/next" not in data
        return
    assert [s for s, _ in _responses(data)] == [status]  # the request after it is not read as one


@pytest.mark.parametrize("block", [
    b"Host: localhost\r\nContent-Length: 12\r\nContent-Type: application/json\r\n\r\n",
    b"host: a\r\nHOST: b\r\nX-Registry-Auth: eyJ1c2VybmFtZSI6ICJ1In0=\r\n\r\n",
    b"Connection: Upgrade\r\nUpgrade: tcp\r\nX-Folded: one\r\n  two\r\n\tthree\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nEmpty:\r\nSpaced:    v   \r\n\r\n",
])
def test_lookups_agree_with_the_standard_parser(block: bytes) -> None:
    ours = read_headers(io.BytesIO(block))
    theirs = http.client.parse_headers(io.BytesIO(block))
    for name in {n for n, _ in ours.items()} | {"Absent", "content-length", "HOST"}:
        want = theirs.get(name)
        got = ours.get(name)
        # email keeps folded lines' breaks and a value's trailing blanks; both are noise to HTTP
        assert got == (" ".join(want.split()) if want is not None else None), name
    assert len(ours) == len(theirs)


def test_headers_behave_as_a_mapping_of_first_values() -> None:
    h = Headers([("A", "1"), ("a", "2"), ("B", "3")])
    assert (h["A"], h.get("a"), h.get("c", "d"), "b" in h, "c" in h, h.get_all("A")) == ("1", "1", "d", True, False, ["1", "2"])
    assert list(h) == ["A", "a", "B"]
