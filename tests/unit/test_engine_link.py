"""The engine link end to end in one process: vmkit/engine_link.py (the host side) talking to
agent/engine_port.py's relay (the guest side) through a stand-in for QEMU's chardev socket,
with a real unix-socket server as the engine. The VM tests run the same code over the real
virtio-serial port; here each behaviour can be pinned down: windows, half-closes, a client
that stops reading, an engine that is not there yet, a link that breaks."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import engine_port
from agent.engine_port import WINDOW, Relay
from tests.support.engine_link import EchoEngine, Link, read_all, until
from vmkit import engine_link
from vmkit.engine_link import SPARE_STREAMS, LinkState


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EchoEngine]:
    e = EchoEngine(tmp_path / "engine.sock")
    yield e
    e.close()


@pytest.fixture
def link(tmp_path: Path, engine: EchoEngine) -> Iterator[Link]:
    lk = Link(tmp_path, engine.path)
    assert lk.link.wait_linked(10)
    yield lk
    lk.close()
    for t in lk.forwards:
        t.join(5)
        assert not t.is_alive(), "a forward outlived the link"
    assert not lk.relay_thread.is_alive()


def test_streams_carry_bytes_both_ways_with_half_closes(link: Link) -> None:
    payloads = [os.urandom(n) for n in (1, 1000, WINDOW * 3 + 17, 2_000_000)]
    results: dict[int, bytes] = {}

    def one(i: int, data: bytes) -> None:
        c = link.client()
        sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
        sender.start()
        results[i] = read_all(c)  # the engine echoes, then half-closes after our EOF
        sender.join()
        c.close()

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, p in enumerate(payloads):
        assert hashlib.sha256(results[i]).digest() == hashlib.sha256(p).digest(), f"stream {i}"
    until(link.idle)  # both sides let go


def test_a_client_that_stops_reading_holds_up_only_its_own_stream(link: Link, engine: EchoEngine) -> None:
    big = os.urandom(5_000_000)

    def flood(conn: socket.socket) -> None:
        with conn:
            conn.sendall(big)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)

    engine.handlers.append(flood)
    slow = link.client()
    slow.sendall(b"go")
    until(lambda: any(s.credit == 0 for s in list(link.relay.streams.values())))
    # the relay holds at most a window of it; the rest waits in the engine's socket
    assert all(len(s.out) <= WINDOW for s in link.relay.streams.values())
    quick = link.client()
    quick.sendall(b"still served")
    quick.shutdown(socket.SHUT_WR)
    assert read_all(quick) == b"still served"
    quick.close()
    assert hashlib.sha256(read_all(slow)).digest() == hashlib.sha256(big).digest()
    slow.close()


def _echo_once(link: Link, data: bytes) -> None:
    c = link.client()
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    assert read_all(c) == data
    c.close()


def test_clients_take_streams_opened_and_accepted_ahead_of_them(link: Link, engine: EchoEngine) -> None:
    assert not link.link.spares  # none before the first answer: a client's request goes first
    _echo_once(link, b"first")
    until(lambda: len(link.link.spares) == SPARE_STREAMS)
    spares = [s.sid for s in link.link.spares]
    # each is connected through the relay and accepted by the engine, waiting for a request
    until(lambda: all(link.relay.streams.get(sid) is not None and link.relay.streams[sid].sock is not None
                      for sid in spares))
    until(lambda: len(engine.accepted) == 1 + SPARE_STREAMS)
    taken = link.client()
    until(lambda: spares[0] not in {s.sid for s in link.link.spares})
    assert spares[0] in link.link.streams and link.link.streams[spares[0]].conn is not None
    assert len(engine.accepted) == 1 + SPARE_STREAMS  # no connection was made for it
    taken.sendall(b"second")
    taken.shutdown(socket.SHUT_WR)
    assert read_all(taken) == b"second"
    taken.close()
    until(lambda: len(link.link.spares) == SPARE_STREAMS)  # topped up again once no client came
    until(link.idle)


def test_spares_wait_for_a_moment_with_no_new_client(link: Link, engine: EchoEngine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _echo_once(link, b"first")
    until(lambda: len(engine.accepted) == 1 + SPARE_STREAMS)  # the spares, accepted by the engine
    monkeypatch.setattr(engine_link, "SPARE_QUIET", 3.0)
    accepted = len(engine.accepted)
    for i in range(SPARE_STREAMS + 2):  # a burst: clients take the spares, then open their own
        _echo_once(link, b"burst %d" % i)
    # none was opened during the burst: the engine set up only the two streams of its own
    assert len(engine.accepted) == accepted + 2
    assert not link.link.spares
    until(lambda: len(link.link.spares) == SPARE_STREAMS)  # once the burst has been over for 3 s
    until(lambda: len(engine.accepted) == accepted + 2 + SPARE_STREAMS)


def test_spares_the_engine_ended_are_dropped_and_clients_still_served(link: Link, engine: EchoEngine) -> None:
    _echo_once(link, b"first")
    until(lambda: len(engine.accepted) == 1 + SPARE_STREAMS)
    stale = {s.sid for s in link.link.spares}
    for conn in engine.accepted[1:]:  # the engine restarts: its connections end under the spares
        conn.shutdown(socket.SHUT_RDWR)
    until(lambda: not link.link.spares and not stale & set(link.link.streams))
    _echo_once(link, b"after the restart")  # a stream of its own, as without spares
    until(lambda: len(link.link.spares) == SPARE_STREAMS)
    until(lambda: not stale & set(link.relay.streams))  # the relay was told to drop the dead ones
    until(link.idle)


def test_a_stream_opened_before_the_engine_is_up_waits_for_it(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    lk = Link(tmp_path, path)
    try:
        c = lk.client()
        c.sendall(b"early")
        c.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
        late = EchoEngine(path)
        try:
            assert read_all(c) == b"early"
        finally:
            late.close()
    finally:
        lk.close()


def test_an_engine_that_never_comes_is_answered_with_an_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_port, "CONNECT_WAIT", 0.3)
    lk = Link(tmp_path, tmp_path / "never.sock")
    try:
        c = lk.client()
        c.sendall(b"GET /_ping HTTP/1.1\r\n\r\n")
        assert read_all(c) == b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        assert len(lk.refused) == 1
        until(lambda: not lk.link.streams and not lk.relay.streams)  # and a refusal opens no spare
    finally:
        lk.close()


def test_a_broken_link_closes_its_streams_and_links_again(link: Link) -> None:
    held = link.client()
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    assert link.link.links == 1
    link.qemu.drop_host()  # QEMU's socket goes away under the host
    assert read_all(held) == b""  # the open stream is closed, not left hanging
    held.close()
    until(lambda: link.link.links == 2 and link.link.state is LinkState.LINKED)
    assert link.qemu.accepts == 2
    again = link.client()
    again.sendall(b"after")
    again.shutdown(socket.SHUT_WR)
    assert read_all(again) == b"after"
    again.close()
    until(link.idle)  # the relay dropped the stale session's stream too


def test_a_restarted_relay_makes_the_host_link_again(link: Link) -> None:
    held = link.client()
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    link.relay.stop()  # the relay dies (init respawns it) with a stream open
    link.relay_thread.join(5)
    link.relay = Relay(link.relay.fd, link.relay.engine_socket)
    link.relay_thread = threading.Thread(target=link.relay.run, daemon=True)
    link.relay_thread.start()
    assert read_all(held) == b""  # its reset line made the host close the stream ...
    held.close()
    until(lambda: link.link.links == 2 and link.link.state is LinkState.LINKED)  # ... and link again
    again = link.client()
    again.sendall(b"after")
    again.shutdown(socket.SHUT_WR)
    assert read_all(again) == b"after"
    again.close()


def test_stale_bytes_before_the_hello_are_skipped(tmp_path: Path, engine: EchoEngine) -> None:
    guest, qemu_side = socket.socketpair()
    qemu_side.sendall(b"\x02\x00\x00\x00\x07garbage from an earlier session\n" + os.urandom(300))
    relay = Relay(guest.detach(), str(engine.path))
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    try:
        qemu_side.sendall(engine_port.hello_line(b"0123456789abcdef"))
        buf = b""
        while engine_port.ready_line(b"0123456789abcdef") not in buf:
            buf += qemu_side.recv(100)
        # a request smaller than ACK_EVERY is answered with no ACK; a bigger one is acknowledged
        # in ACK_EVERY-sized steps once written (what was not acknowledged yet is owed no ACK:
        # the stream ends)
        small, big = b"hi", os.urandom(engine_port.ACK_EVERY + 1000)
        for sid, payload in ((7, small), (8, big)):
            qemu_side.sendall(engine_port.frame(engine_port.Kind.OPEN, sid))
            for at in range(0, len(payload), engine_port.MAX_FRAME):
                qemu_side.sendall(engine_port.frame(engine_port.Kind.DATA, sid, payload[at:at + engine_port.MAX_FRAME]))
            qemu_side.sendall(engine_port.frame(engine_port.Kind.EOF, sid))
        got = bytearray()
        frames: list[tuple[engine_port.Kind, int, bytes]] = []
        while sum(k is engine_port.Kind.EOF for k, _, _ in frames) < 2:
            got += qemu_side.recv(65536)
            frames += engine_port.parse(got)
        assert b"".join(p for k, sid, p in frames if k is engine_port.Kind.DATA and sid == 7) == small
        assert b"".join(p for k, sid, p in frames if k is engine_port.Kind.DATA and sid == 8) == big
        acks = [(sid, engine_port.ACK.unpack(p)[0]) for k, sid, p in frames if k is engine_port.Kind.ACK]
        assert [sid for sid, _ in acks] == [8] and acks[0][1] >= engine_port.ACK_EVERY
        until(lambda: not relay.streams)
    finally:
        relay.stop()
        t.join(5)
        qemu_side.close()
    assert not t.is_alive()
