"""The embedded DNS server: real UDP on 127.0.0.1, answering for container names and
forwarding the rest to an upstream that is itself a local test server."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from agent.dns import DNSFormatError, NameServer, answer, parse_question


def query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def addresses(reply: bytes) -> tuple[int, list[str]]:
    _, flags, _, ancount = struct.unpack("!HHHH", reply[:8])
    *_, end = parse_question(reply)
    out = []
    pos = end
    for _ in range(ancount):
        rdlen = struct.unpack("!H", reply[pos + 10:pos + 12])[0]
        out.append(socket.inet_ntoa(reply[pos + 12:pos + 12 + rdlen]))
        pos += 12 + rdlen
    return flags & 0xF, out


def test_answer_builds_a_records_and_nodata() -> None:
    rcode, addrs = addresses(answer(query("web"), ["172.18.0.2", "172.18.0.3"]))
    assert (rcode, addrs) == (0, ["172.18.0.2", "172.18.0.3"])
    assert addresses(answer(query("web", qtype=28), ["172.18.0.2"])) == (0, [])  # AAAA: NODATA


@pytest.mark.parametrize("packet", [b"", b"\x00" * 11, query("x")[:-3], b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6,
                                    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"])
def test_malformed_queries_are_rejected(packet: bytes) -> None:
    with pytest.raises(DNSFormatError):
        parse_question(packet)


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[bytes]]]:
    """A fake upstream resolver on 127.0.0.1 that answers everything with 10.9.9.9."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                data, peer = s.recvfrom(4096)
            except OSError:
                return
            seen.append(data)
            s.sendto(answer(data, ["10.9.9.9"]), peer)

    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1], seen
    s.close()


def test_server_answers_names_and_forwards_the_rest(upstream: tuple[int, list[bytes]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    port, seen = upstream
    names = {"web": ["172.18.0.2"]}
    server = NameServer(lambda net, src, name: names.get(name), lambda src: ["127.0.0.1"])
    # the server forwards to port 53; point that at the fake upstream for this test
    real_connect = socket.socket.connect

    def connect(self: socket.socket, addr: tuple[str, int]) -> None:
        return real_connect(self, (addr[0], port) if addr[1] == 53 else addr)

    monkeypatch.setattr(socket.socket, "connect", connect)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        listen_port = probe.getsockname()[1]
    monkeypatch.setattr("agent.dns.socket.socket.bind",
                        lambda self, addr, _b=socket.socket.bind: _b(self, (addr[0], listen_port) if addr[1] == 53 else addr))
    server.listen("net1", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            c.sendto(query("WEB"), ("127.0.0.1", listen_port))
            assert addresses(c.recv(4096)) == (0, ["172.18.0.2"])
            assert seen == []
            c.sendto(query("example.org"), ("127.0.0.1", listen_port))
            assert addresses(c.recv(4096)) == (0, ["10.9.9.9"])
            assert len(seen) == 1
    finally:
        server.close("net1")
