r"""The engine's named pipe on Windows (vmkit/named_pipe.py, vmkit/engine_endpoint.py).

Everything but the last test runs on any OS against ``tests/support/fake_pipes.py``, an
in-memory stand-in for the Win32 calls that records them; the last one is a real end-to-end
test that needs a Windows host.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.fake_pipes import FakePipes
from vmkit import engine_endpoint, transport
from vmkit.errors import ConfigError, PipeError, PipeInUse, PipeTimeout, VMKitError
from vmkit.named_pipe import (
    ERROR_ACCESS_DENIED,
    ERROR_INVALID_HANDLE,
    ERROR_MORE_DATA,
    ERROR_NO_DATA,
    ERROR_PIPE_BUSY,
    ERROR_PIPE_NOT_CONNECTED,
    PipeConnection,
    PipeListener,
    pipe_error,
    pipe_sddl,
)
from vmkit.paths import VMPaths, engine_pipe

SID = "S-1-5-21-1004336348-1177238915-682003330-1001"
SDDL = f"D:P(D;;GA;;;NU)(A;;GA;;;{SID})(A;;GA;;;SY)"
PIPE = r"\\.\pipe\pydesk_engine"
FIRST_OPEN_MODE = 0x00000003 | 0x40000000 | 0x00080000  # DUPLEX | OVERLAPPED | FIRST_PIPE_INSTANCE
NEXT_OPEN_MODE = 0x00000003 | 0x40000000
PIPE_MODE = 0x4 | 0x0 | 0x0 | 0x8  # TYPE_MESSAGE | READMODE_BYTE | WAIT | REJECT_REMOTE_CLIENTS


def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    """Run fn in a thread; returns (thread, box) where box gets the result or the exception."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _connected(fake: FakePipes, name: str = PIPE) -> tuple[PipeListener, PipeConnection, object]:
    lst = PipeListener(name, api=fake)
    client = fake.client(name)
    return lst, lst.accept(), client


# --- names, SDDL, DOCKER_HOST ---------------------------------------------------------------
def test_sddl_allows_only_the_user_and_system() -> None:
    assert pipe_sddl(SID) == SDDL
    assert pipe_sddl("S-1-5-18") == "D:P(D;;GA;;;NU)(A;;GA;;;S-1-5-18)(A;;GA;;;SY)"
    for bad in ("", "WD", "S-1-5-21-1)(A;;GA;;;WD", "S-1-5-21-1 ", "s-1-5-21-1"):
        with pytest.raises(PipeError):
            pipe_sddl(bad)


def test_engine_pipe_per_vm_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert engine_pipe("default") == PIPE
    assert engine_pipe("dev") == r"\\.\pipe\pydesk_engine_dev"
    home = engine_pipe("default", tmp_path)
    assert home.startswith(PIPE + "-") and len(home) == len(PIPE) + 13
    assert home == engine_pipe("default", tmp_path) != engine_pipe("default", tmp_path / "other")
    for bad in ("", "a\\b", "a/b", "a\nb", "x" * 300):
        with pytest.raises(ConfigError):
            engine_pipe(bad)
    monkeypatch.delenv("PYDESK_HOME", raising=False)
    assert VMPaths("default").engine_pipe == PIPE
    monkeypatch.setenv("PYDESK_HOME", str(tmp_path))
    assert VMPaths("default").engine_pipe == engine_pipe("default", tmp_path.resolve())


def test_docker_host_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYDESK_HOME", raising=False)
    assert engine_endpoint.docker_host(VMPaths("default"), "win32") == "npipe:////./pipe/pydesk_engine"
    assert engine_endpoint.docker_host(VMPaths("dev"), "win32") == "npipe:////./pipe/pydesk_engine_dev"
    assert engine_endpoint.docker_host(VMPaths("dev"), "linux") == f"unix://{VMPaths('dev').engine}"
    assert engine_endpoint.may_exist(VMPaths("dev"), "win32") is True


