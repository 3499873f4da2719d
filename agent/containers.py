"""Containers: their records on the data disk and their lifecycle around crun.

Each running container has a foreground ``crun run`` as its parent (the job conmon does for
Podman): crun reaps everything in the container and exits with its status, so the engine
keeps no zombies and needs no subreaper tricks. Output goes through pipes (or a pty) that
we read into the json-file log and to attached clients.
"""

from __future__ import annotations

import array
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import runtime, workers
from agent.logs import LogFile, now_rfc3339

log = logging.getLogger(__name__)

ZERO_TIME = "0001-01-01T00:00:00Z"

SIGNALS = {name[3:]: int(getattr(signal, name)) for name in dir(signal)
           if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(getattr(signal, name), int)}


def parse_signal(value: str | int | None, default: int = signal.SIGTERM) -> int:
    if value in (None, ""):
        return default
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    name = str(value).upper()
    name = name[3:] if name.startswith("SIG") else name
    if name not in SIGNALS:
        raise ValueError(f"invalid signal: {value}")
    return SIGNALS[name]


def new_id() -> str:
    return secrets.token_hex(32)


RECORD = "config.v2.json"


def write_record(root: Path, data: bytes) -> None:
    """``root``/config.v2.json, replaced in one rename."""
    tmp = root / f"{RECORD}.tmp"
    runtime.write_file(tmp, data)
    os.replace(tmp, root / RECORD)


class RecordWriter:
    """Writes containers' records on a thread of its own, the latest one per container.

    A record write is a file write and a rename on the data disk: ~8 ms in this emulated
    guest, and a `docker run` saves its container's record three times (create, start,
    exit), each time on the path of a request that a client waits for. Here the request only
    serialises the record (so what is written is what the request saw) and goes on; the
    write overlaps the next round trip. A record still waiting when the next one for the same
    container comes is replaced by it. ``flush`` waits for everything submitted, which the
    engine does before it exits. The records were never synced to the disk (neither are
    Docker's), so what a crash of the VM could lose is unchanged; a killed engine loses at
    most the writes of its last few milliseconds, which are also what a synchronous write
    could lose.

    A removed container's record is not written any more: ``drop`` forgets one still waiting
    (the engine calls it as it moves the directory to the trash), and a removed container's
    ``save`` submits nothing. A write already under way when the directory moves fails (or
    lands in the trash) and is dropped silently.
    """

    def __init__(self, write: Callable[[Path, bytes], None] = write_record) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._pending: dict[Path, bytes] = {}
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, root: Path, data: bytes) -> None:
        with self._cond:
            self._pending[root] = data
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="records", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drop(self, root: Path) -> None:
        """Forget the record waiting for ``root``, if any (its container is being removed)."""
        with self._cond:
            if self._pending.pop(root, None) is not None:
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is written; False on a timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                root = next(iter(self._pending))
                data = self._pending.pop(root)
                self._busy = True
            try:
                self._write(root, data)
            except OSError as exc:
                if root.is_dir():  # (not a container removed meanwhile)
                    log.error("could not write the record in %s: %s", root, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


RECORDS = RecordWriter()


class Container:
    """One container's record (what ``inspect`` shows) plus its live process state."""

    def __init__(self, root: Path, record: dict[str, Any]) -> None:
        self.root = root  # containers/<id>/
        self.r = record
        self.lock = threading.RLock()
        self.exited = threading.Condition(self.lock)
        self.exit_seq = 0  # bumped at every exit; `wait` watches it
        self.logfile: LogFile | None = None
        self.stdin_w: int | None = None
        self.pty_master: int | None = None
        self.stopping = False  # stopped by request: no restart
        self.restart_timer: threading.Timer | None = None
        self.removed = False
        self.cleaned = threading.Event()  # cleared from an exit until its clean-up is done (engine._reap)
        self.cleaned.set()
        self.cleanup_lock = threading.Lock()  # held by whoever does that clean-up
        self.gone = threading.Event()  # set once a removal has unmounted and deleted its tree
        # crun's name for it: a start's crun is started ahead of it (agent/launcher.py), under an
        # id of its own; the container's id until its first start in this engine
        self.runtime_id = self.id

    # --- identity -------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.r["Id"]

    @property
    def name(self) -> str:
        return self.r["Name"].lstrip("/")

    @property
    def state(self) -> dict[str, Any]:
        return self.r["State"]

    @property
    def running(self) -> bool:
        return bool(self.state.get("Running"))

    @property
    def tty(self) -> bool:
        return bool(self.r["Config"].get("Tty"))

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.id}-json.log"

    def save(self) -> None:
        """Have the record written (by ``RECORDS``, soon): what it holds now, as the caller sees
        it, is what gets written. Nothing, once the container is removed."""
        if self.removed:
            return
        RECORDS.submit(self.root, json.dumps(self.r).encode())

    @classmethod
    def load(cls, root: Path) -> Container:
        return cls(root, json.loads((root / RECORD).read_text()))

    def status_text(self) -> str:
        """`docker ps` STATUS column."""
        s = self.state
        if s.get("Restarting"):
            return f"Restarting ({s.get('ExitCode', 0)}) {ago(s.get('FinishedAt'))}"
        if s.get("Running"):
            return f"Up {duration(s.get('StartedAt'))}" + (" (Paused)" if s.get("Paused") else "")
        if s.get("Status") == "created":
            return "Created"
        if s.get("Status") == "dead":
            return "Dead"
        return f"Exited ({s.get('ExitCode', 0)}) {ago(s.get('FinishedAt'))}"


