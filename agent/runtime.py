"""OCI bundles for crun: the config.json a container runs with, and the crun calls.

The defaults follow Docker's: its default capability set, masked and read-only /proc and
/sys paths, no_new_privs, a seccomp profile, cgroup v2 limits. Isolation itself is crun's
job; this module only describes what to isolate.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import workers

log = logging.getLogger(__name__)

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/pydesk/crun"
CGROUP_PARENT = "pydesk"

DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)

MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

#: Syscalls refused with EPERM. A deny list (unlike Docker's allow list) keeps the profile
#: short and readable; it covers what Docker's profile refuses to containers without
#: CAP_SYS_ADMIN and friends: kernel modules, kexec, keyrings, namespaces and mounts,
#: clock changes, bpf/perf, cross-process memory access, and obsolete calls.
SECCOMP_DENY = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "get_kernel_syms", "init_module",
    "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie",
    "mount", "mount_setattr", "move_mount", "move_pages", "name_to_handle_at", "nfsservctl",
    "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root", "process_vm_readv",
    "process_vm_writev", "ptrace", "query_module", "quotactl", "reboot", "request_key",
    "setns", "settimeofday", "stime", "swapoff", "swapon", "sysfs", "_sysctl", "umount",
    "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86", "vm86old",
)

#: Kept out of the deny list for a container given the capability, as Docker's profile
#: allows them to it (its "includes": {"caps": [...]} rules).
SECCOMP_BY_CAP = {
    "CAP_SYS_ADMIN": ("bpf", "fsconfig", "fsmount", "fsopen", "fspick", "lookup_dcookie", "mount", "mount_setattr",
                      "move_mount", "name_to_handle_at", "open_tree", "perf_event_open", "quotactl", "setns",
                      "umount", "umount2", "unshare"),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_MODULE": ("create_module", "delete_module", "finit_module", "init_module", "query_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "process_vm_readv", "process_vm_writev", "ptrace"),
    "CAP_SYS_RAWIO": ("ioperm", "iopl"),
    "CAP_SYS_TIME": ("clock_adjtime", "clock_settime", "settimeofday", "stime"),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}


def seccomp_deny(cap_add: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The system calls a container is refused: the deny list less what its added
    capabilities allow, as Docker's profile does."""
    caps = {cap_name(c) for c in cap_add}
    allowed = {name for cap, names in SECCOMP_BY_CAP.items() if cap in caps or "CAP_ALL" in caps for name in names}
    return tuple(name for name in SECCOMP_DENY if name not in allowed)


