"""Attaching the user's terminal to a remote pty, per host OS.

POSIX: raw mode with termios, select() on stdin and the channel, SIGWINCH for resizes.
Windows: msvcrt for keys and a polling loop for the console size. The POSIX-only modules
are imported inside the POSIX function only.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import Any


def attach(chan: Any) -> None:
    if sys.platform == "win32":
        _attach_windows(chan)
    else:
        _attach_posix(chan)


def _attach_posix(chan: Any) -> None:
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
    try:
        tty.setraw(fd)
        while True:
            r, _, _ = select.select([chan, fd], [], [])
            if chan in r:
                data = chan.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if fd in r:
                data = os.read(fd, 4096)
                if not data:
                    chan.shutdown_write()
                else:
                    chan.sendall(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
        signal.signal(signal.SIGWINCH, prev)


def _attach_windows(chan: Any) -> None:  # pragma: no cover - exercised on Windows only
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
            chan.sendall(msvcrt.getwch().encode())  # type: ignore[attr-defined]
        else:
            time.sleep(0.01)
        now = shutil.get_terminal_size()
        if now != size:
            size = now
            chan.resize_pty(width=now.columns, height=now.lines)
