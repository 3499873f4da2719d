"""The engine socket while the VM is stopped.

Docker clients keep pointing at pydesk's ``engine.sock`` (``DOCKER_HOST``, the ``pydesk``
docker context) after the VM stops. Without a listener they would print Docker's generic
"Cannot connect to the Docker daemon"; this small process keeps the socket (same path, mode
0600) and answers every Engine API request with HTTP 503 and Docker's JSON error shape, so
``docker ps`` prints "pydesk VM is not running — start it with `pydesk vm start`" at once.

The daemon starts it when it shuts down and stops it (by the pid in ``standby.pid``) when it
starts; it also exits by itself as soon as the socket path stops being its own (a daemon
bound a new socket there, or the file was removed). ``pydesk vm stop --quit`` ends it.
Not used on Windows, where the engine endpoint is not a unix socket.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading

import psutil

from vmkit.paths import VMPaths
from vmkit.run import spawn
from vmkit.transport import Listener, use_unix_sockets

log = logging.getLogger(__name__)

MESSAGE = "pydesk VM is not running — start it with `pydesk vm start`"
MARKER = "vmkit.standby"
CHECK_EVERY = 1.0


def command(name: str) -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable, "_standby", "--name", name]
    return [sys.executable, "-m", MARKER, "--name", name]


def start(name: str) -> None:
    """Start the standby for VM ``name`` (detached); a no-op where it does not apply."""
    if not use_unix_sockets():
        return
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


def _answer(conn: socket.socket) -> None:
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


def serve(name: str) -> int:
    paths = VMPaths(name).ensure()
    if running_pid(paths) not in (None, os.getpid()):
        return 0  # another standby already answers
    if paths.control.exists() and _alive(paths.control):
        return 0  # a daemon owns the VM (and the engine socket)
    listener = Listener(paths.engine)
    ino = os.stat(paths.engine).st_ino
    paths.standby_pid.write_text(f"{os.getpid()}\n")
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
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
    with contextlib.suppress(OSError):
        if int(paths.standby_pid.read_text().strip()) == os.getpid():
            paths.standby_pid.unlink()
    return 0


def _alive(sock_path: os.PathLike[str]) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(os.fspath(sock_path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pydesk-standby")
    p.add_argument("--name", default="default")
    args = p.parse_args(argv)
    return serve(args.name)


if __name__ == "__main__":
    sys.exit(main())
