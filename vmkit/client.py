"""The daemon's clients (CLI, tray) talk to it through this module only."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from vmkit import transport
from vmkit.errors import AlreadyRunning, DaemonError, LaunchError, NotRunning, VMKitError
from vmkit.paths import VMPaths
from vmkit.run import spawn
from vmkit.status import read_status

log = logging.getLogger(__name__)

Event = dict[str, Any]


def daemon_command(name: str, adopt: bool = False, debug: bool = False, image_dir: str | None = None) -> list[str]:
    """How to run the daemon: the frozen app re-runs itself, a source install runs the module."""
    if getattr(sys, "frozen", False):
        cmd = [sys.executable, "_daemon"]
    else:
        cmd = [sys.executable, "-m", "vmkit.daemon"]
    cmd += ["--name", name]
    if adopt:
        cmd.append("--adopt")
    if image_dir:
        cmd += ["--image", image_dir]
    if debug:
        cmd.append("--debug")
    return cmd


class DaemonClient:
    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.paths = VMPaths(name)

    def _connect(self, timeout: float = 5.0) -> socket.socket:
        try:
            return transport.connect(self.paths.control, timeout=timeout)
        except OSError as exc:
            raise NotRunning(f"pydesk VM {self.name!r} is not running",
                             hint="start it with `pydesk vm start`") from exc

    def reachable(self) -> bool:
        try:
            self._connect(timeout=2).close()
            return True
        except NotRunning:
            return False

    def request(self, op: str, timeout: float | None = 300.0, **fields: Any) -> dict[str, Any]:
        sock = self._connect()
        try:
            sock.settimeout(timeout)
            sock.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
            line = sock.makefile("rb").readline()
        except OSError as exc:
            raise DaemonError(f"the pydesk daemon stopped answering: {exc}") from exc
        finally:
            if op != "ssh":
                sock.close()
        if not line:
            raise DaemonError("the pydesk daemon closed the connection without an answer")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise VMKitError.from_dict(reply.get("error") or {})
        return reply

    def status(self) -> dict[str, Any]:
        return self.request("status", timeout=30)["status"]

    def stop(self, standby: bool = True) -> dict[str, Any]:
        """Stop the VM; with ``standby`` the engine socket keeps answering "not running"
        (vmkit/standby.py)."""
        pid = read_status(self.paths).get("daemon_pid")
        reply = self.request("stop", timeout=120, standby=standby)
        if pid:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).wait(10)
        return reply

    def open_ssh(self) -> socket.socket:
        """A stream to a fresh sshd in the guest (see AgentChannel.open_inner_sshd)."""
        sock = self._connect()
        sock.sendall(b'{"op": "ssh"}\n')
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise DaemonError("the pydesk daemon closed the connection")
            line += chunk
        reply = json.loads(line)
        if not reply.get("ok"):
            sock.close()
            raise VMKitError.from_dict(reply.get("error") or {})
        return sock


def qemu_alive(name: str) -> bool:
    """True if a QEMU of ours is still running for this VM (e.g. after the daemon died).
    A pidfile whose pid is gone, or now belongs to another program (after a host crash and
    reboot), is stale and removed."""
    paths = VMPaths(name)
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and \
                any(str(paths.pidfile) in arg for arg in proc.cmdline()):
            return True
    except psutil.Error:
        pass
    paths.pidfile.unlink(missing_ok=True)
    return False


def start_daemon(name: str, on_event: Callable[[Event], None], *, adopt: bool = False,
                 debug: bool = False, image_dir: str | None = None) -> dict[str, Any]:
    """Spawn the daemon and relay its progress until the VM is ready; returns its status."""
    paths = VMPaths(name).ensure()
    proc = spawn(daemon_command(name, adopt=adopt, debug=debug, image_dir=image_dir), stdout=subprocess.PIPE, detach=True)
    assert proc.stdout is not None
    ready: dict[str, Any] | None = None
    error: VMKitError | None = None
    for raw in proc.stdout:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        on_event(event)
        if event.get("event") == "ready":
            ready = event.get("status", {})
            break
        if event.get("event") == "error":
            error = VMKitError.from_dict(event.get("error") or {})
            break
    proc.stdout.close()
    if error is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        raise error
    if ready is None:
        rc = proc.wait(10)
        raise LaunchError(f"the pydesk daemon exited during start (status {rc})",
                          hint=f"see {paths.daemon_log}")
    return ready


def ensure_daemon(name: str, on_event: Callable[[Event], None] | None = None) -> DaemonClient:
    """A client for a running VM; reattaches a new daemon if the old one died but QEMU lives."""
    client = DaemonClient(name)
    if client.reachable():
        return client
    if qemu_alive(name):
        try:
            start_daemon(name, on_event or (lambda e: None), adopt=True)
        except AlreadyRunning:
            # Another client is reattaching right now; wait for it.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not client.reachable():
                time.sleep(0.2)
        return client
    raise NotRunning(f"pydesk VM {name!r} is not running", hint="start it with `pydesk vm start`")
