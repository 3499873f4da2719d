"""A container's resource use in the Engine API's stats shape, read from its cgroup (v2) and
its network namespace.

What the clients compute from it, and so what must be right: the CPU percentage is the
container's CPU time over the machine's (``system_cpu_usage``: the sum over all CPUs, from
/proc/stat, as dockerd has it) between this sample and ``precpu_stats``, times the CPUs; the
memory used is ``usage`` less ``stats.inactive_file``; network I/O sums ``networks``; block
I/O sums ``blkio_stats.io_service_bytes_recursive`` by ``op``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: /proc/stat counts in USER_HZ ticks (100 a second on Linux)
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_NET_FIELDS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "", "", "", "",
               "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")


def system_cpu_ns(proc: Path = Path("/proc")) -> int:
    """All CPUs' time since boot, busy or idle, in ns (the first line of /proc/stat)."""
    with open(proc / "stat", "rb") as f:
        first = f.readline().split()
    return sum(int(v) for v in first[1:8]) * _NS_PER_TICK  # user .. softirq, as dockerd sums them


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def _pairs(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def networks(pid: int, proc: Path = Path("/proc")) -> dict[str, dict[str, int]]:
    """Per interface of the process's network namespace, but its loopback."""
    out: dict[str, dict[str, int]] = {}
    for line in _read(proc / str(pid) / "net" / "dev").splitlines()[2:] if pid else ():
        name, _, counters = line.partition(":")
        name = name.strip()
        if not name or name == "lo":
            continue
        values = counters.split()
        out[name] = {k: int(v) for k, v in zip(_NET_FIELDS, values) if k}
    return out


def blkio(cgroup: Path) -> list[dict[str, Any]]:
    """io.stat as dockerd reports it on cgroup v2: bytes read and written per device."""
    out: list[dict[str, Any]] = []
    for line in _read(cgroup / "io.stat").splitlines():
        dev, *fields = line.split()
        major, _, minor = dev.partition(":")
        counts = dict(f.split("=", 1) for f in fields if "=" in f)
        for key, op in (("rbytes", "read"), ("wbytes", "write")):
            if key in counts and major.isdigit() and minor.isdigit():
                out.append({"major": int(major), "minor": int(minor), "op": op, "value": int(counts[key])})
    return out


def cpu_stats(cgroup: Path, online_cpus: int) -> dict[str, Any]:
    cpu = _pairs(_read(cgroup / "cpu.stat"))
    return {"cpu_usage": {"total_usage": cpu.get("usage_usec", 0) * 1000,
                          "usage_in_kernelmode": cpu.get("system_usec", 0) * 1000,
                          "usage_in_usermode": cpu.get("user_usec", 0) * 1000},
            "system_cpu_usage": system_cpu_ns(), "online_cpus": online_cpus,
            "throttling_data": {"periods": cpu.get("nr_periods", 0),
                                "throttled_periods": cpu.get("nr_throttled", 0),
                                "throttled_time": cpu.get("throttled_usec", 0) * 1000}}


def memory_stats(cgroup: Path, machine_bytes: int) -> dict[str, Any]:
    limit = _read(cgroup / "memory.max", "max").strip()
    usage = _read(cgroup / "memory.current", "0").strip()
    return {"usage": int(usage) if usage.isdigit() else 0,
            "limit": int(limit) if limit.isdigit() else machine_bytes,
            "stats": _pairs(_read(cgroup / "memory.stat"))}


def pids_stats(cgroup: Path) -> dict[str, int]:
    current = _read(cgroup / "pids.current", "0").strip()
    limit = _read(cgroup / "pids.max", "max").strip()
    return {"current": int(current) if current.isdigit() else 0, **({"limit": int(limit)} if limit.isdigit() else {})}
