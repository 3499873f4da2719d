"""The Win32 calls behind ``vmkit.named_pipe``: ctypes on kernel32 and advapi32.

Thin on purpose — one method per call, Win32 error codes returned rather than interpreted —
so everything that decides what the codes mean lives in ``named_pipe.py``, where it is tested
on Linux with a fake. This module imports on any OS (``ctypes.wintypes`` does); only making a
``Win32PipeApi`` needs Windows.

Every overlapped operation here (``_overlapped``) owns its OVERLAPPED structure and buffer
until the kernel is done with them: when it stops waiting early (the cancel event, or a
timeout) it calls ``CancelIoEx`` and then ``GetOverlappedResult(..., bWait=TRUE)``, which
returns only once the operation has completed or been cancelled.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from ctypes import wintypes
from typing import Any

from vmkit.named_pipe import ERROR_IO_PENDING, ERROR_MORE_DATA, ERROR_OPERATION_ABORTED, INFINITE, WAIT_TIMEOUT

TOKEN_QUERY = 0x0008
TOKEN_USER = 1  # TOKEN_INFORMATION_CLASS.TokenUser
SDDL_REVISION_1 = 1
WAIT_OBJECT_0 = 0x00000000
WAIT_FAILED = 0xFFFFFFFF
INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value


class OVERLAPPED(ctypes.Structure):
    # the Offset/OffsetHigh pair shares a union with a pointer; as two DWORDs it has the size of both
    _fields_ = [("Internal", ctypes.c_size_t), ("InternalHigh", ctypes.c_size_t),
                ("Offset", wintypes.DWORD), ("OffsetHigh", wintypes.DWORD), ("hEvent", wintypes.HANDLE)]


class SECURITY_ATTRIBUTES(ctypes.Structure):
    _fields_ = [("nLength", wintypes.DWORD), ("lpSecurityDescriptor", wintypes.LPVOID),
                ("bInheritHandle", wintypes.BOOL)]


class SID_AND_ATTRIBUTES(ctypes.Structure):  # TOKEN_USER is one of these
    _fields_ = [("Sid", wintypes.LPVOID), ("Attributes", wintypes.DWORD)]


_H = wintypes.HANDLE
_PTR = ctypes.POINTER
_KERNEL32: dict[str, tuple[Any, list[Any]]] = {
    "CreateNamedPipeW": (_H, [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD, wintypes.DWORD,
                              wintypes.DWORD, wintypes.DWORD, _PTR(SECURITY_ATTRIBUTES)]),
    "ConnectNamedPipe": (wintypes.BOOL, [_H, _PTR(OVERLAPPED)]),
    "DisconnectNamedPipe": (wintypes.BOOL, [_H]),
    "ReadFile": (wintypes.BOOL, [_H, wintypes.LPVOID, wintypes.DWORD, _PTR(wintypes.DWORD), _PTR(OVERLAPPED)]),
    "WriteFile": (wintypes.BOOL, [_H, wintypes.LPCVOID, wintypes.DWORD, _PTR(wintypes.DWORD), _PTR(OVERLAPPED)]),
    "GetOverlappedResult": (wintypes.BOOL, [_H, _PTR(OVERLAPPED), _PTR(wintypes.DWORD), wintypes.BOOL]),
    "CancelIoEx": (wintypes.BOOL, [_H, _PTR(OVERLAPPED)]),
    "CreateEventW": (_H, [wintypes.LPVOID, wintypes.BOOL, wintypes.BOOL, wintypes.LPCWSTR]),
    "SetEvent": (wintypes.BOOL, [_H]),
    "ResetEvent": (wintypes.BOOL, [_H]),
    "WaitForMultipleObjects": (wintypes.DWORD, [wintypes.DWORD, _PTR(_H), wintypes.BOOL, wintypes.DWORD]),
    "CloseHandle": (wintypes.BOOL, [_H]),
    "GetCurrentProcess": (_H, []),
    "LocalFree": (wintypes.LPVOID, [wintypes.LPVOID]),
}
_ADVAPI32: dict[str, tuple[Any, list[Any]]] = {
    "OpenProcessToken": (wintypes.BOOL, [_H, wintypes.DWORD, _PTR(_H)]),
    "GetTokenInformation": (wintypes.BOOL, [_H, ctypes.c_int, wintypes.LPVOID, wintypes.DWORD,
                                            _PTR(wintypes.DWORD)]),
    "ConvertSidToStringSidW": (wintypes.BOOL, [wintypes.LPVOID, _PTR(wintypes.LPWSTR)]),
    "ConvertStringSecurityDescriptorToSecurityDescriptorW": (
        wintypes.BOOL, [wintypes.LPCWSTR, wintypes.DWORD, _PTR(wintypes.LPVOID), _PTR(wintypes.ULONG)]),
}


@functools.cache
def _dlls() -> tuple[Any, Any]:
    """kernel32 and advapi32 with prototypes; our own WinDLL objects, so setting argtypes
    here does not change ``ctypes.windll`` for anyone else."""
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)  # type: ignore[attr-defined]
    for dll, table in ((kernel32, _KERNEL32), (advapi32, _ADVAPI32)):
        for name, (restype, argtypes) in table.items():
            fn = getattr(dll, name)
            fn.restype = restype
            fn.argtypes = argtypes
    return kernel32, advapi32


def _last_error() -> int:
    return ctypes.get_last_error()  # type: ignore[attr-defined]


class Win32PipeApi:
    """``named_pipe.PipeApi`` on the real Win32 API (Windows only)."""

    def __init__(self) -> None:
        self._k, self._a = _dlls()

    # --- identity and creation ------------------------------------------------------------
    def current_user_sid(self) -> str:
        token = _H()
        if not self._a.OpenProcessToken(self._k.GetCurrentProcess(), TOKEN_QUERY, ctypes.byref(token)):
            raise ctypes.WinError(_last_error())  # type: ignore[attr-defined]
        try:
            size = wintypes.DWORD(0)
            self._a.GetTokenInformation(token, TOKEN_USER, None, 0, ctypes.byref(size))  # asks for the size
            buf = ctypes.create_string_buffer(max(size.value, ctypes.sizeof(SID_AND_ATTRIBUTES)))
            if not self._a.GetTokenInformation(token, TOKEN_USER, buf, len(buf), ctypes.byref(size)):
                raise ctypes.WinError(_last_error())  # type: ignore[attr-defined]
            user = ctypes.cast(buf, _PTR(SID_AND_ATTRIBUTES)).contents
            text = wintypes.LPWSTR()
            if not self._a.ConvertSidToStringSidW(user.Sid, ctypes.byref(text)):
                raise ctypes.WinError(_last_error())  # type: ignore[attr-defined]
            try:
                return str(text.value)
            finally:
                self._k.LocalFree(ctypes.cast(text, wintypes.LPVOID))
        finally:
            self._k.CloseHandle(token)

    def create_pipe(self, name: str, open_mode: int, pipe_mode: int, max_instances: int,
                    out_size: int, in_size: int, sddl: str) -> tuple[int, int]:
        sd = wintypes.LPVOID()
        if not self._a.ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, SDDL_REVISION_1,
                                                                             ctypes.byref(sd), None):
            return 0, _last_error()
        try:
            sa = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), sd, False)
            handle = self._k.CreateNamedPipeW(name, open_mode, pipe_mode, max_instances, out_size, in_size,
                                              0, ctypes.byref(sa))
            if handle is None or handle == INVALID_HANDLE_VALUE:
                return 0, _last_error()
            return int(handle), 0
        finally:
            self._k.LocalFree(sd)

    # --- overlapped operations ----------------------------------------------------------
    def _overlapped(self, start: Callable[[Any], int], handle: int, event: int, cancel: int,
                    timeout_ms: int) -> tuple[int, int]:
        """Run one overlapped call; (0 or error, bytes transferred)."""
        ov = OVERLAPPED()
        ov.hEvent = event
        self._k.ResetEvent(event)
        ok = start(ctypes.byref(ov))
        code = 0 if ok else _last_error()
        if not ok and code not in (ERROR_IO_PENDING, ERROR_MORE_DATA):
            return code, 0  # failed at once (ERROR_PIPE_CONNECTED, ERROR_BROKEN_PIPE, ...)
        stopped = 0
        if code == ERROR_IO_PENDING:
            waits = (_H * 2)(event, cancel)
            woke = self._k.WaitForMultipleObjects(2, waits, False, timeout_ms)
            if woke != WAIT_OBJECT_0:
                if woke == WAIT_OBJECT_0 + 1:
                    stopped = ERROR_OPERATION_ABORTED
                elif woke == WAIT_TIMEOUT:
                    stopped = WAIT_TIMEOUT
                else:
                    stopped = _last_error() or ERROR_OPERATION_ABORTED
                self._k.CancelIoEx(handle, ctypes.byref(ov))
        done = wintypes.DWORD(0)
        # bWait=TRUE: returns once the operation completed or its cancellation did, never before
        if self._k.GetOverlappedResult(handle, ctypes.byref(ov), ctypes.byref(done), True):
            return 0, done.value  # it finished (perhaps just before the cancel): keep its result
        code = _last_error()
        if code == ERROR_OPERATION_ABORTED and stopped:
            return stopped, done.value
        return code, done.value

    def connect(self, pipe: int, event: int, cancel: int) -> int:
        code, _ = self._overlapped(lambda ov: self._k.ConnectNamedPipe(pipe, ov), pipe, event, cancel, INFINITE)
        return code

    def disconnect(self, pipe: int) -> int:
        return 0 if self._k.DisconnectNamedPipe(pipe) else _last_error()

    def read(self, pipe: int, size: int, event: int, cancel: int, timeout_ms: int) -> tuple[int, bytes]:
        buf = ctypes.create_string_buffer(size)
        code, n = self._overlapped(lambda ov: self._k.ReadFile(pipe, buf, size, None, ov),
                                   pipe, event, cancel, timeout_ms)
        return code, ctypes.string_at(buf, n)

    def write(self, pipe: int, data: bytes, event: int, cancel: int, timeout_ms: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(data, max(len(data), 1))  # a valid pointer even for b""
        return self._overlapped(lambda ov: self._k.WriteFile(pipe, buf, len(data), None, ov),
                                pipe, event, cancel, timeout_ms)

    # --- events and handles -------------------------------------------------------------
    def create_event(self) -> int:
        handle = self._k.CreateEventW(None, True, False, None)
        if not handle:
            raise ctypes.WinError(_last_error())  # type: ignore[attr-defined]
        return int(handle)

    def set_event(self, event: int) -> None:
        self._k.SetEvent(event)

    def close_handle(self, handle: int) -> None:
        self._k.CloseHandle(handle)
