"""`pydesk vm shell`: an SSH session in the guest, carried over the daemon's agent channel.

The daemon hands us a byte stream to a fresh ``sshd -i`` in the guest; paramiko runs the
SSH client over it, so we get a pty, window size, stdin, exit codes — all from SSH itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading

import paramiko

from vmkit.agent import load_public_key, open_transport
from vmkit.client import DaemonClient


def _session(client: DaemonClient) -> tuple[paramiko.Transport, paramiko.Channel]:
    sock = client.open_ssh()
    key = paramiko.Ed25519Key.from_private_key_file(str(client.paths.client_key))
    t = open_transport(sock, key, load_public_key(client.paths.known_host), timeout=30)  # type: ignore[arg-type]
    return t, t.open_session(timeout=30)


def run_command(client: DaemonClient, argv: list[str]) -> int:
    """Run one command in the guest with our stdin/stdout/stderr; returns its exit code."""
    t, chan = _session(client)
    try:
        chan.exec_command(shlex.join(argv))
        feeder = threading.Thread(target=_feed_stdin, args=(chan,), daemon=True)
        if not sys.stdin.isatty():
            feeder.start()
        else:
            chan.shutdown_write()
        err_thread = threading.Thread(target=_copy, args=(chan.recv_stderr, sys.stderr.buffer), daemon=True)
        err_thread.start()
        _copy(chan.recv, sys.stdout.buffer)
        err_thread.join()
        return chan.recv_exit_status()
    finally:
        t.close()


def _feed_stdin(chan: paramiko.Channel) -> None:
    try:
        while data := os.read(sys.stdin.fileno(), 65536):
            chan.sendall(data)
    except OSError:
        pass
    finally:
        chan.shutdown_write()


def _copy(recv, out) -> None:  # type: ignore[no-untyped-def]
    while data := recv(65536):
        out.write(data)
        out.flush()


def interactive(client: DaemonClient) -> int:
    """A login shell with a pty, our terminal in raw mode."""
    from desktop import terminal

    t, chan = _session(client)
    try:
        cols, rows = shutil.get_terminal_size()
        chan.get_pty(term=os.environ.get("TERM", "xterm"), width=cols, height=rows)
        chan.invoke_shell()
        terminal.attach(chan)
        return chan.recv_exit_status()
    finally:
        t.close()
