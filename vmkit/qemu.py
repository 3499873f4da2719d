"""One QEMU process and its QMP monitor.

Launch follows QEMU's own machine.py: pre-launch (disk, keys, stale files, free ports),
launch (a detached process that outlives the daemon, so a fresh daemon can adopt it), and
post-launch (connect QMP). Shutdown is gentle, then forceful, then an error: the caller's
gentle step (the agent powers the guest off), ACPI powerdown, QMP ``quit``, and finally
SIGKILL, each with its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmkit.argv import qemu_argv
from vmkit.errors import HostError, LaunchError, PortInUse
from vmkit.host import Host
from vmkit.run import run, spawn
from vmkit.spec import Protocol, VMSpec

log = logging.getLogger(__name__)


class RunState(enum.StrEnum):
    IDLE = "idle"
    LAUNCHING = "launching"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


class Monitor:
    """A synchronous face on qemu.qmp's asyncio client, on a private event-loop thread."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._client.logger = log.getChild(name)

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, address: str | tuple[str, int], timeout: float = 10.0) -> None:
        self._call(self._client.connect(address), timeout)

    def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return self._call(self._client.execute(cmd, args), timeout)

    def hmp(self, command: str, timeout: float = 10.0) -> str:
        return self.execute("human-monitor-command", {"command-line": command}, timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._client.disconnect(), 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def check_ports_free(spec: VMSpec) -> None:
    for p in spec.ports:
        kind = socket.SOCK_DGRAM if p.protocol is Protocol.UDP else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((p.host_ip, p.host_port))
            except OSError as exc:
                raise PortInUse(f"host port {p.host_ip}:{p.host_port}/{p.protocol} is already in use",
                                hint="stop what uses it, or change the port in settings / --port") from exc


def create_data_disk(host: Host, path: Path, size_gib: int) -> bool:
    """Create the qcow2 data disk on first start; returns True if it was created."""
    if path.exists():
        return False
    tmp = path.with_suffix(".tmp")
    run([host.qemu_img(), "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", tmp, f"{size_gib}G"])
    os.replace(tmp, path)
    return True


class QemuProcess:
    """A running (or adopted) QEMU for one VMSpec. Use as a context manager."""

    def __init__(self, spec: VMSpec, host: Host, qemu_log: Path) -> None:
        self.spec = spec
        self.host = host
        self.qemu_log = qemu_log
        self.state = RunState.IDLE
        self.pid: int | None = None
        self._popen: Any = None
        self._proc: psutil.Process | None = None
        self.monitor: Monitor | None = None
        self.exit_detail: str | None = None

    # --- launch -------------------------------------------------------------------
    def _pre_launch(self) -> None:
        check_ports_free(self.spec)
        f = self.spec.files
        for ep in (f.qmp, f.agent, f.engine_port):
            if ep is not None and ep.path:
                Path(ep.path).unlink(missing_ok=True)
        Path(f.pidfile).unlink(missing_ok=True)
        log_path = Path(f.console_log)
        if log_path.exists():
            os.replace(log_path, log_path.with_suffix(".log.1"))

    def launch(self) -> None:
        self.state = RunState.LAUNCHING
        self._pre_launch()
        argv = qemu_argv(self.spec, self.host)
        with open(self.qemu_log, "wb") as err:
            self._popen = spawn(argv, stdout=err, stderr=err, detach=True)
        self.pid = self._popen.pid
        self._proc = psutil.Process(self.pid)
        try:
            self._post_launch()
        except BaseException:
            self.kill()
            raise
        self.state = RunState.RUNNING

    def _post_launch(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            if self._popen is not None and self._popen.poll() is not None:
                raise LaunchError(f"QEMU exited at start: {self.last_error() or f'status {self._popen.returncode}'}",
                                  hint="see `pydesk vm logs`")
            qmp_path = self.spec.files.qmp.path
            if qmp_path and not Path(qmp_path).exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # not there yet: qemu.qmp would log each refused attempt as an error
                continue
            try:
                self._connect_monitor()
                return
            except (OSError, QMPError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise LaunchError(f"QEMU's monitor did not answer: {exc}") from exc
                time.sleep(0.02)

    def _connect_monitor(self) -> None:
        qmp = self.spec.files.qmp
        monitor = Monitor(f"qmp-{self.spec.name}")
        try:
            monitor.connect(qmp.path if qmp.path else (qmp.host, qmp.port or 0), timeout=5)
        except BaseException:
            monitor.close()
            raise
        self.monitor = monitor

    def adopt(self, pid: int) -> None:
        """Take over a QEMU a previous daemon started."""
        self.pid = pid
        self._proc = psutil.Process(pid)
        self._connect_monitor()
        self.state = RunState.RUNNING

    def last_error(self) -> str:
        try:
            lines = [ln for ln in self.qemu_log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    # --- status ---------------------------------------------------------------------
    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self._proc is not None and self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for QEMU to exit; True if it did."""
        try:
            if self._popen is not None:
                self._popen.wait(timeout)
            elif self._proc is not None:
                self._proc.wait(timeout)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            return False
        except psutil.NoSuchProcess:
            pass
        self.state = RunState.EXITED
        return True

    def describe_exit(self) -> str:
        if self._popen is not None and self._popen.returncode is not None:
            rc = self._popen.returncode
            if rc < 0:
                return f"QEMU was killed by {signal.Signals(-rc).name}"
            err = self.last_error()
            return f"QEMU exited with status {rc}" + (f": {err}" if rc and err else "")
        # An adopted QEMU is not our child: its exit status is not ours to collect.
        return "QEMU stopped unexpectedly (killed or crashed)"

    # --- shutdown -----------------------------------------------------------------------
    def shutdown(self, gentle: Callable[[], None] | None = None, *, gentle_timeout: float = 15.0,
                 gentle_progress: Callable[[], object] | None = None, gentle_max: float = 60.0,
                 acpi_timeout: float = 10.0, quit_timeout: float = 5.0,
                 on_missed: Callable[[str], None] | None = None) -> str:
        """Stop QEMU; returns which step did it. Raises HostError if even SIGKILL fails.

        After ``gentle`` (the guest's own poweroff), QEMU gets ``gentle_timeout`` seconds to
        exit, and again as long as ``gentle_progress()`` changed in the last such window (a
        guest still flushing its disk), up to ``gentle_max`` in all: a slow flush is waited
        for, a guest that stopped moving is not. ``on_missed(step)`` runs when the agent or
        ACPI step did not stop the guest (to record its state while it is still there)."""
        self.state = RunState.STOPPING
        steps: list[tuple[str, Callable[[], None], Callable[[], bool]]] = []
        if gentle is not None:
            steps.append(("agent", gentle, lambda: self._wait_while_moving(gentle_timeout, gentle_progress, gentle_max)))
        steps.append(("acpi", lambda: self._qmp("system_powerdown"), lambda: self.wait(acpi_timeout)))
        steps.append(("quit", lambda: self._qmp("quit"), lambda: self.wait(quit_timeout)))
        for name, action, wait in steps:
            if not self.alive():
                return name
            try:
                action()
            except Exception as exc:  # a failed step falls through to the next, stronger one
                log.info("shutdown step %s failed: %s", name, exc)
            else:
                if wait():
                    log.info("QEMU stopped by %s", name)
                    return name
                log.info("QEMU still running after %s", name)
            if on_missed is not None and name != "quit" and self.alive():
                on_missed(name)
        self.kill()
        if not self.wait(5):
            raise HostError(f"QEMU (pid {self.pid}) did not die after SIGKILL")
        return "kill"

    def _wait_while_moving(self, window: float, progress: Callable[[], object] | None, limit: float) -> bool:
        """Wait for QEMU to exit, ``window`` seconds at a time while ``progress()`` keeps
        changing, ``limit`` seconds at most; True if it exited."""
        deadline = time.monotonic() + limit
        last = progress() if progress is not None else None
        while True:
            if self.wait(max(0.0, min(window, deadline - time.monotonic()))):
                return True
            if progress is None or time.monotonic() >= deadline:
                return False
            now = progress()
            if now == last:
                return False
            log.info("the guest is still shutting down (%s); waiting", now)
            last = now

    def _qmp(self, cmd: str) -> None:
        if self.monitor is None:
            raise LaunchError("no QMP connection")
        self.monitor.execute(cmd, timeout=5)

    def kill(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, AttributeError):
            if self._popen is not None:
                self._popen.kill()
            elif self._proc is not None:
                self._proc.kill()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if not self.alive():
            f = self.spec.files
            for ep in (f.qmp, f.agent, f.engine_port):
                if ep is not None and ep.path:
                    Path(ep.path).unlink(missing_ok=True)
            Path(f.pidfile).unlink(missing_ok=True)

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
