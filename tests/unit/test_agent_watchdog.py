"""Guest commands over the agent connection that never get an answer (vmkit/agent.py's
_watchdog), against a real paramiko server that holds its answers back.

paramiko waits without a timeout for sshd's answer to an exec request and for the exit
status. A guest sshd that never answered the virtiofs mount's exec once held `vm start` (the
daemon's main thread, in an on-connect hook) for good."""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path

import paramiko
import pytest

from tests.support.ssh_pair import OpenServer, ssh_pair
from vmkit import agent as agentmod
from vmkit.errors import AgentTimeout, ChannelStuck
from vmkit.keys import ensure_keys
from vmkit.paths import VMPaths
from vmkit.spec import Endpoint
from vmkit.spec import Share
from vmkit.vm import VM


class HeldServer(OpenServer):
    """Answers exec requests only once ``answer`` is set (its transport thread waits)."""

    def __init__(self, answer: threading.Event | None = None, exit_status: int | None = 0) -> None:
        self.answer = answer
        self.exit_status = exit_status
        self.commands: list[str] = []

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())
        if self.answer is not None:
            self.answer.wait(30)
        if self.exit_status is not None:
            threading.Timer(0.05, channel.send_exit_status, args=(self.exit_status,)).start()
        return True


def test_an_unanswered_exec_request_gives_up_as_a_stuck_channel() -> None:
    held = threading.Event()
    try:
        with ssh_pair(interface=HeldServer(held)) as (client, _):
            chan = client.open_session(timeout=5)
            t0 = time.monotonic()
            with pytest.raises(ChannelStuck, match="starting a guest command: no answer from the guest in 0.5s"):
                agentmod.exec_command(chan, "true", 0.5)
            assert time.monotonic() - t0 < 5
            assert chan.closed
    finally:
        held.set()


def test_a_missing_exit_status_times_out_but_is_not_a_stuck_channel() -> None:
    with ssh_pair(interface=HeldServer(exit_status=None)) as (client, _):
        chan = client.open_session(timeout=5)
        agentmod.exec_command(chan, "sleep forever", 5)
        with pytest.raises(AgentTimeout, match="waiting for a guest command") as info:
            agentmod.exit_status(chan, 0.5)
        assert not isinstance(info.value, ChannelStuck)


def test_answered_commands_are_untouched_by_the_watchdog() -> None:
    server = HeldServer(exit_status=3)
    with ssh_pair(interface=server) as (client, _):
        chan = client.open_session(timeout=5)
        agentmod.exec_command(chan, "exit 3", 0.5)
        assert agentmod.exit_status(chan, 5) == 3
        time.sleep(0.6)  # past the first watchdog: it was cancelled, the channel is not closed by it
        assert not chan.closed
        assert server.commands == ["exit 3"]


def _vm_with_virtiofs(*shares: Share) -> types.SimpleNamespace:
    return types.SimpleNamespace(spec=types.SimpleNamespace(virtiofs=list(shares)), share_servers=[])


def test_a_stuck_connection_at_share_mounting_goes_up_so_connecting_starts_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmkit.vm.EXEC_TIMEOUT", 0.5)
    held = threading.Event()
    try:
        with ssh_pair(interface=HeldServer(held)) as (client, _):
            with pytest.raises(ChannelStuck):
                VM._attach_shares(_vm_with_virtiofs(Share("/tmp/a", "/mnt/a")), client)  # type: ignore[arg-type]
    finally:
        held.set()


def test_a_mount_that_never_ends_is_a_warning_and_the_start_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("vmkit.vm.MOUNT_TIMEOUT", 0.5)
    server = HeldServer(exit_status=None)
    with ssh_pair(interface=server) as (client, _):
        VM._attach_shares(_vm_with_virtiofs(Share("/tmp/a", "/mnt/a"), Share("/tmp/b", "/mnt/b")), client)  # type: ignore[arg-type]
    assert len(server.commands) == 2  # the second share was still tried
    assert [r.getMessage() for r in caplog.records if "virtiofs" in r.getMessage()] == [
        "cannot mount virtiofs share /tmp/a: waiting for a guest command: no answer from the guest in 0.5s",
        "cannot mount virtiofs share /tmp/b: waiting for a guest command: no answer from the guest in 0.5s"]


def test_connect_drops_a_connection_whose_hook_found_it_stuck_and_uses_a_fresh_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AgentChannel.connect over real transports: the first one's sshd never answers the
    hook's exec; the second's does."""
    held = threading.Event()
    servers = [HeldServer(held), HeldServer()]
    pairs = [ssh_pair(interface=s) for s in servers]
    clients = []

    def attempt(self: agentmod.AgentChannel, timeout: float) -> paramiko.Transport:
        client, _ = pairs[len(clients)].__enter__()
        clients.append(client)
        return client

    def hook(t: paramiko.Transport) -> None:
        chan = t.open_session(timeout=5)
        agentmod.exec_command(chan, "mount", 0.5)
        assert agentmod.exit_status(chan, 5) == 0

    monkeypatch.setattr(agentmod.AgentChannel, "_attempt", attempt)
    monkeypatch.setattr(agentmod.AgentChannel, "_start_watcher", lambda self: None)
    monkeypatch.setenv("PYDESK_HOME", str(tmp_path))
    paths = VMPaths("watchdog").ensure()
    ensure_keys(paths)
    ch = agentmod.AgentChannel(Endpoint(path=str(tmp_path / "unused.sock")), paths.client_key, paths.known_host)
    ch.on_connect.append(hook)
    try:
        ch.connect(time.monotonic() + 20)
        assert len(clients) == 2
        assert not clients[0].is_active()  # the stuck one was closed
        assert ch._transport is clients[1] and clients[1].is_active()
        assert [s.commands for s in servers] == [["mount"], ["mount"]]
    finally:
        held.set()
        for p in pairs[:len(clients)]:
            p.__exit__(None, None, None)
