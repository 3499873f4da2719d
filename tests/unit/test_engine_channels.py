"""Spare channels to the guest engine (vmkit/engine_channels.py), over a real paramiko
connection: the guest's sshd is played by a paramiko server in this process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import paramiko
import pytest

from tests.support.ssh_pair import ssh_pair
from vmkit.engine_channels import EngineChannels


@pytest.fixture
def ssh() -> Iterator[tuple[paramiko.Transport, paramiko.Transport]]:
    with ssh_pair() as pair:
        yield pair


def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_spare_is_handed_out_and_the_next_one_opened(ssh: tuple[paramiko.Transport, paramiko.Transport]) -> None:
    client, server = ssh
    opened: list[paramiko.Channel] = []

    def opener(timeout: float) -> paramiko.Channel:
        chan = client.open_session(timeout=timeout)
        opened.append(chan)
        return chan

    channels = EngineChannels(opener, spares=1)
    channels.fill()
    until(lambda: len(opened) == 1)
    first_far = server.accept(10)
    chan = channels.get(timeout=5)
    assert chan is opened[0]  # the spare, not a new channel
    until(lambda: len(opened) == 2)  # ... and the next spare is on its way
    chan.sendall(b"GET /_ping HTTP/1.1\r\n\r\n")
    assert first_far.recv(100) == b"GET /_ping HTTP/1.1\r\n\r\n"
    second_far = server.accept(10)

    # the guest end of the spare goes away (an engine restart): it is dropped, never handed out
    second_far.close()
    until(lambda: opened[1].closed or opened[1].eof_received)
    chan2 = channels.get(timeout=5)
    assert chan2 is not opened[1] and chan2 is opened[2]
    third_far = server.accept(10)
    chan2.sendall(b"x")
    assert third_far.recv(1) == b"x"

    # something arrived on an idle spare: it is not a fresh HTTP connection any more
    until(lambda: len(opened) == 4)
    fourth_far = server.accept(10)
    fourth_far.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    until(lambda: opened[3].recv_ready())
    assert channels.get(timeout=5) is opened[4]

    until(lambda: len(opened) == 6)
    channels.close()
    until(lambda: opened[5].closed)
    assert channels.get(timeout=5) is opened[6]  # closed: a plain new channel, and no spare after it
    time.sleep(0.2)
    assert len(opened) == 7


def test_without_spares_each_get_opens_a_channel(ssh: tuple[paramiko.Transport, paramiko.Transport]) -> None:
    client, _server = ssh
    calls: list[float] = []

    def opener(timeout: float) -> paramiko.Channel:
        calls.append(timeout)
        return client.open_session(timeout=timeout)

    channels = EngineChannels(opener, spares=0)
    channels.get(timeout=3)
    channels.get(timeout=4)
    time.sleep(0.2)
    assert calls == [3, 4]


def test_a_failing_opener_leaves_no_spare_and_get_reports_it(ssh: tuple[paramiko.Transport, paramiko.Transport]) -> None:
    def opener(timeout: float) -> paramiko.Channel:
        raise paramiko.ChannelException(2, "Connect failed")

    channels = EngineChannels(opener, spares=1)
    channels.fill()
    with pytest.raises(paramiko.ChannelException):
        channels.get(timeout=1)
