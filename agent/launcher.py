"""crun, started before the container it will run.

`crun run` does most of its work before it reads its config: the exec, the dynamic loader
mapping and relocating eleven shared libraries (whose code QEMU translates afresh in every
process, since address-space randomisation puts it somewhere new each time) and libcrun's own
set-up. In this emulated guest, `crun run` of a prepared bundle took 155 ms from its exec to
its exit, and 108 ms from the moment its config was handed to a crun started earlier and
waiting for it (2026-12-04, medians of 15, interleaved). Started by the container's start,
that part is on the start's path, even though the engine's own preparation overlaps it.

The Launcher keeps ``SPARES`` cruns that are past it: each was started as
``crun run --bundle <dir> <id>`` in a directory of its own under ``LAUNCH_DIR``, and waits in
open() on ``<dir>/config.json``, a named pipe (runtime.ConfigPipe). A start takes one
(``take``), prepares the container and serves its config (whose paths are all absolute), and
that crun goes straight on to create the container. Since it was started before its
container was known, crun knows the container by the launch's id (``pydesk-<hex>``), which the
engine keeps as ``Container.runtime_id`` for every later crun call (kill, exec, pause,
delete). Its pid file (a ``PidFifo``) and its ``--log`` file are in the launch's directory too;
the directory goes once the container's exit is cleaned up (``release``).

Only a plain start takes a waiting crun: one with a terminal or an open stdin has its crun
started for it, as before, since crun's stdio is chosen at its exec. So does a start that
finds none waiting. Topping up is the engine's call (``fill``), at quiet moments: each crun
started costs ~45 ms of guest CPU, which a start in progress would share two vCPUs with.
A waiting crun holds ~2 MB (~270 KB of its own) and no CPU.

An engine that was killed leaves its waiting cruns behind (re-parented to init) with their
directories: ``sweep`` lets each through its pipe with nothing to read, which it refuses as a
config and exits, and removes the directories. The states of containers that ran under that
engine are the engine's to kill (Engine.startup).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent import runtime
from agent.containers import Process

log = logging.getLogger(__name__)

LAUNCH_DIR = Path("/run/pydesk/launch")
SPARES = 4  # cruns kept waiting: a burst of starts up to this many takes no new one
ID_PREFIX = "pydesk-"


class Launch:
    """One `crun run`, started, waiting for its config (a context manager around the start
    that uses it: leaving it closes the config and pid pipes)."""

    def __init__(self, *, tty: bool = False, stdin: bool = False, root: Path = LAUNCH_DIR) -> None:
        self.id = ID_PREFIX + secrets.token_hex(6)
        self.dir = root / self.id
        self.dir.mkdir(parents=True)
        self.crun_log = self.dir / "crun.log"
        self.pid_fifo = PidFifo(self.dir / "init.pid").__enter__()
        self.config = runtime.ConfigPipe(self.dir).__enter__()
        argv = [runtime.CRUN, "--root", runtime.CRUN_ROOT, f"--log=file:{self.crun_log}", "run",
                "--pid-file", str(self.pid_fifo.path), "--bundle", str(self.dir), self.id]
        try:
            self.proc = Process(argv, tty=tty, stdin=stdin, console_dir=self.dir, on_output=None, connect=False)
        except BaseException:
            self._close_pipes()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_pipes()

    def _close_pipes(self) -> None:
        self.config.__exit__(None, None, None)
        self.pid_fifo.__exit__(None, None, None)

    def waiting(self) -> bool:
        """crun is still there (waiting for its config)."""
        return self.proc.proc.poll() is None

    def discard(self) -> None:
        """End a launch no container took: its crun is killed, its directory removed."""
        self.proc.kill()
        self._close_pipes()
        shutil.rmtree(self.dir, ignore_errors=True)


class Launcher:
    def __init__(self, spares: int = SPARES, root: Path = LAUNCH_DIR) -> None:
        self.spares = spares
        self.root = root
        self._lock = threading.Lock()  # the list of waiting launches
        self._fill_lock = threading.Lock()  # one filler at a time
        self._waiting: list[Launch] = []
        self._closed = False

    def take(self, tty: bool = False, stdin: bool = False) -> Launch:
        """A crun for a start: a waiting one if the start is a plain one and one is waiting,
        else one started now."""
        if not tty and not stdin:
            while True:
                with self._lock:
                    launch = self._waiting.pop(0) if self._waiting else None
                if launch is None:
                    break
                if launch.waiting():
                    return launch
                log.warning("a waiting crun (%s) had exited; starting another", launch.id)
                launch.discard()
        return Launch(tty=tty, stdin=stdin, root=self.root)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def fill(self, count: int | None = None, while_: Callable[[], bool] | None = None) -> None:
        """Start cruns until ``count`` (default ``spares``) wait; after the first, only as long as
        ``while_()`` holds. Slow: call it off the requests' paths."""
        count = self.spares if count is None else count
        with self._fill_lock:
            first = True
            while self.waiting() < count and (first or while_ is None or while_()):
                first = False
                try:
                    launch = Launch(root=self.root)
                except OSError as exc:
                    log.warning("could not start a crun ahead: %s", exc)
                    return
                with self._lock:
                    if not self._closed:
                        self._waiting.append(launch)
                        continue
                launch.discard()
                return

    def release(self, runtime_id: str) -> None:
        """A launch's directory, once its container has exited and crun's state is gone."""
        if runtime_id.startswith(ID_PREFIX):
            shutil.rmtree(self.root / runtime_id, ignore_errors=True)

    def close(self) -> None:
        """End every waiting crun (the engine is stopping)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
        for launch in waiting:
            launch.discard()

    def sweep(self) -> None:
        """What an earlier engine left: its waiting cruns are let go, the directories removed."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            let_through(d / "config.json")
            shutil.rmtree(d, ignore_errors=True)


