"""The ctypes boundary (vmkit/named_pipe_win32.py) with stub DLL functions, on any OS.

The real kernel32/advapi32 calls need Windows; this checks the control flow around them:
which calls an overlapped operation makes, and in which order — above all that a wait cut
short by the cancel event or a timeout is followed by CancelIoEx and then a *waiting*
GetOverlappedResult, so no buffer is freed while the kernel may still use it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pytest

from vmkit import named_pipe_win32 as w
from vmkit.named_pipe import (
    ERROR_BROKEN_PIPE,
    ERROR_IO_PENDING,
    ERROR_OPERATION_ABORTED,
    ERROR_PIPE_CONNECTED,
    WAIT_TIMEOUT,
)

PIPE, EVENT, CANCEL = 11, 22, 33


class Stub:
    """A DLL whose functions are Python callables that record their calls."""

    def __init__(self, log: list[tuple[Any, ...]], **fns: Callable[..., Any]) -> None:
        self._log = log
        self._fns = fns

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = self._fns.get(name, lambda *a: 1)

        def call(*args: Any) -> Any:
            self._log.append((name, *args))
            return fn(*args)

        return call


def _api(monkeypatch: pytest.MonkeyPatch, errors: list[int], **fns: Callable[..., Any]
         ) -> tuple[w.Win32PipeApi, list[tuple[Any, ...]]]:
    log: list[tuple[Any, ...]] = []
    monkeypatch.setattr(w, "_last_error", lambda: errors.pop(0) if errors else 0)
    api = w.Win32PipeApi.__new__(w.Win32PipeApi)
    api._k = api._a = Stub(log, **fns)
    return api, log


def _fill(data: bytes) -> Callable[..., int]:
    def read_file(pipe: int, buf: Any, size: int, nread: Any, ov: Any) -> int:
        ctypes.memmove(buf, data, len(data))
        return 0

    return read_file


def _result(ok: int, n: int) -> Callable[..., int]:
    def gor(handle: int, ov: Any, done: Any, wait: bool) -> int:
        done._obj.value = n
        return ok

    return gor


def _names(log: list[tuple[Any, ...]]) -> list[str]:
    return [c[0] for c in log]


def test_read_completed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_file(pipe: int, buf: Any, size: int, nread: Any, ov: Any) -> int:
        ctypes.memmove(buf, b"abc", 3)
        return 1

    api, log = _api(monkeypatch, [], ReadFile=read_file, GetOverlappedResult=_result(1, 3))
    assert api.read(PIPE, 100, EVENT, CANCEL, w.INFINITE) == (0, b"abc")
    assert _names(log) == ["ResetEvent", "ReadFile", "GetOverlappedResult"]


def test_read_pending_then_done(monkeypatch: pytest.MonkeyPatch) -> None:
    api, log = _api(monkeypatch, [ERROR_IO_PENDING], ReadFile=_fill(b"xy"),
                    WaitForMultipleObjects=lambda n, h, all_, t: w.WAIT_OBJECT_0,
                    GetOverlappedResult=_result(1, 2))
    assert api.read(PIPE, 100, EVENT, CANCEL, w.INFINITE) == (0, b"xy")
    assert _names(log) == ["ResetEvent", "ReadFile", "WaitForMultipleObjects", "GetOverlappedResult"]
    wait = log[2]
    assert list(wait[2]) == [EVENT, CANCEL] and wait[4] == w.INFINITE
    assert log[3][4] is True  # bWait


@pytest.mark.parametrize(("woke", "code"), [(w.WAIT_OBJECT_0 + 1, ERROR_OPERATION_ABORTED),
                                            (WAIT_TIMEOUT, WAIT_TIMEOUT)])
def test_a_cut_short_wait_cancels_and_waits_for_the_cancellation(monkeypatch: pytest.MonkeyPatch,
                                                                  woke: int, code: int) -> None:
    api, log = _api(monkeypatch, [ERROR_IO_PENDING, ERROR_OPERATION_ABORTED], ReadFile=_fill(b""),
                    WaitForMultipleObjects=lambda n, h, all_, t: woke, GetOverlappedResult=_result(0, 0))
    assert api.read(PIPE, 100, EVENT, CANCEL, 50) == (code, b"")
    assert _names(log) == ["ResetEvent", "ReadFile", "WaitForMultipleObjects", "CancelIoEx", "GetOverlappedResult"]
    assert log[2][4] == 50
    assert log[3][1] == PIPE and log[4][4] is True  # cancel this very operation, then wait for it


def test_an_operation_that_beat_the_cancel_keeps_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    api, log = _api(monkeypatch, [ERROR_IO_PENDING], ReadFile=_fill(b"late"),
                    WaitForMultipleObjects=lambda n, h, all_, t: w.WAIT_OBJECT_0 + 1,
                    GetOverlappedResult=_result(1, 4))
    assert api.read(PIPE, 100, EVENT, CANCEL, w.INFINITE) == (0, b"late")


def test_immediate_failures_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    api, log = _api(monkeypatch, [ERROR_BROKEN_PIPE], ReadFile=lambda *a: 0)
    assert api.read(PIPE, 100, EVENT, CANCEL, w.INFINITE) == (ERROR_BROKEN_PIPE, b"")
    assert _names(log) == ["ResetEvent", "ReadFile"]
    api, log = _api(monkeypatch, [ERROR_PIPE_CONNECTED], ConnectNamedPipe=lambda *a: 0)
    assert api.connect(PIPE, EVENT, CANCEL) == ERROR_PIPE_CONNECTED
    assert _names(log) == ["ResetEvent", "ConnectNamedPipe"]


def test_a_zero_byte_write_passes_a_valid_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    api, log = _api(monkeypatch, [], WriteFile=lambda *a: 1, GetOverlappedResult=_result(1, 0))
    assert api.write(PIPE, b"", EVENT, CANCEL, w.INFINITE) == (0, 0)
    write = log[1]
    assert write[0] == "WriteFile" and write[3] == 0 and ctypes.sizeof(write[2]) == 1


def test_create_pipe_frees_the_security_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def convert(sddl: str, rev: int, out: Any, size: Any) -> int:
        out._obj.value = 0x5000
        return 1

    def create(name: str, *args: Any) -> Any:
        seen.append(args[-1]._obj)
        return 0x77

    api, log = _api(monkeypatch, [], ConvertStringSecurityDescriptorToSecurityDescriptorW=convert,
                    CreateNamedPipeW=create)
    assert api.create_pipe("p", 1, 2, 255, 4, 5, "D:P") == (0x77, 0)
    assert seen[0].lpSecurityDescriptor == 0x5000 and seen[0].nLength == ctypes.sizeof(w.SECURITY_ATTRIBUTES)
    assert log[1][:8] == ("CreateNamedPipeW", "p", 1, 2, 255, 4, 5, 0)
    assert log[-1][0] == "LocalFree"

    api, log = _api(monkeypatch, [231], ConvertStringSecurityDescriptorToSecurityDescriptorW=convert,
                    CreateNamedPipeW=lambda *a: w.INVALID_HANDLE_VALUE)
    assert api.create_pipe("p", 1, 2, 255, 4, 5, "D:P") == (0, 231)
    assert log[-1][0] == "LocalFree"


def test_current_user_sid(monkeypatch: pytest.MonkeyPatch) -> None:
    def open_token(process: Any, access: int, out: Any) -> int:
        out._obj.value = 0x99
        return 1

    def token_info(token: Any, cls: int, buf: Any, size: int, needed: Any) -> int:
        assert cls == w.TOKEN_USER
        if buf is None:
            needed._obj.value = 64
            return 0  # ERROR_INSUFFICIENT_BUFFER
        assert size == 64
        ctypes.cast(buf, ctypes.POINTER(w.SID_AND_ATTRIBUTES)).contents.Sid = 0x1234
        return 1

    sids: list[Any] = []

    def to_string(sid: Any, out: Any) -> int:
        sids.append(sid)
        out._obj.value = "S-1-5-21-1-2-3-1001"
        return 1

    api, log = _api(monkeypatch, [], OpenProcessToken=open_token, GetTokenInformation=token_info,
                    ConvertSidToStringSidW=to_string)
    assert api.current_user_sid() == "S-1-5-21-1-2-3-1001"
    assert sids == [0x1234]
    assert _names(log) == ["GetCurrentProcess", "OpenProcessToken", "GetTokenInformation", "GetTokenInformation",
                           "ConvertSidToStringSidW", "LocalFree", "CloseHandle"]
    assert log[2][1].value == 0x99 and log[-1][1].value == 0x99  # the token is queried, then closed
