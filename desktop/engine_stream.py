"""Streams between the user's terminal and the engine: attach/exec sockets, log frames,
interactive TTYs, and the pull progress display.

The engine's attach and exec-start answers are HTTP connections upgraded to raw streams
(multiplexed with 8-byte frame headers unless the container has a TTY). We let docker-py
send the request and take the socket from its response, as docker-py's own
``attach_socket`` does — but we also keep whatever bytes ``http.client`` had already read
past the headers, which ``attach_socket`` silently drops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

UPGRADE = {"Connection": "Upgrade", "Upgrade": "tcp"}


class Hijacked:
    """A raw stream to the engine, with the recv/sendall/shutdown_write/resize_pty surface
    that ``desktop.terminal.attach`` expects."""

    def __init__(self, response: Any, resize: Callable[[int, int], None] | None = None) -> None:
        self.response = response  # keep it alive: closing it would close the socket
        buffered = response.raw._fp.fp  # the BufferedReader http.client read the headers with
        self.sock: socket.socket = buffered.raw._sock
        self._resize = resize
        self.pending = b""
        self.sock.setblocking(False)
        try:
            self.pending = buffered.read1(1 << 20) or b""
        except (BlockingIOError, OSError, ValueError):
            self.pending = b""
        finally:
            self.sock.setblocking(True)  # and no timeout: containers may be quiet for hours

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int) -> bytes:
        if self.pending:
            data, self.pending = self.pending[:n], self.pending[n:]
            return data
        try:
            return self.sock.recv(n)
        except OSError:
            return b""

    def recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def resize_pty(self, width: int, height: int) -> None:
        if self._resize is not None:
            with contextlib.suppress(Exception):
                self._resize(height, width)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(Exception):
            self.response.close()


def attach(api: Any, container: str, *, stdin: bool, stdout: bool = True, stderr: bool = True,
           logs: bool = False, detach_keys: str | None = None) -> Hijacked:
    params: dict[str, Any] = {"stdin": int(stdin), "stdout": int(stdout), "stderr": int(stderr), "stream": 1,
                              "logs": int(logs)}
    if detach_keys:  # the engine watches too: it must know ours, or it would stop at its default ones
        params["detachKeys"] = detach_keys
    res = api._post(api._url("/containers/{0}/attach", container), params=params, stream=True, headers=UPGRADE)
    api._raise_for_status(res)
    return Hijacked(res, lambda h, w: api.resize(container, h, w))


def exec_start(api: Any, exec_id: str, *, tty: bool) -> Hijacked:
    data: dict[str, Any] = {"Tty": tty, "Detach": False}
    size = terminal_size() if tty else None
    if size:
        data["ConsoleSize"] = list(size)
    res = api._post_json(api._url("/exec/{0}/start", exec_id), headers=UPGRADE, data=data, stream=True)
    api._raise_for_status(res)
    return Hijacked(res, lambda h, w: api.exec_resize(exec_id, height=h, width=w))


# --- frames -------------------------------------------------------------------------------
def frames(read: Callable[[int], bytes], tty: bool) -> Iterator[tuple[int, bytes]]:
    """(stream, data) pairs: 1 stdout, 2 stderr. A TTY stream is raw, all stdout."""
    if tty:
        while data := read(65536):
            yield 1, data
        return
    while True:
        header = read(8)
        if len(header) < 8:
            return
        stream, length = struct.unpack(">BxxxL", header)
        data = read(length) if length else b""
        if length and not data:
            return
        yield stream, data


def copy_frames(frames_iter: Iterator[tuple[int, bytes]], out: IO[bytes] | None = None,
                err: IO[bytes] | None = None) -> None:
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    for stream, data in frames_iter:
        f = err if stream == 2 else out
        try:
            f.write(data)
            f.flush()
        except BrokenPipeError:
            return


def pump_stdin(h: Hijacked) -> threading.Thread:
    """Copy our stdin into the stream until EOF, then half-close it."""
    def run() -> None:
        try:
            fd = sys.stdin.fileno()
            while data := os.read(fd, 65536):
                h.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            h.shutdown_write()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def terminal_size() -> tuple[int, int] | None:
    """Our terminal's (rows, columns) for the engine's ConsoleSize, so that the process's
    terminal has it from its first instruction; None when stdout is not a terminal."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return (size.lines, size.columns) if size.lines and size.columns else None


def stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:
        return False


def interactive(h: Hijacked, detach_keys: str | None = None) -> bool:
    """The local terminal in raw mode, pumped to and from the stream (SIGWINCH resizes).
    True if the user detached (typed the detach keys)."""
    from agent.detach_keys import parse
    from desktop import terminal

    cols, rows = shutil.get_terminal_size()
    h.resize_pty(width=cols, height=rows)
    if h.pending:
        os.write(sys.stdout.fileno(), h.pending)
        h.pending = b""
    return terminal.attach(h, parse(detach_keys))


def stream(h: Hijacked, *, tty: bool, stdin: bool, detach_keys: str | None = None) -> bool:
    """Run one attached session to its end: interactive when we have a TTY on both ends,
    else demultiplexed output with stdin piped in if asked. True if the user detached."""
    if tty and stdin and stdin_is_tty():
        return interactive(h, detach_keys)
    if stdin:
        pump_stdin(h)
    copy_frames(frames(h.recv_exactly if not tty else h.recv, tty))
    return False


# --- pull ---------------------------------------------------------------------------------
LAYER_STATUSES_QUIET = {"Downloading", "Extracting", "Verifying Checksum", "Waiting"}


def pull(api: Any, repo: str, tag: str | None, *, platform: str | None = None,
         auth_config: dict[str, str] | None = None, file: IO[str] | None = None,
         fancy: bool | None = None) -> str | None:
    """Pull with one progress bar per layer (a plain, docker-like log when not on a terminal).
    Returns the stream's error message, or None when the pull succeeded."""
    from rich.console import Console

    file = file or sys.stdout
    console = Console(file=file, highlight=False, soft_wrap=True)
    if fancy is None:
        fancy = console.is_terminal
    kw: dict[str, Any] = {"stream": True, "decode": True}
    if platform:
        kw["platform"] = platform
    if auth_config:
        kw["auth_config"] = auth_config
    events = api.pull(repo, tag or None, **kw)
    if not fancy:
        return _pull_plain(events, file)
    return _pull_fancy(events, console)


def _pull_plain(events: Iterator[dict[str, Any]], file: IO[str]) -> str | None:
    for ev in events:
        if ev.get("error"):
            return str(ev.get("error"))
        status = ev.get("status") or ""
        if status in LAYER_STATUSES_QUIET:
            continue
        line = f"{ev['id']}: {status}" if ev.get("id") else status
        print(line, file=file, flush=True)
    return None


def _pull_fancy(events: Iterator[dict[str, Any]], console: Any) -> str | None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    progress = Progress(TextColumn("{task.fields[layer]}"), TextColumn("{task.description:<18}"),
                        BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=False)
    tasks: dict[str, Any] = {}
    with progress:
        for ev in events:
            if ev.get("error"):
                return str(ev.get("error"))
            status = ev.get("status") or ""
            layer = ev.get("id")
            detail = ev.get("progressDetail") or {}
            if not layer or status.startswith("Pulling from"):
                progress.console.print(f"{layer}: {status}" if layer else status)
                continue
            task = tasks.get(layer)
            if task is None:
                task = tasks[layer] = progress.add_task(status, layer=layer, total=None)
            if status == "Downloading" and detail.get("total"):
                progress.update(task, description=status, total=detail["total"], completed=detail.get("current", 0))
            elif status in ("Download complete", "Already exists", "Pull complete"):
                t = progress.tasks[task].total
                progress.update(task, description=status, total=t or 1, completed=t or 1)
            else:
                progress.update(task, description=status)
    return None