def cap_name(cap: str) -> str:
    """``net_admin`` or ``NET_ADMIN`` as the kernel's ``CAP_NET_ADMIN`` (as Docker takes them)."""
    return cap.upper() if cap.upper().startswith("CAP_") else "CAP_" + cap.upper()


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def seccomp_profile(deny: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [{"names": list(SECCOMP_DENY if deny is None else deny), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": 1}],
    }


@dataclasses.dataclass(frozen=True)
class Mount:
    destination: str
    source: str
    type: str = "bind"
    options: tuple[str, ...] = ("rbind", "rprivate")

    def to_oci(self) -> dict[str, Any]:
        return {"destination": self.destination, "type": self.type, "source": self.source, "options": list(self.options)}


#: `--ulimit` names and the limits they set.
RLIMITS = {name: f"RLIMIT_{name.upper()}" for name in (
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss",
    "rtprio", "rttime", "sigpending", "stack")}
#: What every container gets unless told otherwise (as Docker Desktop's engine).
DEFAULT_RLIMITS = (("RLIMIT_NOFILE", 1048576, 1048576),)


def rlimits(ulimits: list[dict[str, Any]] | None) -> tuple[tuple[str, int, int], ...]:
    """HostConfig.Ulimits ([{Name, Soft, Hard}]) as (RLIMIT_…, soft, hard), over the defaults;
    ValueError for a name or a pair the kernel would refuse."""
    out = {t: (soft, hard) for t, soft, hard in DEFAULT_RLIMITS}
    for u in ulimits or []:
        if not isinstance(u, dict):
            raise ValueError(f"invalid ulimit {u!r}")  # noqa: TRY004 (a bad request, answered 400)
        name = str(u.get("Name") or "")
        if name not in RLIMITS:
            raise ValueError(f"invalid ulimit type: {name}")
        try:
            soft, hard = int(u.get("Soft", 0)), int(u.get("Hard", 0))
        except (TypeError, ValueError):
            raise ValueError(f"invalid ulimit {name}: soft and hard must be numbers") from None
        if hard != -1 and (soft == -1 or soft > hard):  # (-1: unlimited)
            raise ValueError(f"ulimit soft limit must be less than or equal to hard limit: {soft} > {hard}")
        out[RLIMITS[name]] = (soft, hard)
    return tuple((t, soft, hard) for t, (soft, hard) in out.items())


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (rows, columns) of the terminal at the start
    rlimits: tuple[tuple[str, int, int], ...] = DEFAULT_RLIMITS  # (RLIMIT_…, soft, hard)


@dataclasses.dataclass(frozen=True)
class Resources:
    memory: int | None = None  # bytes
    memory_swap: int | None = None
    nano_cpus: int | None = None  # 1e9 = one CPU
    cpu_shares: int | None = None
    pids_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    id: str
    rootfs: str
    process: ProcessSpec
    hostname: str
    mounts: tuple[Mount, ...] = ()
    resources: Resources = Resources()
    readonly_rootfs: bool = False
    netns: str | None = None  # a path: join it; None: a new, empty one; "host": share the VM's
    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()
    shm_size: int = 64 * 1024 * 1024
    seccomp: bool = True  # False: --security-opt seccomp=unconfined
    no_new_privileges: bool = True
    seccomp_bpf: str | None = None  # the profile compiled (agent/seccomp.py), base64


def _caps(spec: ContainerSpec) -> list[str]:
    if spec.privileged:
        return sorted(ALL_CAPS)
    caps = set(DEFAULT_CAPS)
    if any(c.upper() == "ALL" for c in spec.cap_drop):
        caps = set()
    else:
        caps -= {cap_name(c) for c in spec.cap_drop}
    if any(c.upper() == "ALL" for c in spec.cap_add):
        caps = set(ALL_CAPS)
    else:
        caps |= {cap_name(c) for c in spec.cap_add}
    return sorted(caps)


ALL_CAPS = frozenset(DEFAULT_CAPS) | {
    "CAP_DAC_READ_SEARCH", "CAP_LINUX_IMMUTABLE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_LEASE",
    "CAP_AUDIT_CONTROL", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
}


def oci_config(spec: ContainerSpec) -> dict[str, Any]:
    """The OCI runtime config for ``spec`` (a pure function)."""
    caps = _caps(spec)
    p = spec.process
    env = list(p.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if not any(e.startswith("HOSTNAME=") for e in env):
        env.append(f"HOSTNAME={spec.hostname}")
    if p.terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if spec.netns != "host":
        namespaces.append({"type": "network", **({"path": spec.netns} if spec.netns else {})})
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={spec.shm_size}"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev"] + ([] if spec.privileged else ["ro"])},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime"] + ([] if spec.privileged else ["ro"])},
        *(m.to_oci() for m in spec.mounts),
    ]
    r = spec.resources
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}] if not spec.privileged else [{"allow": True, "access": "rwm"}]}
    if not spec.privileged:
        # The devices every container gets (what Docker allows by default).
        for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, None), (10, 200)):
            rule: dict[str, Any] = {"allow": True, "type": "c", "major": major, "access": "rwm"}
            if minor is not None:
                rule["minor"] = minor
            resources["devices"].append(rule)
    if r.memory:
        resources["memory"] = {"limit": r.memory}
        if r.memory_swap is not None:
            resources["memory"]["swap"] = r.memory_swap
    if r.nano_cpus:
        period = 100_000
        resources["cpu"] = {"quota": r.nano_cpus * period // 1_000_000_000, "period": period}
    if r.cpu_shares:
        resources.setdefault("cpu", {})["shares"] = r.cpu_shares
    if r.pids_limit and r.pids_limit > 0:
        resources["pids"] = {"limit": r.pids_limit}
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": cgroup_path(spec.id),
        "sysctl": dict(spec.sysctls),
        # The container's processes (exec'd ones too) get the default personality: address
        # randomisation on, whatever crun was started with (see ``fixed_addresses``).
        "personality": {"domain": "LINUX"},
    }
    annotations: dict[str, str] = {}
    if not spec.privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
        if not spec.seccomp:
            pass  # --security-opt seccomp=unconfined
        elif spec.seccomp_bpf:  # crun loads it as it is, instead of compiling the JSON profile
            annotations["run.oci.seccomp_bpf_data"] = spec.seccomp_bpf
        else:
            linux["seccomp"] = seccomp_profile(seccomp_deny(spec.cap_add))
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": p.terminal,
            "user": {"uid": p.uid, "gid": p.gid, "additionalGids": list(p.additional_gids)},
            "args": list(p.args),
            "env": env,
            "cwd": p.cwd or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": t, "hard": _unlimited(hard), "soft": _unlimited(soft)} for t, soft, hard in p.rlimits],
            "noNewPrivileges": spec.no_new_privileges and not spec.privileged,
            "oomScoreAdj": 0,
            **({"consoleSize": {"height": p.console_size[0], "width": p.console_size[1]}}
               if p.terminal and p.console_size else {}),
        },
        "root": {"path": spec.rootfs, "readonly": spec.readonly_rootfs},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": linux,
        **({"annotations": annotations} if annotations else {}),
    }


