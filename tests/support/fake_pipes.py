r"""An in-memory ``vmkit.named_pipe.PipeApi`` for tests on any OS.

It behaves like the Windows named pipe file system where ``named_pipe`` depends on it, and
records every call in ``calls`` so tests can assert flags, arguments and order:

* an instance made with FILE_FLAG_FIRST_PIPE_INSTANCE fails with ERROR_ACCESS_DENIED while
  any instance of that name (case-insensitive) is open;
* a client (``client(name)``) takes a free instance; ConnectNamedPipe then returns 0, or
  ERROR_PIPE_CONNECTED if the client came before the call; no free instance: ERROR_PIPE_BUSY;
* message-type, byte-read: a read returns bytes across messages up to its size, but a
  zero-byte message is returned alone as a zero-byte read; a read after the client closed is
  ERROR_BROKEN_PIPE; a write after it closed is ERROR_NO_DATA;
* ``connect``/``read``/``write`` wait until they can finish, or until the cancel event is set
  (ERROR_OPERATION_ABORTED), or the timeout (WAIT_TIMEOUT) — blocking for real, so tests can
  run them in threads. Reads and writes on one handle do not wait for each other (overlapped).

``scripted`` lets a test queue a result code for the next call of a method by name.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

from vmkit.named_pipe import (
    ERROR_ACCESS_DENIED,
    ERROR_BROKEN_PIPE,
    ERROR_FILE_NOT_FOUND,
    ERROR_NO_DATA,
    ERROR_OPERATION_ABORTED,
    ERROR_PIPE_BUSY,
    ERROR_PIPE_CONNECTED,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    INFINITE,
    WAIT_TIMEOUT,
)

SAFETY = 10.0  # no fake call blocks longer than this: a broken test fails instead of hanging


@dataclass
class Instance:
    name: str
    client: FakeClient | None = None
    listening: bool = False
    closed: bool = False
    to_server: deque[bytes] = field(default_factory=deque)
    to_client: deque[bytes] = field(default_factory=deque)


class FakePipes:
    def __init__(self, sid: str = "S-1-5-21-1004336348-1177238915-682003330-1001") -> None:
        self.sid = sid
        self.calls: list[tuple[object, ...]] = []
        self.cond = threading.Condition()
        self.instances: dict[int, Instance] = {}
        self.events: dict[int, bool] = {}
        self.closed: list[int] = []
        self.scripted: dict[str, deque[tuple[int, bytes]]] = {}
        self.write_limit: int | None = None  # a write takes at most this many bytes (partial writes)
        self._handles = itertools.count(100)

    # --- helpers for tests ------------------------------------------------------------
    def script(self, method: str, code: int, data: bytes = b"") -> None:
        self.scripted.setdefault(method, deque()).append((code, data))

    def _scripted(self, method: str) -> tuple[int, bytes] | None:
        queue = self.scripted.get(method)
        return queue.popleft() if queue else None

    def _record(self, *call: object) -> None:
        with self.cond:
            self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]  # type: ignore[misc]

    def open_handles(self) -> set[int]:
        with self.cond:
            live = {h for h, i in self.instances.items() if not i.closed}
            return live | set(self.events)

    def client(self, name: str) -> FakeClient:
        """Open the pipe as a client would (CreateFile); OSError if it cannot."""
        with self.cond:
            named = [i for i in self.instances.values() if i.name.lower() == name.lower() and not i.closed]
            if not named:
                raise OSError(ERROR_FILE_NOT_FOUND, f"no pipe {name}")
            free = [i for i in named if i.client is None]
            if not free:
                raise OSError(ERROR_PIPE_BUSY, f"all instances of {name} are busy")
            inst = sorted(free, key=lambda i: not i.listening)[0]
            inst.client = FakeClient(self, inst)
            self.cond.notify_all()
            return inst.client

    def _wait(self, pred: object, timeout_ms: int = INFINITE) -> bool:
        timeout = SAFETY if timeout_ms == INFINITE else timeout_ms / 1000
        got = self.cond.wait_for(pred, timeout)  # type: ignore[arg-type]
        if not got and timeout_ms == INFINITE:
            raise AssertionError("a fake pipe call blocked for too long")
        return bool(got)

    # --- PipeApi ------------------------------------------------------------------------
    def current_user_sid(self) -> str:
        self._record("current_user_sid")
        return self.sid

    def create_pipe(self, name: str, open_mode: int, pipe_mode: int, max_instances: int,
                    out_size: int, in_size: int, sddl: str) -> tuple[int, int]:
        self._record("create_pipe", name, open_mode, pipe_mode, max_instances, out_size, in_size, sddl)
        scripted = self._scripted("create_pipe")
        if scripted and scripted[0]:
            return 0, scripted[0]
        with self.cond:
            taken = any(i.name.lower() == name.lower() and not i.closed for i in self.instances.values())
            if open_mode & FILE_FLAG_FIRST_PIPE_INSTANCE and taken:
                return 0, ERROR_ACCESS_DENIED
            handle = next(self._handles)
            self.instances[handle] = Instance(name)
            return handle, 0

    def connect(self, pipe: int, event: int, cancel: int) -> int:
        self._record("connect", pipe)
        scripted = self._scripted("connect")
        if scripted:
            return scripted[0]
        with self.cond:
            inst = self.instances[pipe]
            if inst.client is not None:
                return ERROR_PIPE_CONNECTED
            inst.listening = True
            self._wait(lambda: inst.client is not None or self.events.get(cancel, True))
            inst.listening = False
            if inst.client is not None:
                return 0
            return ERROR_OPERATION_ABORTED

    def disconnect(self, pipe: int) -> int:
        self._record("disconnect", pipe)
        with self.cond:
            inst = self.instances[pipe]
            inst.client = None
            inst.to_server.clear()
            inst.to_client.clear()
        return 0

    def read(self, pipe: int, size: int, event: int, cancel: int, timeout_ms: int) -> tuple[int, bytes]:
        self._record("read", pipe, size)
        try:
            scripted = self._scripted("read")
            if scripted:
                return scripted
            with self.cond:
                inst = self.instances[pipe]
                client = inst.client
                assert client is not None, "read on an instance with no client"
                ready = self._wait(lambda: inst.to_server or client.closed or self.events.get(cancel, True),
                                   timeout_ms)
                if inst.to_server:
                    if inst.to_server[0] == b"":
                        inst.to_server.popleft()
                        return 0, b""  # a zero-byte message
                    out = b""
                    while inst.to_server and inst.to_server[0] and len(out) < size:
                        chunk = inst.to_server.popleft()
                        take, rest = chunk[:size - len(out)], chunk[size - len(out):]
                        out += take
                        if rest:
                            inst.to_server.appendleft(rest)
                    return 0, out
                if client.closed:
                    return ERROR_BROKEN_PIPE, b""
                return (ERROR_OPERATION_ABORTED if ready else WAIT_TIMEOUT), b""
        finally:
            self._record("read_done", pipe)

    def write(self, pipe: int, data: bytes, event: int, cancel: int, timeout_ms: int) -> tuple[int, int]:
        self._record("write", pipe, bytes(data))
        scripted = self._scripted("write")
        if scripted:
            return scripted[0], 0
        with self.cond:
            inst = self.instances[pipe]
            if inst.client is None or inst.client.closed:
                return ERROR_NO_DATA, 0
            n = len(data) if self.write_limit is None else min(len(data), self.write_limit)
            inst.to_client.append(bytes(data[:n]))
            self.cond.notify_all()
            return 0, n

    def create_event(self) -> int:
        with self.cond:
            handle = next(self._handles)
            self.events[handle] = False
        self._record("create_event", handle)
        return handle

    def set_event(self, event: int) -> None:
        self._record("set_event", event)
        with self.cond:
            assert event in self.events, f"set_event on a closed or unknown handle {event}"
            self.events[event] = True
            self.cond.notify_all()

    def close_handle(self, handle: int) -> None:
        self._record("close_handle", handle)
        with self.cond:
            assert handle not in self.closed, f"handle {handle} closed twice"
            self.closed.append(handle)
            if handle in self.instances:
                self.instances[handle].closed = True
            else:
                assert handle in self.events, f"close_handle on an unknown handle {handle}"
                del self.events[handle]
            self.cond.notify_all()


class FakeClient:
    """The client end of one instance (what ``open(r"\\\\.\\pipe\\x", "r+b")`` gives)."""

    def __init__(self, pipes: FakePipes, inst: Instance) -> None:
        self._pipes = pipes
        self._inst = inst
        self.closed = False

    def send(self, data: bytes) -> None:
        """One message; ``b""`` is a zero-byte message (the half-close)."""
        with self._pipes.cond:
            self._inst.to_server.append(data)
            self._pipes.cond.notify_all()

    def recv(self) -> bytes | None:
        """The next message; ``b""`` for a zero-byte message, None once the server closed."""
        with self._pipes.cond:
            self._pipes._wait(lambda: self._inst.to_client or self._inst.closed)
            return self._inst.to_client.popleft() if self._inst.to_client else None

    def read_to_eof(self) -> bytes:
        out = b""
        while chunk := self.recv():
            out += chunk
        return out

    def close(self) -> None:
        with self._pipes.cond:
            self.closed = True
            self._pipes.cond.notify_all()
