"""Choosing the accelerator: hvf (macOS), whpx (Windows), kvm (Linux), else tcg.

A device file or a sysctl saying "supported" is not proof: on nested or paravirtual hosts
``/dev/kvm`` opens fine and a guest then hangs before its first instruction. So each
candidate gets a probe boot: the guest kernel alone, with a short deadline, must print its
banner. The verdict is cached per host (QEMU binary, host kernel) with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess

import threading
import time
from pathlib import Path

from vmkit.argv import probe_argv
from vmkit.errors import ConfigError, ToolNotFound
from vmkit.host import Host
from vmkit.run import spawn
from vmkit.spec import Accel, Arch, HostOS

log = logging.getLogger(__name__)

PROBE_DEADLINE = 5.0
BANNER = b"Linux version"


@dataclasses.dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"accel": str(self.accel), "reason": self.reason}


def native_candidate(host: Host, guest: Arch) -> Accel | None:
    """The hardware accelerator this host OS offers for ``guest``, if any."""
    if host.arch is not guest:
        return None
    return {HostOS.LINUX: Accel.KVM, HostOS.DARWIN: Accel.HVF, HostOS.WINDOWS: Accel.WHPX}[host.os]


def precheck(accel: Accel) -> str | None:
    """Cheap checks before a probe boot; returns why the accelerator cannot work, or None."""
    if accel is Accel.KVM:
        if not os.path.exists("/dev/kvm"):
            return "/dev/kvm does not exist (KVM not enabled or not loaded)"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "/dev/kvm is not accessible to this user (add yourself to the 'kvm' group)"
    if accel is Accel.HVF:
        try:
            out = subprocess.run(["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True, timeout=5)
            if out.stdout.strip() != "1":
                return "macOS reports no Hypervisor.framework support (kern.hv_support != 1)"
        except (OSError, subprocess.SubprocessError):
            return "cannot query kern.hv_support"
    return None


def probe_boot(host: Host, guest: Arch, accel: Accel, kernel: str, deadline: float = PROBE_DEADLINE) -> str | None:
    """Boot ``kernel`` under ``accel``; None when it printed its banner in time, else why not."""
    argv = probe_argv(host, guest, accel, kernel)
    try:
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except ToolNotFound:
        raise
    seen = threading.Event()
    out = bytearray()

    def reader() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            out.extend(chunk)
            if BANNER in out:
                seen.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    started = time.monotonic()
    while not seen.is_set() and proc.poll() is None and time.monotonic() - started < deadline:
        seen.wait(0.05)
    ok = seen.is_set()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
    if ok:
        return None
    if err:
        return f"QEMU failed with {accel}: {err.splitlines()[-1]}"
    if proc.returncode not in (None, 0, -9) and time.monotonic() - started < deadline:
        return f"QEMU exited with status {proc.returncode} under {accel}"
    return f"a probe guest printed nothing in {deadline:g}s under {accel} (nested or paravirtual virtualization?)"


def _cache_key(host: Host, guest: Arch, accel: Accel, kernel: str) -> str:
    binary = host.qemu_binary(guest)
    from shutil import which

    resolved = which(binary) or binary
    try:
        st = os.stat(resolved)
        qemu_id = f"{resolved}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        qemu_id = resolved
    parts = [str(host.os), str(host.arch), platform.release(), str(guest), str(accel), qemu_id, Path(kernel).name]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def choose(host: Host, guest: Arch, kernel: str, *, cache_file: Path | None = None,
           requested: Accel | None = None) -> AccelChoice:
    """Pick the accelerator for ``guest`` on ``host``. ``requested`` forces one (tcg always
    works; a hardware one must pass its probe)."""
    if requested is Accel.TCG:
        return AccelChoice(Accel.TCG, "tcg requested in settings")
    candidate = requested or native_candidate(host, guest)
    if requested is not None and requested is not native_candidate(host, guest):
        raise ConfigError(f"accelerator {requested} is not available on {host.os} for {guest} guests",
                          hint="use 'auto' or 'tcg'")
    if candidate is None:
        return AccelChoice(Accel.TCG, f"no hardware accelerator for {guest} guests on a {host.arch} host")
    why = precheck(candidate)
    if why is None:
        cache = _read_cache(cache_file)
        key = _cache_key(host, guest, candidate, kernel)
        if key in cache:
            why = cache[key] or None
            log.debug("accelerator probe for %s cached: %s", candidate, why or "works")
        else:
            why = probe_boot(host, guest, candidate, kernel)
            cache[key] = why or ""
            _write_cache(cache_file, cache)
    if why is None:
        return AccelChoice(candidate, f"{candidate} probe boot succeeded")
    if requested is not None:
        raise ConfigError(f"accelerator {candidate} does not work here: {why}", hint="use 'auto' or 'tcg'")
    return AccelChoice(Accel.TCG, f"{candidate} unusable: {why}; using tcg (software emulation, slower)")


def _read_cache(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path | None, cache: dict[str, str]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)