def _ts(value: str | None) -> float | None:
    if not value or value.startswith("0001"):
        return None
    from agent.logs import parse_time

    return parse_time(value)


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return f"{s} second{'s' if s != 1 else ''}"
    if s < 3600:
        m = s // 60
        return "About a minute" if m == 1 else f"{m} minutes"
    h = s // 3600
    return "About an hour" if h == 1 else f"{h} hours" if h < 48 else f"{h // 24} days"


def duration(since: str | None) -> str:
    t = _ts(since)
    return human_duration(time.time() - t) if t else ""


def ago(when: str | None) -> str:
    t = _ts(when)
    return f"{human_duration(time.time() - t)} ago" if t else ""


CONSOLE_DIR = Path("/run/pydesk/console")  # short: sun_path is 108 bytes
CONSOLE_WAIT = 30.0  # seconds for crun to hand over a terminal (it takes milliseconds)


def _console_listener() -> tuple[socket.socket, Path]:
    CONSOLE_DIR.mkdir(parents=True, exist_ok=True)
    path = CONSOLE_DIR / f"{secrets.token_hex(6)}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    return srv, path


def _recv_fd(srv: socket.socket, timeout: float = 30) -> int:
    """Receive the pty master crun sends to its --console-socket."""
    with srv:
        srv.settimeout(timeout)
        conn, _ = srv.accept()
        with conn:
            fds = array.array("i")
            msg, ancdata, flags, addr = conn.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                    return fds[0]
    raise OSError("crun sent no terminal")