def _unlimited(n: int) -> int:
    """Docker's -1 ("unlimited") as the kernel's RLIM_INFINITY."""
    return 2**64 - 1 if n < 0 else n


def write_file(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """A small file written with plain system calls: ``Path.write_text`` (a text wrapper around
    a buffered file) costs ~1.5 ms more per file in this emulated guest, and a start writes
    four of them."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (a write to a pipe or a terminal may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def bundle_config(spec: ContainerSpec) -> bytes:
    """config.json's content for ``spec``."""
    return json.dumps(oci_config(spec)).encode()  # no indent: json's slow pure-Python encoder


class ConfigPipe:
    """A bundle's config.json as a named pipe, so that crun can be started before its config
    exists: crun's own start-up (an exec and ten shared libraries) overlaps the engine's
    preparation of the container (rootfs, network, /etc files, cgroup), and crun waits in
    open() until ``serve`` has the config to give it.

    crun 1.8 opens config.json twice: to load it, and to copy it into its state directory.
    Every open is given the whole config once, and as a writer is let in, the path is given a
    fresh pipe, so a reader still draining one pipe never gets the config twice. On leaving
    the block (the pid file came, or crun exited: crun is past reading it) the path becomes a
    regular file with the same content (or, given ``keep``, the pipe is removed and ``keep``
    gets the content), which is what `exec` reads later; if nothing was served (the
    preparation failed), the pipe is removed.
    """

    def __init__(self, bundle: Path) -> None:
        self.path = bundle / "config.json"
        self._data: bytes | None = None
        self._keep = self.path
        self._stop = False
        self._job: workers.Job | None = None

    def __enter__(self) -> ConfigPipe:
        self.path.unlink(missing_ok=True)
        os.mkfifo(self.path, 0o600)
        return self

    def serve(self, data: bytes, keep: Path | None = None) -> None:
        self._data = data
        self._keep = keep or self.path
        self._job = workers.spawn(self._serve, name="config")

    def _serve(self) -> None:
        assert self._data is not None
        fresh = self.path.with_name(self.path.name + ".next")
        while not self._stop:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # until a reader comes
            try:
                if self._stop:
                    return  # the reader is __exit__'s
                fresh.unlink(missing_ok=True)
                os.mkfifo(fresh, 0o600)
                os.replace(fresh, self.path)
                view = memoryview(self._data)
                while view:
                    view = view[os.write(fd, view):]
            except BrokenPipeError:
                pass  # the reader went away (crun died): it reads no config
            finally:
                os.close(fd)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        while self._job is not None and not self._job.join(0):
            try:  # a reader lets the writer waiting in open() through, to see it is stopped
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                fd = -1
            try:
                self._job.join(0.05)
            finally:
                if fd >= 0:
                    os.close(fd)
        if self._data is None:
            self.path.unlink(missing_ok=True)
            return
        tmp = self._keep.with_name(self._keep.name + ".tmp")
        write_file(tmp, self._data)
        os.replace(tmp, self._keep)
        if self._keep != self.path:
            self.path.unlink(missing_ok=True)


class RuntimeError_(Exception):
    """crun refused or failed; the message is crun's last line."""


#: personality(2): a program exec'd with this flag is laid out at the same addresses each time.
ADDR_NO_RANDOMIZE = 0x0040000
_PERSONALITY_QUERY = 0xFFFFFFFF
#: Whether crun is started at fixed addresses (``use_fixed_addresses``; the engine turns it on
#: under TCG only).
_fixed = False


def use_fixed_addresses(on: bool) -> None:
    """Under TCG, QEMU keeps the code it translated, looked up by address: a program laid out
    where the previous run of it was reuses that code, one moved by address-space
    randomisation is translated afresh. `crun --version` took 15 against 36 ms in the guest
    (medians of 24, alternating). So the engine starts crun without randomisation there, and
    every container's config resets the personality for its own processes (``oci_config``).
    With a hardware accelerator there is nothing to gain, and crun keeps its randomisation."""
    global _fixed
    _fixed = on


@contextlib.contextmanager
def fixed_addresses() -> Iterator[None]:
    """Programs started in this block, from this thread, run at fixed addresses if the engine
    uses them. personality(2) is the calling thread's own, and a child inherits it from the
    thread that started it, so no other thread's children are affected. (A thread started
    in the block would inherit it too: start none here.)"""
    if not _fixed:
        yield
        return
    old = _libc.personality(_PERSONALITY_QUERY)
    if old < 0 or _libc.personality(old | ADDR_NO_RANDOMIZE) < 0:
        yield  # (personality(2) refused: crun runs as it would anyway)
        return
    try:
        yield
    finally:
        _libc.personality(old)


def crun(*args: str, check: bool = True, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    argv = [CRUN, "--root", CRUN_ROOT, *args]
    log.debug("+ %s", " ".join(argv))
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
    with fixed_addresses():
        proc = subprocess.run(argv, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise RuntimeError_(err[-1] if err else f"crun {args[0]} failed with status {proc.returncode}")
    return proc


def state(container_id: str) -> dict[str, Any] | None:
    proc = crun("state", container_id, check=False)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def kill(container_id: str, signal: str = "TERM", all_processes: bool = False) -> None:
    args = ["kill"] + (["--all"] if all_processes else []) + [container_id, signal]
    crun(*args, check=False)


def delete(container_id: str) -> None:
    """Forget crun's state for the container. `crun run` removes it itself when the container
    exits, so usually there is nothing to do and no process to start."""
    if os.path.lexists(os.path.join(CRUN_ROOT, container_id)):
        crun("delete", "--force", container_id, check=False)


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str, options: str) -> None:
    """mount(2) directly: a `mount` process costs tens of milliseconds under TCG."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    """Unmount, lazily if the file system is still busy."""
    if _libc.umount2(target.encode(), 0) != 0 and _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def cgroup_path(container_id: str) -> str:
    """crun's cgroup for the container, inside one of ours (see ``prepare_cgroup``)."""
    return f"/{CGROUP_PARENT}/{container_id}/ctr"


def cgroup_dir(container_id: str) -> Path:
    return Path("/sys/fs/cgroup") / cgroup_path(container_id).lstrip("/")


def prepare_cgroup(container_id: str) -> Path:
    """Our own cgroup around crun's. crun removes its cgroup as it exits; ours outlives it,
    and cgroup v2 counts events hierarchically, so its memory.events still tells whether the
    container was OOM-killed."""
    outer = Path("/sys/fs/cgroup") / CGROUP_PARENT / container_id
    outer.mkdir(exist_ok=True)
    want = (Path("/sys/fs/cgroup") / CGROUP_PARENT / "cgroup.subtree_control").read_text().split()
    (outer / "cgroup.subtree_control").write_text(" ".join("+" + c for c in want))
    return outer


def oom_killed(container_id: str) -> bool:
    """Whether the kernel OOM-killed anything in the container (our cgroup's memory.events)."""
    try:
        fd = os.open(f"/sys/fs/cgroup/{CGROUP_PARENT}/{container_id}/memory.events", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
                return True
    except (OSError, ValueError):
        pass
    return False


def release_cgroup(container_id: str) -> None:
    """Remove our cgroup (read ``oom_killed`` first if it matters)."""
    outer = Path("/sys/fs/cgroup") / CGROUP_PARENT / container_id
    for d in (outer / "ctr", outer):
        try:
            d.rmdir()
        except OSError:
            pass


def apply_limits(container_id: str, r: Resources, cpu_quota: int | None = None, cpu_period: int | None = None) -> None:
    """New limits on a running container's cgroup (cgroup v2 files, as crun writes them)."""
    cg = cgroup_dir(container_id)

    def put(name: str, value: str) -> None:
        try:
            (cg / name).write_text(value)
        except OSError as exc:
            raise OSError(f"cannot set {name} to {value}: {exc.strerror}") from None

    if r.memory:
        put("memory.max", str(r.memory))
        if r.memory_swap and r.memory_swap > 0:
            put("memory.swap.max", str(max(r.memory_swap - r.memory, 0)))
        elif r.memory_swap == -1:
            put("memory.swap.max", "max")
    if r.nano_cpus:
        period = 100_000
        put("cpu.max", f"{r.nano_cpus * period // 1_000_000_000} {period}")
    elif cpu_quota:
        put("cpu.max", f"{cpu_quota} {cpu_period or 100_000}")
    if r.cpu_shares:
        put("cpu.weight", str(1 + ((r.cpu_shares - 2) * 9999) // 262142))
    if r.pids_limit:
        put("pids.max", str(r.pids_limit) if r.pids_limit > 0 else "max")


def setup_cgroups() -> None:
    """Pure cgroup v2: delegate the controllers to our subtree."""
    root = Path("/sys/fs/cgroup")
    want = [c for c in ("cpu", "memory", "pids", "io", "cpuset") if c in (root / "cgroup.controllers").read_text().split()]
    (root / "cgroup.subtree_control").write_text(" ".join("+" + c for c in want))
    sub = root / CGROUP_PARENT
    sub.mkdir(exist_ok=True)
    (sub / "cgroup.subtree_control").write_text(" ".join("+" + c for c in want))
