"""Reading an HTTP/1.x request head for the engine's ``http.server`` handler, without
``email.parser``.

``BaseHTTPRequestHandler.parse_request`` hands the header lines to ``email.parser`` (through
``http.client.parse_headers``), which builds a MIME message out of them: ~1.6 ms for the six
headers of a docker-py request in this emulated guest, against ~0.1 ms for splitting the lines
here. A `docker run` is seven requests. ``RequestParsing.parse_request`` does what the standard
one does (the request line's checks, header limits, ``Connection``, ``Expect: 100-continue``)
and keeps the headers in ``Headers``, which answers ``get`` as ``email.message.Message`` does:
by case-insensitive name, first occurrence wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

MAX_LINE = 65536  # as http.client: a longer header line is refused
MAX_HEADERS = 100


class Headers:
    """A request's header fields in their order, looked up by case-insensitive name."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields
        self._first: dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._first.get(name.lower(), default)

    def __getitem__(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._fields if n.lower() == key]

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class HeaderError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_headers(rfile: object) -> Headers:
    """The header lines up to the empty one. A line that starts with white space continues the
    field before it (obsolete folding, which ``email`` accepts too)."""
    readline = rfile.readline  # type: ignore[attr-defined]
    fields: list[tuple[str, str]] = []
    while True:
        line = readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HeaderError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
        if line in (b"\r\n", b"\n", b""):
            return Headers(fields)
        if len(fields) >= MAX_HEADERS:
            raise HeaderError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
        text = line.decode("iso-8859-1")
        if text[0] in " \t":
            if not fields:
                raise HeaderError(HTTPStatus.BAD_REQUEST, "Bad header: a continuation line comes first")
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            raise HeaderError(HTTPStatus.BAD_REQUEST, f"Bad header line ({text.rstrip()!r})")
        fields.append((name, value.strip()))


class RequestParsing(BaseHTTPRequestHandler):
    """``parse_request`` with ``read_headers`` in place of ``email.parser``; the rest of it is
    the standard library's, step for step."""

    def parse_request(self) -> bool:
        self.command = None  # type: ignore[assignment]  # (set in case of an error on the first line)
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            try:
                if not version.startswith("HTTP/"):
                    raise ValueError
                major, minor = version.split("/", 1)[1].split(".")
                number = int(major), int(minor)
            except ValueError:
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            if number >= (1, 1) and self.protocol_version >= "HTTP/1.1":
                self.close_connection = False
            if number >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({major}.{minor})")
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:  # HTTP/0.9
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_headers(self.rfile)  # type: ignore[assignment]
        except HeaderError as exc:
            self.send_error(exc.status, exc.message)
            return False
        conntype = (self.headers.get("Connection") or "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if expect == "100-continue" and self.protocol_version >= "HTTP/1.1" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True
