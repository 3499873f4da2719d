"""The engine endpoint while the VM is stopped.

Docker clients keep pointing at pydesk's engine endpoint (``DOCKER_HOST``, the ``pydesk``
docker context) after the VM stops. Without a listener they would print Docker's generic
"Cannot connect to the Docker daemon"; this small process keeps the endpoint — the unix
socket ``engine.sock`` (same path, mode 0600), or on Windows the named pipe (same name, same
user-only ACL; ``vmkit/engine_endpoint.py``) — and answers every Engine API request with
HTTP 503 and Docker's JSON error shape, so ``docker ps`` prints "pydesk VM is not running —
start it with `pydesk vm start`" at once.

The daemon starts it when it shuts down and stops it (by the pid in ``standby.pid``) when it
starts; it also exits by itself as soon as the endpoint stops being its own: on POSIX when
a daemon bound a new socket there or the file was removed, on Windows (where nobody can take
a pipe name that is held) when ``standby.pid`` no longer names it. ``pydesk vm stop --quit``
ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from vmkit.engine_endpoint import engine_listener
from vmkit.errors import PipeInUse
from vmkit.paths import VMPaths
from vmkit.run import spawn
from vmkit.transport import Listener, connect, endpoint_exists, use_unix_sockets

log = logging.getLogger(__name__)

MESSAGE = "pydesk VM is not running — start it with `pydesk vm start`"
MARKER = "vmkit.standby"
CHECK_EVERY = 1.0
PIPE_WAIT = 10.0  # Windows: how long to wait for the exiting daemon to let go of the pipe's name


def command(name: str) -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable, "_standby", "--name", name]
    return [sys.executable, "-m", MARKER, "--name", name]


def start(name: str) -> None:
    """Start the standby for VM ``name`` (detached)."""
    try:
        spawn(command(name), detach=True)
    except OSError as exc:
        log.warning("could not start the engine socket standby: %s", exc)


def running_pid(paths: VMPaths) -> int | None:
    try:
        pid = int(paths.standby_pid.read_text().strip())
        if any(MARKER in arg or arg == "_standby" for arg in psutil.Process(pid).cmdline()):
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def stop(paths: VMPaths, timeout: float = 5.0) -> bool:
    """End the standby of this VM, if one runs; returns whether one did."""
    pid = running_pid(paths)
    if pid is None:
        paths.standby_pid.unlink(missing_ok=True)
        return False
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
    paths.standby_pid.unlink(missing_ok=True)
    return True


def _answer(conn: Any) -> None:
    """Read one request head and answer 503 with the message; then close."""
    body = json.dumps({"message": MESSAGE}).encode()
    with contextlib.suppress(OSError), conn:
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Api-Version: 1.44\r\nOstype: linux\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def serve(name: str, *, platform: str = sys.platform, api: Any = None,
          stopping: threading.Event | None = None) -> int:
    """Answer on VM ``name``'s engine endpoint until told to stop. ``api`` is the Win32 pipe
    boundary (tests pass a fake); ``stopping`` ends it from another thread (tests)."""
    paths = VMPaths(name).ensure()
    if running_pid(paths) not in (None, os.getpid()):
        return 0  # another standby already answers
    if endpoint_exists(paths.control, platform) and _alive(paths.control, platform):
        return 0  # a daemon owns the VM (and the engine endpoint)
    stopping = stopping if stopping is not None else threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: object) -> None:
            stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        if use_unix_sockets(platform):
            _serve_socket(paths, stopping)
        else:
            _serve_pipe(paths, stopping, api)
    finally:
        if _pid_in_file(paths) == os.getpid():
            paths.standby_pid.unlink(missing_ok=True)
    return 0


def _serve_pipe(paths: VMPaths, stopping: threading.Event, api: Any) -> None:
    # the pid first: a daemon starting while we wait for the name can stop us by it
    paths.standby_pid.write_text(f"{os.getpid()}\n")
    try:
        listener = engine_listener(paths, "win32", wait=PIPE_WAIT, api=api)
    except PipeInUse as exc:
        log.warning("standby: %s", exc)
        return

    def accept_loop() -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError:
                break
            threading.Thread(target=_answer, args=(conn,), daemon=True).start()
        stopping.set()

    threading.Thread(target=accept_loop, name="standby-accept", daemon=True).start()
    while not stopping.wait(CHECK_EVERY):
        if _pid_in_file(paths) != os.getpid():
            break  # someone took standby.pid away: not ours to answer any more
    listener.close()


def _pid_in_file(paths: VMPaths) -> int | None:
    try:
        return int(paths.standby_pid.read_text().strip())
    except (OSError, ValueError):
        return None


def _serve_socket(paths: VMPaths, stopping: threading.Event) -> None:
    listener = Listener(paths.engine)
    ino = os.stat(paths.engine).st_ino
    paths.standby_pid.write_text(f"{os.getpid()}\n")
    listener.sock.settimeout(CHECK_EVERY)
    owned = True
    while not stopping.is_set():
        try:
            conn, _ = listener.sock.accept()
        except TimeoutError:
            try:
                owned = os.stat(paths.engine).st_ino == ino
            except OSError:
                owned = False
            if not owned:
                break
            continue
        except OSError:
            break
        threading.Thread(target=_answer, args=(conn,), daemon=True).start()
    if owned:
        listener.close()
    else:
        listener.sock.close()


def _alive(sock_path: os.PathLike[str], platform: str = sys.platform) -> bool:
    try:
        s = connect(Path(sock_path), timeout=2, platform=platform)
    except OSError:
        return False
    s.close()
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pydesk-standby")
    p.add_argument("--name", default="default")
    args = p.parse_args(argv)
    return serve(args.name)


if __name__ == "__main__":
    sys.exit(main())