def test_engine_listener_is_a_socket_on_posix_and_a_pipe_on_windows(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("PYDESK_HOME", str(tmp_path))
    paths = VMPaths("default").ensure()
    sock = engine_endpoint.engine_listener(paths, "linux")
    try:
        assert isinstance(sock, transport.Listener) and paths.engine.exists()
    finally:
        sock.close()
    fake = FakePipes()
    pipe = engine_endpoint.engine_listener(paths, "win32", api=fake)
    try:
        assert isinstance(pipe, PipeListener) and pipe.path == paths.engine_pipe
        assert [c[1] for c in fake.calls if c[0] == "create_pipe"] == [paths.engine_pipe]
    finally:
        pipe.close()
    assert not paths.engine.exists()


# --- the listener ---------------------------------------------------------------------------
def test_first_instance_flags_and_security() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    try:
        assert lst.sddl == SDDL
        assert fake.calls[0] == ("current_user_sid",)
        creates = [c for c in fake.calls if c[0] == "create_pipe"]
        assert creates == [("create_pipe", PIPE, FIRST_OPEN_MODE, PIPE_MODE, 255, 65536, 65536, SDDL)]
    finally:
        lst.close()


def test_a_fresh_instance_listens_before_a_connection_is_handed_over() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    try:
        conns = []
        for _ in range(3):
            client = fake.client(PIPE)
            before = len(fake.calls)
            conns.append((lst.accept(), client))
            step = [c for c in fake.calls[before:] if c[0] in ("connect", "create_pipe")]
            handed = conns[-1][0]._handle
            assert handed != lst._pending
            # ConnectNamedPipe on the listening instance, then the next instance, then hand-off
            assert step == [("connect", handed),
                            ("create_pipe", PIPE, NEXT_OPEN_MODE, PIPE_MODE, 255, 65536, 65536, SDDL)]
        opens = [c[2] for c in fake.calls if c[0] == "create_pipe"]
        assert opens == [FIRST_OPEN_MODE] + [NEXT_OPEN_MODE] * 3  # the first-instance flag once only
        handles = {c[0]._handle for c in conns}
        assert len(handles) == 3
        # there is always a listening instance that is not one of the handed-over ones
        assert fake.client(PIPE) is not None
    finally:
        lst.close()


def test_client_that_came_before_connect_is_accepted() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    try:
        client = fake.client(PIPE)  # before accept() calls ConnectNamedPipe: ERROR_PIPE_CONNECTED
        conn = lst.accept()
        client.send(b"hi")
        assert conn.recv(10) == b"hi"
    finally:
        lst.close()


def test_client_gone_before_connect_reuses_the_instance() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    try:
        fake.script("connect", ERROR_NO_DATA)
        first = lst._pending
        t, box = _in_thread(lst.accept)
        _until(lambda: fake.names().count("connect") == 2)
        fake.client(PIPE)
        t.join(5)
        assert isinstance(box[0], PipeConnection)
        assert [c for c in fake.calls if c[0] in ("connect", "disconnect")] == [
            ("connect", first), ("disconnect", first), ("connect", first)]
    finally:
        lst.close()


def test_close_unblocks_accept_and_releases_everything() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    t, box = _in_thread(lst.accept)
    _until(lambda: "connect" in fake.names())
    time.sleep(0.05)
    assert t.is_alive()  # really blocked in ConnectNamedPipe
    lst.close()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(box[0], PipeError) and isinstance(box[0], OSError)
    assert fake.open_handles() == set()  # the listening instance and both events
    with pytest.raises(OSError):
        lst.accept()
    lst.close()  # twice is fine


def test_close_before_accept() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    lst.close()
    with pytest.raises(OSError):
        lst.accept()
    assert fake.open_handles() == set()
    assert "connect" not in fake.names()


def test_accepted_connections_outlive_the_listener() -> None:
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    lst.close()
    client.send(b"still here")  # type: ignore[attr-defined]
    assert conn.recv(100) == b"still here"
    conn.close()
    assert fake.open_handles() == set()


def test_a_second_listener_cannot_squat_the_name() -> None:
    fake = FakePipes()
    first = PipeListener(PIPE, api=fake)
    try:
        with pytest.raises(PipeInUse) as exc:
            PipeListener(PIPE.upper(), api=fake)  # pipe names are case-insensitive
        assert isinstance(exc.value, OSError) and isinstance(exc.value, VMKitError)
        assert PIPE.upper() in exc.value.message and exc.value.hint
        creates = [c for c in fake.calls if c[0] == "create_pipe"]
        assert [c[2] for c in creates] == [FIRST_OPEN_MODE, FIRST_OPEN_MODE]  # never without the flag
    finally:
        first.close()
    assert fake.open_handles() == set()  # the failed listener's events are closed too


def test_waits_for_the_name_to_be_let_go() -> None:
    fake = FakePipes()
    first = PipeListener(PIPE, api=fake)
    threading.Timer(0.2, first.close).start()
    second = PipeListener(PIPE, api=fake, wait=5)
    try:
        assert [c[2] for c in fake.calls if c[0] == "create_pipe"].count(FIRST_OPEN_MODE) >= 3
    finally:
        second.close()


def test_create_errors() -> None:
    fake = FakePipes()
    fake.script("create_pipe", ERROR_PIPE_BUSY)
    with pytest.raises(PipeInUse):
        PipeListener(PIPE, api=fake)
    fake.script("create_pipe", 123)
    with pytest.raises(PipeError) as exc:
        PipeListener(PIPE, api=fake)
    assert exc.value.winerror == 123 and "CreateNamedPipeW" in str(exc.value)
    assert type(exc.value) is PipeError


def test_failing_to_make_the_next_instance_closes_the_listener() -> None:
    fake = FakePipes()
    lst = PipeListener(PIPE, api=fake)
    client = fake.client(PIPE)
    fake.script("create_pipe", 1450)  # ERROR_NO_SYSTEM_RESOURCES
    with pytest.raises(PipeError) as exc:
        lst.accept()
    assert exc.value.winerror == 1450
    assert client.recv() is None  # the client is not left hanging
    with pytest.raises(OSError):
        lst.accept()
    lst.close()
    assert fake.open_handles() == set()


def test_user_sid_failure_is_a_pipe_error() -> None:
    class NoSid(FakePipes):
        def current_user_sid(self) -> str:
            raise OSError(5, "Access is denied")

    with pytest.raises(PipeError) as exc:
        PipeListener(PIPE, api=NoSid())
    assert isinstance(exc.value.__cause__, OSError)


# --- the connection -------------------------------------------------------------------------
def test_recv_returns_bytes_and_eof_when_the_client_closes() -> None:
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    try:
        client.send(b"abc")  # type: ignore[attr-defined]
        client.send(b"def")  # type: ignore[attr-defined]
        assert conn.recv(4) == b"abcd"  # a byte stream: messages are no boundary
        assert conn.recv(100) == b"ef"
        client.close()  # type: ignore[attr-defined]
        assert conn.recv(100) == b""  # ERROR_BROKEN_PIPE
        reads = fake.names().count("read")
        assert conn.recv(100) == b""  # and stays at EOF without asking again
        assert fake.names().count("read") == reads
        assert conn.recv(0) == b""
    finally:
        conn.close()
        lst.close()


def test_a_zero_byte_message_is_eof() -> None:
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    try:
        client.send(b"body")  # type: ignore[attr-defined]
        client.send(b"")  # type: ignore[attr-defined]  # the docker CLI's CloseWrite
        assert conn.recv(100) == b"body"
        assert conn.recv(100) == b""
        conn.sendall(b"reply after the client's half-close")
        assert client.recv() == b"reply after the client's half-close"  # type: ignore[attr-defined]
    finally:
        conn.close()
        lst.close()


@pytest.mark.parametrize("code", [ERROR_PIPE_NOT_CONNECTED, 38])  # 38: ERROR_HANDLE_EOF
def test_other_eof_codes(code: int) -> None:
    fake = FakePipes()
    lst, conn, _ = _connected(fake)
    fake.script("read", code)
    assert conn.recv(10) == b""
    conn.close()
    lst.close()


def test_more_data_is_a_partial_read_and_errors_raise() -> None:
    fake = FakePipes()
    lst, conn, _ = _connected(fake)
    fake.script("read", ERROR_MORE_DATA, b"part")
    assert conn.recv(4) == b"part"
    fake.script("read", ERROR_ACCESS_DENIED)
    with pytest.raises(PipeError) as exc:
        conn.recv(10)
    assert exc.value.winerror == ERROR_ACCESS_DENIED and exc.value.errno == errno.EACCES
    assert "ReadFile" in str(exc.value) and PIPE in str(exc.value)
    conn.close()
    lst.close()


def test_recv_timeout() -> None:
    fake = FakePipes()
    lst, conn, _ = _connected(fake)
    conn.settimeout(0.05)
    assert fake.calls  # nothing sent: the read times out
    with pytest.raises(TimeoutError) as exc:
        conn.recv(10)
    assert isinstance(exc.value, PipeTimeout) and exc.value.errno == errno.ETIMEDOUT
    assert ("read", conn._handle, 10) in fake.calls
    conn.close()
    lst.close()


def test_sendall_writes_everything_and_nothing_for_empty_data() -> None:
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    try:
        fake.write_limit = 3
        conn.sendall(b"0123456789")
        got = [client.recv() for _ in range(4)]  # type: ignore[attr-defined]
        assert got == [b"012", b"345", b"678", b"9"]
        writes = fake.names().count("write")
        conn.sendall(b"")
        conn.sendall(memoryview(b""))
        assert fake.names().count("write") == writes  # an empty message would be an EOF
        fake.write_limit = None
        conn.sendall(bytearray(b"xy"))
        assert client.recv() == b"xy"  # type: ignore[attr-defined]
    finally:
        conn.close()
        lst.close()


def test_sendall_to_a_gone_client_is_a_broken_pipe() -> None:
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    client.close()  # type: ignore[attr-defined]
    with pytest.raises(OSError) as exc:
        conn.sendall(b"x")
    assert isinstance(exc.value, PipeError) and exc.value.winerror == ERROR_NO_DATA
    assert exc.value.errno == errno.EPIPE
    conn.close()
    lst.close()


def test_shutdown_write_sends_one_zero_byte_message() -> None:
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    try:
        conn.sendall(b"out")
        conn.shutdown_write()
        conn.shutdown_write()  # once only
        assert [c for c in fake.calls if c[0] == "write"] == [
            ("write", conn._handle, b"out"), ("write", conn._handle, b"")]
        assert client.recv() == b"out"  # type: ignore[attr-defined]
        assert client.recv() == b""  # type: ignore[attr-defined]  # EOF to the client
        with pytest.raises(OSError):
            conn.sendall(b"more")
        client.send(b"in")  # type: ignore[attr-defined]
        assert conn.recv(10) == b"in"  # the other direction goes on
    finally:
        conn.close()
        lst.close()


def test_close_wakes_a_blocked_recv_and_closes_the_handle_after_it() -> None:
    fake = FakePipes()
    lst, conn, _ = _connected(fake)
    lst.close()
    t, box = _in_thread(conn.recv, 100)
    _until(lambda: "read" in fake.names())
    time.sleep(0.05)
    assert t.is_alive()
    conn.close()
    t.join(5)
    assert isinstance(box[0], PipeError)
    done = fake.calls.index(("read_done", conn._handle))
    closed = fake.calls.index(("close_handle", conn._handle))
    assert closed > done  # never closed under a pending read
    assert fake.open_handles() == set()
    with pytest.raises(OSError):
        conn.recv(1)
    with pytest.raises(OSError):
        conn.sendall(b"x")
    conn.close()


def test_pump_carries_both_directions_at_once_with_half_close() -> None:
    """An attach/exec stream: the daemon pumps pipe->guest and guest->pipe in two threads."""
    fake = FakePipes()
    lst, conn, client = _connected(fake)
    guest, far = socket.socketpair()  # stands in for the SSH channel to the guest engine
    up = threading.Thread(target=transport.pump, args=(conn, guest), daemon=True)
    down = threading.Thread(target=transport.pump, args=(guest, conn), daemon=True)
    up.start()
    down.start()
    try:
        _until(lambda: "read" in fake.names())  # pump(conn, guest) is blocked in recv ...
        far.sendall(b"output 1")  # ... and a write to the same pipe still goes through
        assert client.recv() == b"output 1"  # type: ignore[attr-defined]
        client.send(b"input 1")  # type: ignore[attr-defined]
        assert far.recv(100) == b"input 1"
        client.send(b"")  # type: ignore[attr-defined]  # the client's stdin ends
        assert far.recv(100) == b""  # the guest sees EOF on its input ...
        up.join(5)
        assert not up.is_alive()
        far.sendall(b"output 2")  # ... and its output still reaches the client
        assert client.recv() == b"output 2"  # type: ignore[attr-defined]
        far.shutdown(socket.SHUT_WR)
        assert client.recv() == b""  # type: ignore[attr-defined]  # the stream's end, as a zero-byte message
        down.join(5)
        assert not down.is_alive()
    finally:
        conn.close()
        lst.close()
        guest.close()
        far.close()


def test_daemon_forwards_pipe_clients_to_the_guest_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vmkit/daemon.py's engine loop on a (fake) pipe, through the real engine link and the
    guest's relay: bytes both ways, EOFs passed on, and the pipe handle closed once both
    directions are done."""
    from tests.support.engine_link import Link
    from vmkit.daemon import Daemon

    monkeypatch.setenv("PYDESK_HOME", str(tmp_path))
    daemon = Daemon("default")
    engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # the engine's socket in the guest
    engine.bind(str(tmp_path / "engine.sock"))
    engine.listen(1)
    lk = Link(tmp_path, tmp_path / "engine.sock")
    daemon.engine_link = lk.link
    fake = FakePipes()
    daemon.engine_listener = engine_endpoint.engine_listener(daemon.paths, "win32", api=fake)
    serving = threading.Thread(target=daemon._serve_engine, daemon=True)
    serving.start()
    far = None
    try:
        client = fake.client(daemon.paths.engine_pipe)
        handle = [c[1] for c in fake.calls if c[0] == "connect"][0]
        client.send(b"GET /_ping HTTP/1.1\r\n\r\n")
        engine.settimeout(10)
        far, _ = engine.accept()
        far.settimeout(10)
        assert far.recv(100) == b"GET /_ping HTTP/1.1\r\n\r\n"
        far.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
        far.shutdown(socket.SHUT_WR)
        assert client.read_to_eof() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"
        client.close()
        assert far.recv(100) == b""  # the client's end reaches the guest
        _until(lambda: handle in fake.closed)
    finally:
        daemon.done.set()
        daemon.engine_listener.close()
        serving.join(5)
        lk.close()
        engine.close()
        if far is not None:
            far.close()
    assert not serving.is_alive()
    assert fake.open_handles() == set()


def test_error_mapping() -> None:
    assert pipe_error("ReadFile", ERROR_INVALID_HANDLE, PIPE).errno == errno.EBADF
    assert pipe_error("CreateFile", ERROR_PIPE_BUSY, PIPE).errno == errno.EBUSY
    unknown = pipe_error("WriteFile", 9999, PIPE)
    assert unknown.errno is None and unknown.winerror == 9999
    assert str(unknown) == rf"WriteFile on {PIPE}: failed (Windows error 9999)"
    assert VMKitError.from_dict(PipeInUse("x", hint="y").to_dict()).__class__ is PipeInUse


# --- a real pipe ----------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "win32", reason="named pipes need a Windows host")
def test_real_named_pipe_end_to_end() -> None:
    import ctypes

    from vmkit.named_pipe_win32 import OVERLAPPED, SECURITY_ATTRIBUTES, Win32PipeApi

    assert ctypes.sizeof(OVERLAPPED) == (32 if ctypes.sizeof(ctypes.c_void_p) == 8 else 20)
    assert ctypes.sizeof(SECURITY_ATTRIBUTES) == (24 if ctypes.sizeof(ctypes.c_void_p) == 8 else 12)
    api = Win32PipeApi()
    assert api.current_user_sid().startswith("S-1-")
    name = rf"\\.\pipe\pydesk_test_{time.monotonic_ns()}"
    lst = PipeListener(name, api=api)
    try:
        with pytest.raises(PipeInUse):
            PipeListener(name, api=api)  # FILE_FLAG_FIRST_PIPE_INSTANCE

        def client() -> bytes:
            with open(name, "r+b", buffering=0) as f:
                f.write(b"ping")
                got = f.read(4)  # answered while the server's other thread waits in recv
                f.write(got + b"!")
                rest = b""
                while chunk := f.read(100):  # until the server's zero-byte message
                    rest += chunk
                return got + rest

        t, box = _in_thread(client)
        conn = lst.accept()
        assert conn.recv(4) == b"ping"
        r, rbox = _in_thread(conn.recv, 100)  # a pending read on the same handle ...
        time.sleep(0.2)
        conn.sendall(b"pong")  # ... does not hold up this write (FILE_FLAG_OVERLAPPED)
        r.join(5)
        assert rbox == [b"pong!"]
        conn.sendall(b" and bye")
        conn.shutdown_write()
        t.join(5)
        assert box == [b"pong and bye"]
        assert conn.recv(100) == b""  # the client closed
        conn.close()

        a, abox = _in_thread(lst.accept)
        time.sleep(0.2)
        lst.close()  # wakes the accept
        a.join(5)
        assert not a.is_alive() and isinstance(abox[0], OSError)
    finally:
        lst.close()
