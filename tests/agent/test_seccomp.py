"""The default seccomp profile compiled once (agent/seccomp.py), loaded into a real process
here as crun loads it in the guest (tests/vm checks it in a container)."""

from __future__ import annotations

import base64
import ctypes
import errno
import os
import platform

import pytest

from agent import runtime, seccomp

#: add_key(2): no capability needed, so only seccomp makes it fail with EPERM.
ADD_KEY = {"x86_64": 248, "aarch64": 217}
GETPID = {"x86_64": 39, "aarch64": 172}
UMOUNT2 = {"x86_64": 166, "aarch64": 39}


def run_filtered(program: bytes, syscall: int) -> int:
    """errno of ``syscall`` (with null arguments) in a child that loaded ``program``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no_new_privs, the filter, the call; its errno goes up the pipe
        try:
            libc = ctypes.CDLL(None, use_errno=True)

            class SockFprog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

            prog = SockFprog(len(program) // 8, program)
            PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                                                                       ctypes.byref(prog), 0, 0):
                os.write(w, b"load failed %d" % ctypes.get_errno())
            else:
                ctypes.set_errno(0)
                rc = libc.syscall(syscall, 0, 0, 0, 0, 0)
                os.write(w, str(ctypes.get_errno() if rc == -1 else 0).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert out.isdigit(), out
    return int(out)


@pytest.mark.skipif(platform.machine() not in ADD_KEY, reason="add_key's number is known for x86_64 and aarch64 only")
def test_the_compiled_default_profile_refuses_what_the_json_profile_refuses() -> None:
    data = seccomp.default_program()
    assert data is not None, "libseccomp.so.2 is a dependency of crun and of the test host"
    program = base64.b64decode(data)
    assert len(program) % 8 == 0 and len(program) > 8
    assert run_filtered(program, ADD_KEY[platform.machine()]) == errno.EPERM
    assert run_filtered(program, GETPID[platform.machine()]) == 0  # everything else is allowed


@pytest.mark.skipif(platform.machine() not in ADD_KEY, reason="the calls' numbers are known for x86_64 and aarch64 only")
def test_an_added_capability_brings_its_system_calls_as_in_dockers_profile() -> None:
    plain, admin = (base64.b64decode(seccomp.program(caps) or "") for caps in ((), ("SYS_ADMIN",)))
    assert run_filtered(plain, UMOUNT2[platform.machine()]) == errno.EPERM
    assert run_filtered(admin, UMOUNT2[platform.machine()]) != errno.EPERM  # reaches the kernel (EFAULT/EINVAL…)
    assert run_filtered(admin, ADD_KEY[platform.machine()]) == errno.EPERM  # keyrings stay refused
    assert "mount" not in runtime.seccomp_deny(("cap_sys_admin",)) and "mount" in runtime.seccomp_deny(("NET_ADMIN",))
    assert runtime.seccomp_deny(("ALL",)) == ("add_key", "get_kernel_syms", "kexec_file_load", "kexec_load", "keyctl",
                                             "move_pages", "nfsservctl",
                                             "open_by_handle_at", "pivot_root", "request_key", "swapoff", "swapon",
                                             "sysfs", "_sysctl", "uselib", "userfaultfd", "ustat", "vm86", "vm86old")


def test_unconfined_has_no_profile_and_no_new_privileges_can_be_turned_off() -> None:
    spec = runtime.ContainerSpec(id="c" * 64, rootfs="/r", process=runtime.ProcessSpec(args=("true",)),
                                 hostname="h", seccomp=False, no_new_privileges=False, seccomp_bpf="AAAA")
    config = runtime.oci_config(spec)
    assert "seccomp" not in config["linux"] and "annotations" not in config
    assert config["process"]["noNewPrivileges"] is False


def test_unknown_names_are_skipped_and_bad_arches_refused() -> None:
    program = seccomp.compile_deny_list(["add_key", "no_such_call"], errno.EPERM, ())
    assert program and len(program) % 8 == 0
    with pytest.raises(seccomp.SeccompError, match="architecture"):
        seccomp.compile_deny_list(["add_key"], errno.EPERM, ("no-such-arch",))


def test_the_bundle_carries_the_program_instead_of_the_json_profile() -> None:
    spec = runtime.ContainerSpec(id="c" * 64, rootfs="/r", process=runtime.ProcessSpec(args=("true",)),
                                 hostname="h", seccomp_bpf="AAAA")
    cfg = runtime.oci_config(spec)
    assert cfg["annotations"] == {"run.oci.seccomp_bpf_data": "AAAA"} and "seccomp" not in cfg["linux"]
    plain = runtime.oci_config(runtime.ContainerSpec(id="c" * 64, rootfs="/r", process=spec.process, hostname="h"))
    assert "annotations" not in plain and plain["linux"]["seccomp"]["syscalls"][0]["names"] == list(runtime.SECCOMP_DENY)
    privileged = runtime.oci_config(runtime.ContainerSpec(id="c" * 64, rootfs="/r", process=spec.process,
                                                          hostname="h", privileged=True, seccomp_bpf="AAAA"))
    assert "annotations" not in privileged and "seccomp" not in privileged["linux"]
