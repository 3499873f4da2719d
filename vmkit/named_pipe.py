r"""Windows named pipes with the surface of a socket: ``PipeListener`` and ``PipeConnection``.

The Docker Engine API endpoint on Windows is a named pipe (``\\.\pipe\pydesk_engine``), the
transport the ``docker`` CLI, docker-py and compose expect there (``npipe://``). The daemon
forwards each connection to the engine in the VM with ``transport.pump``, exactly as it does
for the unix socket, so a ``PipeConnection`` has ``recv``, ``sendall``, ``shutdown_write``,
``settimeout`` and ``close``, and a ``PipeListener`` has ``accept`` and a ``close`` that
wakes a thread blocked in ``accept``.

How each instance is made (``CreateNamedPipeW``)
    * ``PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED``, plus ``FILE_FLAG_FIRST_PIPE_INSTANCE`` on
      the listener's first instance only: if any process already has an instance of the name,
      creating fails (``PipeInUse``), so a second daemon — or another program — cannot squat
      the name and receive our clients, and we never serve someone else's pipe.
    * ``PIPE_TYPE_MESSAGE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS``,
      ``PIPE_UNLIMITED_INSTANCES``, 64 KiB buffers. The type is *message*, read as bytes: this
      is what dockerd does (go-winio's ``MessageMode``), and the only way a pipe can carry a
      half-close. A pipe has no ``shutdown(SHUT_WR)``; in a message-type pipe a zero-byte
      message reaches the reader as a zero-byte read, which go-winio (the ``docker`` CLI),
      docker-py and this module read as end of stream. So ``shutdown_write`` sends one, and
      ``echo hi | docker exec -i c cat`` sees its stdin end. Reads stay a byte stream
      (messages are not boundaries to the reader), and ``sendall(b"")`` sends nothing.
    * Security attributes from ``pipe_sddl(user_sid)``: a protected DACL that allows the
      current user and SYSTEM and denies network logons — nobody else (no Everyone, no Users).
    * There is always a listening instance: ``accept`` creates the next instance *before* it
      hands over a connected one, so a client never finds the name missing (at worst it sees
      ERROR_PIPE_BUSY for a moment, which docker's clients retry).

Why overlapped I/O
    ``pump`` reads a connection in one thread while another thread writes to it (an attach or
    exec stream carries both directions at once). On a handle opened without
    ``FILE_FLAG_OVERLAPPED`` Windows serializes all I/O on the file object: a ``ReadFile``
    blocked waiting for the client would hold up every ``WriteFile`` from the other thread,
    and the stream would deadlock. With overlapped I/O each call gets its own OVERLAPPED and
    event, so a read and a write are in flight on one handle at once. Each wait also watches
    a "closing" event, which is how ``close()`` (or a timeout) ends a blocked ``accept`` or
    ``recv`` without closing the handle under a pending operation: the waiting thread cancels
    its own operation (``CancelIoEx``), waits for the cancellation to finish (its buffer must
    outlive the operation), and only then is the handle closed.

Why ctypes
    The Win32 calls go through ``PipeApi``, a thin boundary with one method per call. The real
    one (``vmkit/named_pipe_win32.py``) uses ctypes on kernel32 and advapi32, so pydesk needs
    no new dependency (pywin32 would be one, and a large one for a PyInstaller bundle). All
    the logic here — names, flags, SDDL, which instance gets the first-instance flag, the order
    of calls, error codes to exceptions, EOF — is tested on Linux with a fake ``PipeApi``
    (``tests/unit/test_named_pipe.py``); the one end-to-end test needs a Windows host.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from types import TracebackType
from typing import Protocol

from vmkit.errors import PipeError, PipeInUse, PipeTimeout

log = logging.getLogger(__name__)

# CreateNamedPipeW dwOpenMode
PIPE_ACCESS_DUPLEX = 0x00000003
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
FILE_FLAG_OVERLAPPED = 0x40000000
# CreateNamedPipeW dwPipeMode
PIPE_TYPE_BYTE = 0x00000000
PIPE_TYPE_MESSAGE = 0x00000004
PIPE_READMODE_BYTE = 0x00000000
PIPE_WAIT = 0x00000000
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
PIPE_UNLIMITED_INSTANCES = 255

OPEN_MODE = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED
PIPE_MODE = PIPE_TYPE_MESSAGE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS
BUFFER_SIZE = 65536  # as dockerd
INFINITE = 0xFFFFFFFF

# Win32 error codes this module acts on
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_HANDLE_EOF = 38
ERROR_BROKEN_PIPE = 109
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_MORE_DATA = 234
WAIT_TIMEOUT = 258
ERROR_PIPE_CONNECTED = 535
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
ERROR_TIMEOUT = 1460

#: a read that fails with one of these is the end of the stream: the client is gone
EOF_ERRORS = frozenset({ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED, ERROR_HANDLE_EOF})

_MEANING = {
    ERROR_FILE_NOT_FOUND: ("no such pipe", errno.ENOENT),
    ERROR_ACCESS_DENIED: ("access denied", errno.EACCES),
    ERROR_INVALID_HANDLE: ("the handle is closed", errno.EBADF),
    ERROR_HANDLE_EOF: ("end of stream", errno.EPIPE),
    ERROR_BROKEN_PIPE: ("the pipe has been ended", errno.EPIPE),
    ERROR_PIPE_BUSY: ("all pipe instances are busy", errno.EBUSY),
    ERROR_NO_DATA: ("the pipe is being closed", errno.EPIPE),
    ERROR_PIPE_NOT_CONNECTED: ("no process is on the other end of the pipe", errno.EPIPE),
    WAIT_TIMEOUT: ("timed out", errno.ETIMEDOUT),
    ERROR_TIMEOUT: ("timed out", errno.ETIMEDOUT),
    ERROR_OPERATION_ABORTED: ("the pipe was closed", errno.ECONNABORTED),
}

_SID = re.compile(r"S-1(-\d+){1,15}")


class PipeApi(Protocol):
    """The Win32 calls, one method each, returning Win32 error codes instead of raising (0 is
    success) so the callers decide what a code means. Handles and events are ints.

    ``connect``, ``read`` and ``write`` start one overlapped operation using ``event`` and
    wait for it, or for ``cancel`` to be signalled, or ``timeout_ms``; if it was not the
    operation that finished they cancel it and wait until the cancellation is complete, and
    return ERROR_OPERATION_ABORTED (``cancel``) or WAIT_TIMEOUT (timeout) — or the operation's
    own result, if it finished first."""

    def current_user_sid(self) -> str:
        """The string SID of this process's user (``GetTokenInformation(TokenUser)`` +
        ``ConvertSidToStringSidW``); raises OSError."""
        ...

    def create_pipe(self, name: str, open_mode: int, pipe_mode: int, max_instances: int,
                    out_size: int, in_size: int, sddl: str) -> tuple[int, int]:
        """``CreateNamedPipeW`` with security attributes made from ``sddl``: (handle, 0) or
        (0, error)."""
        ...

    def connect(self, pipe: int, event: int, cancel: int) -> int:
        """``ConnectNamedPipe``, overlapped: 0, ERROR_PIPE_CONNECTED (a client came before the
        call), or an error."""
        ...

    def disconnect(self, pipe: int) -> int:
        """``DisconnectNamedPipe``: makes the instance ready for the next client."""
        ...

    def read(self, pipe: int, size: int, event: int, cancel: int, timeout_ms: int) -> tuple[int, bytes]:
        """``ReadFile`` of at most ``size`` bytes, overlapped: (0 or error, the bytes read)."""
        ...

    def write(self, pipe: int, data: bytes, event: int, cancel: int, timeout_ms: int) -> tuple[int, int]:
        """``WriteFile``, overlapped: (0 or error, bytes written). ``b""`` writes a zero-byte
        message."""
        ...

    def create_event(self) -> int:
        """``CreateEventW``: a manual-reset event, not signalled."""
        ...

    def set_event(self, event: int) -> None:
        ...

    def close_handle(self, handle: int) -> None:
        ...


def pipe_sddl(user_sid: str) -> str:
    """The pipe's security descriptor: a protected DACL (no inherited entries) that denies
    network logons and allows full access to ``user_sid`` and to SYSTEM — nobody else."""
    if not _SID.fullmatch(user_sid):
        raise PipeError(f"not a security identifier: {user_sid!r}")
    return f"D:P(D;;GA;;;NU)(A;;GA;;;{user_sid})(A;;GA;;;SY)"


def pipe_error(call: str, code: int, path: str) -> PipeError:
    """The exception for Win32 error ``code`` from ``call`` on pipe ``path``."""
    meaning, posix = _MEANING.get(code, ("failed", None))
    message = f"{call} on {path}: {meaning} (Windows error {code})"
    if code in (WAIT_TIMEOUT, ERROR_TIMEOUT):
        return PipeTimeout(message, winerror=code, errno=posix)
    return PipeError(message, winerror=code, errno=posix)


def default_api() -> PipeApi:
    from vmkit.named_pipe_win32 import Win32PipeApi

    return Win32PipeApi()


class PipeListener:
    """Listens on named pipe ``path`` (``\\\\.\\pipe\\NAME``) for clients of this user.

    ``wait`` is how long to keep retrying when the name is still held (a daemon or standby
    that is exiting may hold it for a moment); after that, ``PipeInUse``."""

    def __init__(self, path: str, *, api: PipeApi | None = None, sddl: str | None = None,
                 wait: float = 0.0) -> None:
        self.path = path
        self._api = api if api is not None else default_api()
        if sddl is None:
            try:
                sid = self._api.current_user_sid()
            except OSError as exc:
                raise PipeError(f"cannot read the current user's SID to protect {path}: {exc}") from exc
            sddl = pipe_sddl(sid)
        self.sddl = sddl
        self._lock = threading.Lock()
        self._accepting = threading.Lock()  # one accept() at a time; it owns _pending meanwhile
        self._closed = False
        self._connect_event = self._api.create_event()
        self._closing = self._api.create_event()
        try:
            self._pending: int | None = self._create_first(wait)
        except BaseException:
            self._api.close_handle(self._connect_event)
            self._api.close_handle(self._closing)
            raise

    def _create(self, first: bool) -> tuple[int, int]:
        mode = OPEN_MODE | (FILE_FLAG_FIRST_PIPE_INSTANCE if first else 0)
        return self._api.create_pipe(self.path, mode, PIPE_MODE, PIPE_UNLIMITED_INSTANCES,
                                     BUFFER_SIZE, BUFFER_SIZE, self.sddl)

    def _create_first(self, wait: float) -> int:
        deadline = time.monotonic() + wait
        while True:
            handle, code = self._create(first=True)
            if code == 0:
                log.debug("listening on %s", self.path)
                return handle
            # ACCESS_DENIED with FIRST_PIPE_INSTANCE: an instance of this name exists already
            if code not in (ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY):
                raise pipe_error("CreateNamedPipeW", code, self.path)
            if time.monotonic() >= deadline:
                raise PipeInUse(f"another process already serves {self.path}",
                                hint="another pydesk VM of the same name (maybe another Windows user's) or "
                                     "another program has it; stop it, or give this VM another --name")
            time.sleep(0.05)

    def accept(self) -> PipeConnection:
        """Wait for a client; raises OSError (a PipeError) once the listener is closed."""
        with self._accepting:
            while True:
                with self._lock:
                    if self._closed or self._pending is None:
                        raise PipeError(f"the listener on {self.path} is closed", winerror=ERROR_OPERATION_ABORTED,
                                        errno=errno.EBADF)
                    handle = self._pending
                code = self._api.connect(handle, self._connect_event, self._closing)
                if code == ERROR_NO_DATA:  # a client came and went already: wait for the next one
                    self._api.disconnect(handle)
                    continue
                if code not in (0, ERROR_PIPE_CONNECTED):
                    if self._closed:
                        raise PipeError(f"the listener on {self.path} is closed", winerror=code, errno=errno.EBADF)
                    raise pipe_error("ConnectNamedPipe", code, self.path)
                if self._closed:  # close() ran while a client connected: close() ends it
                    raise PipeError(f"the listener on {self.path} is closed", winerror=ERROR_OPERATION_ABORTED,
                                    errno=errno.EBADF)
                # the next listening instance exists before this one is handed over
                fresh, code = self._create(first=False)
                if code != 0:
                    with self._lock:
                        self._pending = None
                    self._api.close_handle(handle)
                    log.error("cannot create another instance of %s (Windows error %d)", self.path, code)
                    raise pipe_error("CreateNamedPipeW", code, self.path)
                with self._lock:
                    self._pending = fresh
                return PipeConnection(self._api, handle, self.path)

    def close(self) -> None:
        """Stop listening; an ``accept`` blocked in another thread raises OSError. Connections
        already accepted stay open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._api.set_event(self._closing)  # wakes accept(), which cancels its ConnectNamedPipe
        with self._accepting:
            if self._pending is not None:
                self._api.close_handle(self._pending)
                self._pending = None
            self._api.close_handle(self._connect_event)
            self._api.close_handle(self._closing)
        log.debug("closed %s", self.path)

    def __enter__(self) -> PipeListener:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PipeConnection:
    """One connected instance. One thread may ``recv`` while another ``sendall``s; ``close``
    from any thread wakes both, and the handle is closed when the last of them has returned."""

    def __init__(self, api: PipeApi, handle: int, path: str) -> None:
        self.path = path
        self._api = api
        self._handle = handle
        self._read_event = api.create_event()
        self._write_event = api.create_event()
        self._closing = api.create_event()
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False
        self._released = False
        self._eof = False
        self._write_closed = False
        self._timeout_ms = INFINITE

    # --- socket-like surface ----------------------------------------------------------
    def settimeout(self, seconds: float | None) -> None:
        """Like ``socket.settimeout``: ``recv``/``sendall`` raise PipeTimeout after it."""
        self._timeout_ms = INFINITE if seconds is None else max(0, min(int(seconds * 1000), INFINITE - 1))

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at end of stream: the client closed the pipe, or sent
        a zero-byte message (its half-close)."""
        if size <= 0 or self._eof:
            return b""
        self._begin("ReadFile")
        try:
            code, data = self._api.read(self._handle, size, self._read_event, self._closing, self._timeout_ms)
        finally:
            self._end()
        if code in (0, ERROR_MORE_DATA):  # MORE_DATA: the rest of a message comes with the next read
            if not data:
                self._eof = True
            return data
        if code in EOF_ERRORS:
            self._eof = True
            return b""
        raise pipe_error("ReadFile", code, self.path)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (nothing for empty data: an empty message is an EOF)."""
        view = memoryview(data).cast("B")
        if not view:
            return
        if self._write_closed:
            raise PipeError(f"WriteFile on {self.path}: shut down for writing", errno=errno.EPIPE)
        while view:
            self._begin("WriteFile")
            try:
                code, n = self._api.write(self._handle, bytes(view), self._write_event, self._closing,
                                          self._timeout_ms)
            finally:
                self._end()
            if code != 0:
                raise pipe_error("WriteFile", code, self.path)
            if n <= 0:
                raise PipeError(f"WriteFile on {self.path}: wrote nothing", errno=errno.EIO)
            view = view[n:]

    def shutdown_write(self) -> None:
        """Half-close: a zero-byte message, which the client reads as end of stream (as
        dockerd's CloseWrite). Later ``sendall`` calls raise; ``recv`` goes on."""
        if self._write_closed:
            return
        self._write_closed = True
        self._begin("WriteFile")
        try:
            code, _ = self._api.write(self._handle, b"", self._write_event, self._closing, self._timeout_ms)
        finally:
            self._end()
        if code != 0 and code not in EOF_ERRORS and code != ERROR_NO_DATA:
            raise pipe_error("WriteFile", code, self.path)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = self._busy
            # under the lock: the last recv/sendall to return closes the event, never before this
            self._api.set_event(self._closing)  # a recv or sendall in another thread cancels and returns
        if busy == 0:
            self._release()

    def __enter__(self) -> PipeConnection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- the handle's lifetime --------------------------------------------------------
    def _begin(self, call: str) -> None:
        with self._lock:
            if self._closed:
                raise PipeError(f"{call} on {self.path}: the connection is closed", errno=errno.EBADF)
            self._busy += 1

    def _end(self) -> None:
        with self._lock:
            self._busy -= 1
            last = self._closed and self._busy == 0
        if last:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        # CloseHandle, not DisconnectNamedPipe: data still in the pipe stays readable by the client
        for handle in (self._handle, self._read_event, self._write_event, self._closing):
            self._api.close_handle(handle)