def let_through(fifo: Path) -> bool:
    """Open ``fifo`` for writing and close it at once: a reader waiting in open() goes on and
    reads end-of-file. False if nobody was waiting (or it is not a pipe)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.ENOENT, errno.ENOTDIR):
            log.debug("could not open %s: %s", fifo, exc)
        return False
    os.close(fd)
    return True


class PidFifo:
    """crun's --pid-file as a named pipe: the start hears the container's pid the moment crun
    writes it (crun opens the path, writes the number, closes it), where polling a file costs
    wake-ups of the engine while crun works, and up to a poll interval of latency."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> PidFifo:
        self.path.unlink(missing_ok=True)
        os.mkfifo(self.path, 0o600)
        # a reader that never blocks: crun's open for writing succeeds at once, and until crun
        # has opened it, the pipe is neither readable nor hung up
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)  # a stale pipe must not be mistaken for a pid file

    def wait(self, crun: subprocess.Popen[bytes], timeout: float) -> int:
        """The pid crun wrote, once it has closed the pipe; 0 if crun exited (or the timeout
        passed) without writing one."""
        data = b""
        deadline = time.monotonic() + timeout
        with contextlib.ExitStack() as stack:
            watch = [self._fd]
            try:
                pidfd = os.pidfd_open(crun.pid)
                stack.callback(os.close, pidfd)
                watch.append(pidfd)
            except OSError:  # crun has been reaped already (it failed at once)
                pidfd = -1
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select(watch, [], [], left)
                if self._fd in ready:
                    chunk = os.read(self._fd, 64)
                    if chunk:
                        data += chunk
                        continue
                    break  # crun closed it: the number is whole
                if pidfd in ready or pidfd < 0:
                    data += _read_nonblocking(self._fd)  # it may have written just before it exited
                    break
        text = data.decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0


def exit_status(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """``proc``'s exit status once it has exited (None if it is still running after
    ``timeout``). Not ``poll``: while another thread waits on the process, ``poll`` answers
    None even after the exit, until that thread has noted it."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _read_nonblocking(fd: int) -> bytes:
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""
