"""Attaching the user's terminal to a remote pty, per host OS.

POSIX: raw mode with termios, select() on stdin and the channel, SIGWINCH for resizes.
Windows: msvcrt for keys and a polling loop for the console size. The POSIX-only modules
are imported inside the POSIX function only. With detach keys (a container's or an exec's
terminal, not `vm shell`), typing them ends the session and leaves the remote process
running, as in docker's CLI.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import Any

from agent.detach_keys import Scanner


def attach(chan: Any, detach_keys: bytes = b"") -> bool:
    """Run the session to its end; True if it ended because the user typed ``detach_keys``."""
    scanner = Scanner(detach_keys) if detach_keys else None
    if sys.platform == "win32":
        return _attach_windows(chan, scanner)
    return _attach_posix(chan, scanner)


def _forward(chan: Any, scanner: Scanner | None, data: bytes) -> bool:
    """Send what was typed, less the detach keys; True if they were typed."""
    detached = False
    if scanner is not None:
        data, detached = scanner.feed(data)
    if data:
        chan.sendall(data)
    return detached


def _attach_posix(chan: Any, scanner: Scanner | None) -> bool:
    import select
    import signal
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)

    def on_winch(signum: int, frame: object) -> None:
        cols, rows = shutil.get_terminal_size()
        chan.resize_pty(width=cols, height=rows)

    prev = signal.signal(signal.SIGWINCH, on_winch)
    watch = [chan, fd]
    try:
        tty.setraw(fd, termios.TCSANOW)  # keep what was typed ahead (TCSAFLUSH would drop it)
        while True:
            r, _, _ = select.select(watch, [], [])
            if chan in r:
                data = chan.recv(65536)
                if not data:
                    return False
                os.write(sys.stdout.fileno(), data)
            if fd in r:
                data = os.read(fd, 4096)
                if not data:  # our input ended: tell the other end, and read on
                    if scanner is not None and (held := scanner.flush()):
                        chan.sendall(held)
                    chan.shutdown_write()
                    watch = [chan]
                    continue
                if _forward(chan, scanner, data):
                    return True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
        signal.signal(signal.SIGWINCH, prev)


def _attach_windows(chan: Any, scanner: Scanner | None) -> bool:  # pragma: no cover - exercised on Windows only
    import msvcrt
    import time

    stop = threading.Event()

    def output() -> None:
        while data := chan.recv(65536):
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        stop.set()

    threading.Thread(target=output, daemon=True).start()
    size = shutil.get_terminal_size()
    while not stop.is_set():
        if msvcrt.kbhit():  # type: ignore[attr-defined]
            if _forward(chan, scanner, msvcrt.getwch().encode()):  # type: ignore[attr-defined]
                return True
        else:
            time.sleep(0.01)
        now = shutil.get_terminal_size()
        if now != size:
            size = now
            chan.resize_pty(width=now.columns, height=now.lines)
    return False
