"""The host side of the agent port's greeting (vmkit.agent.greet), against scripted guests
on a socket pair. The guest side (guest/files/etc/pydesk/agent-port) meets it for real in
tests/vm: every VM test connects through it, and test_lifecycle freezes a previous session's
sshd so that it swallows a new connection's first greeting."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from vmkit import agent

HELLO = re.compile(rb"PYDESK-HELLO ([0-9a-f]+)\n")
GO = re.compile(rb"PYDESK-GO ([0-9a-f]+)\n")


class Guest:
    """The guest end: reads what the host sends and answers as a script decides."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = b""

    def wait_for(self, pattern: re.Pattern[bytes], count: int = 1, timeout: float = 10) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(pattern.findall(self.received)) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.received += chunk
        return pattern.findall(self.received)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    host, guest = socket.socketpair()
    yield host, guest
    host.close()
    guest.close()


def run_guest(sock: socket.socket, script: Callable[[Guest], None]) -> tuple[threading.Thread, Guest, list[BaseException]]:
    g, errors = Guest(sock), []

    def body() -> None:
        try:
            script(g)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, g, errors


def test_a_swallowed_greeting_is_sent_again_and_only_the_answered_one_gets_go(pair) -> None:  # type: ignore[no-untyped-def]
    host, guest = pair

    def script(g: Guest) -> None:
        g.wait_for(HELLO)  # a previous session's sshd reads this one and quits
        g.sock.sendall(b"\x00\x17stale sshd output\xff")
        nonces = g.wait_for(HELLO, 2)
        g.sock.sendall(b"PYDESK-READY " + nonces[1] + b"\nSSH-2.0-guest\r\n")
        g.wait_for(GO)

    t, g, errors = run_guest(guest, script)
    agent.greet(host, timeout=10)
    assert host.recv(64) == b"SSH-2.0-guest\r\n"  # nothing of the greeting is left for SSH
    t.join(10)
    assert not errors
    hellos = HELLO.findall(g.received)
    assert len(hellos) == 2 and hellos[0] != hellos[1]
    assert GO.findall(g.received) == [hellos[1]]


def test_a_late_answer_to_an_older_greeting_is_ignored(pair) -> None:  # type: ignore[no-untyped-def]
    host, guest = pair

    def script(g: Guest) -> None:
        # A slow guest: it answers the first HELLO only after the host has sent a second.
        first, second = g.wait_for(HELLO, 2)
        g.sock.sendall(b"PYDESK-READY " + first + b"\n")
        time.sleep(0.2)
        g.sock.sendall(b"PYDESK-READY " + second + b"\n")
        g.wait_for(GO)

    t, g, errors = run_guest(guest, script)
    agent.greet(host, timeout=10)
    t.join(10)
    assert not errors
    assert GO.findall(g.received) == [HELLO.findall(g.received)[1]]


def test_the_greeting_is_sent_again_at_growing_intervals_until_the_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    host, guest = pair
    t, g, errors = run_guest(guest, lambda g: g.wait_for(HELLO, 99, timeout=4))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer the greeting"):
        agent.greet(host, timeout=3)
    assert 3 <= time.monotonic() - start < 5
    t.join(10)
    # 0.5 + 1 + 2 s: three HELLOs are sent by 1.5 s, and no fourth before 3.5 s
    assert len(HELLO.findall(g.received)) == 3
    assert not GO.findall(g.received)


def test_a_closed_port_ends_the_greeting(pair) -> None:  # type: ignore[no-untyped-def]
    host, guest = pair

    def script(g: Guest) -> None:
        g.wait_for(HELLO)
        g.sock.sendall(b"PYDESK-READY 00")  # not even a whole line
        g.sock.shutdown(socket.SHUT_WR)

    t, _, errors = run_guest(guest, script)
    with pytest.raises(EOFError, match="closed during the greeting"):
        agent.greet(host, timeout=10)
    t.join(10)
    assert not errors