class Process:
    """A process started by crun (a container's init, or an exec) whose stdio we own."""

    def __init__(self, argv: list[str], *, tty: bool, stdin: bool, console_dir: Path,
                 on_output: Callable[[str, bytes], None] | None, connect: bool = True) -> None:
        """Start ``argv`` (crun). With ``connect=False`` a terminal is not waited for here but
        in ``connect``: crun hands it over only once it has created the container. With no
        ``on_output`` (a crun started ahead of its container, agent/launcher.py), nothing
        reads the output until ``read_output`` says where it goes: it waits in the pipes."""
        self.tty = tty
        self.on_output = on_output
        self._pipes: dict[int, str] = {}
        self.master: int | None = None
        self.stdin_w: int | None = None
        self._fds = threading.Lock()
        self._jobs: list[workers.Job] = []
        self._console: tuple[Path, workers.Job, dict[str, Any]] | None = None
        if tty:
            srv, sock = _console_listener()
            box: dict[str, Any] = {}

            def receive() -> None:
                try:
                    box["fd"] = _recv_fd(srv)
                except OSError as exc:
                    log.warning("no terminal from crun: %s", exc)

            t = workers.spawn(receive, name="console")
            self._console = (sock, t, box)
            at = next(i for i, a in enumerate(argv) if a in ("run", "exec", "create")) + 1
            argv = argv[:at] + ["--console-socket", str(sock)] + argv[at:]
            try:
                with runtime.fixed_addresses():
                    self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE)
            except BaseException:
                self._close_console()
                raise
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), None)
            try:
                with runtime.fixed_addresses():
                    self.proc = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, close_fds=True)
            finally:
                for fd in (out_w, err_w, in_r):
                    os.close(fd)
            self.stdin_w = in_w
            self._pipes = {out_r: "stdout", err_r: "stderr"}
            if on_output is not None:
                self.read_output(on_output)
        if connect:
            self.connect()

    def read_output(self, on_output: Callable[[str, bytes], None]) -> None:
        """Have the output read from now on, and handed to ``on_output``."""
        self.on_output = on_output
        pipes, self._pipes = self._pipes, {}
        if pipes:
            self._start_reader(pipes)

    def connect(self) -> None:
        """With a terminal: wait for the one crun hands over, and read it."""
        if self._console is None:
            return
        _, t, box = self._console
        deadline = time.monotonic() + CONSOLE_WAIT
        try:
            while not t.join(0.05) and time.monotonic() < deadline:
                if self.proc.poll() is not None:  # crun failed: no terminal is coming
                    t.join(0.2)  # (one sent just before its exit is still taken)
                    break
        finally:
            self._close_console()
        if "fd" not in box:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)  # crun gave up on the terminal: it is failing, and says why as it exits
            err = self.proc.communicate(timeout=30)[1] if self.proc.poll() is not None else b""
            raise runtime.RuntimeError_(_last_line(err) or "crun did not hand over a terminal")
        self.master = box["fd"]
        self.stdin_w = self.master
        self._start_reader({self.master: "stdout"}, is_master=True)

    def _close_console(self) -> None:
        if self._console is not None:
            sock, t, _ = self._console
            self._console = None
            if not t.join(0):  # receive() still waits in accept(): a connection of our own ends it
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(sock))
            sock.unlink(missing_ok=True)

    def kill(self) -> None:
        """Kill crun before it was connected (the start failed around it, or it was never
        used) and wait for it."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._close_console()
        pipes, self._pipes = self._pipes, {}
        for fd in pipes:  # never read
            os.close(fd)
        self.close_stdin()

    def _start_reader(self, streams: dict[int, str], is_master: bool = False) -> None:
        """One worker reads every stream until its end."""
        sink = self.on_output
        assert sink is not None

        def reader() -> None:
            open_fds = dict(streams)
            try:
                with selectors.DefaultSelector() as sel:
                    for fd in open_fds:
                        sel.register(fd, selectors.EVENT_READ)
                    while open_fds:
                        for key, _ in sel.select():
                            fd = int(key.fd)
                            try:
                                data = os.read(fd, 65536)
                            except OSError:  # EIO on a pty master once the slave side is gone
                                data = b""
                            if data:
                                sink(open_fds[fd], data)
                                continue
                            sel.unregister(fd)
                            del open_fds[fd]
                            if not is_master:
                                os.close(fd)
            finally:
                if not is_master:
                    for fd in open_fds:
                        os.close(fd)

        self._jobs.append(workers.spawn(reader, name="output"))

    # The fds below are used by request threads (input, resizes) while the process's waiter
    # may close them: under ``_fds``, so that none is used after its close (its number may
    # already be another file's).

    def write_stdin(self, data: bytes) -> None:
        with self._fds:  # a copy to write on, outside the lock: the write may wait for the reader
            fd = os.dup(self.stdin_w) if self.stdin_w is not None else None
        if fd is None:
            return
        try:
            runtime.write_all(fd, data)
        finally:
            os.close(fd)

    def close_stdin(self) -> None:
        with self._fds:
            if self.stdin_w is not None and not self.tty:
                with contextlib.suppress(OSError):
                    os.close(self.stdin_w)
                self.stdin_w = None

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        with self._fds:
            if self.master is not None:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def drain(self, timeout: float = 5) -> None:
        for t in self._jobs:
            t.join(timeout)
        with self._fds:
            if self.master is not None:
                with contextlib.suppress(OSError):
                    os.close(self.master)
                self.master = None
                self.stdin_w = None


def _last_line(err: bytes | None) -> str:
    lines = (err or b"").decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def utc_now() -> str:
    return now_rfc3339()


def iso_from_epoch(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
