"""The default seccomp profile as a BPF program, compiled once by libseccomp.

crun compiles a container's JSON seccomp profile with libseccomp on every start; under TCG
that is 30–40 ms of each `docker run`. Every container without ``--privileged`` gets the
same profile, so the engine compiles it once, with the same libseccomp (through ctypes: the
guest has no Python binding), and hands the program to crun in the
``run.oci.seccomp_bpf_data`` annotation, which crun loads instead of compiling the JSON.

If libseccomp cannot be loaded, :func:`default_program` returns None and containers carry the
JSON profile as before.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import logging
import os
import platform
import tempfile
from collections.abc import Iterable

log = logging.getLogger(__name__)

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
NR_SCMP_ERROR = -1

#: The architectures a task on this kernel can make system calls in (Docker's archMap).
COMPAT_ARCHES = {"x86_64": ("x86_64", "x86", "x32"), "aarch64": ("aarch64", "arm")}


class SeccompError(Exception):
    """libseccomp is missing or refused the profile."""


def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise SeccompError(f"libseccomp is not available: {exc}") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def compile_deny_list(syscalls: Iterable[str], errno: int, arches: Iterable[str]) -> bytes:
    """A filter that allows everything but ``syscalls``, which fail with ``errno``, for the
    native architecture and ``arches``. Names the kernel does not have are skipped (as crun
    does for a JSON profile)."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        for arch in arches:
            token = lib.seccomp_arch_resolve_name(arch.encode())
            if token == 0:
                raise SeccompError(f"libseccomp does not know the architecture {arch}")
            rc = lib.seccomp_arch_add(ctx, token)
            if rc < 0 and rc != -17:  # -EEXIST: the native one is there already
                raise SeccompError(f"seccomp_arch_add({arch}): {os.strerror(-rc)}")
        for name in syscalls:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == NR_SCMP_ERROR:
                continue
            rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ERRNO | (errno & 0xFFFF), nr, 0)
            if rc < 0:
                raise SeccompError(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc < 0:
                raise SeccompError(f"seccomp_export_bpf: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


def default_program() -> str | None:
    """The default profile (agent.runtime.SECCOMP_DENY, EPERM) for this machine, base64 as
    crun's annotation wants it; None when it cannot be compiled here."""
    return program(())


def program(cap_add: tuple[str, ...]) -> str | None:
    """The profile for a container given ``cap_add`` (some capabilities bring system calls
    with them, as in Docker's profile), compiled once per distinct deny list."""
    from agent.runtime import seccomp_deny

    return _program(seccomp_deny(cap_add))


@functools.cache
def _program(deny: tuple[str, ...]) -> str | None:
    arches = COMPAT_ARCHES.get(platform.machine(), (platform.machine(),))
    try:
        bpf = compile_deny_list(deny, 1, arches)
    except SeccompError as exc:
        log.warning("containers get the JSON seccomp profile (crun compiles it each start): %s", exc)
        return None
    return base64.b64encode(bpf).decode()
