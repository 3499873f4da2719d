"""agent/stats.py: a container's resource use read from cgroup v2 files and /proc, in the
shape the Engine API's stats have (the files here are written as the kernel writes them)."""

from __future__ import annotations

import os
from pathlib import Path

from agent import stats


def test_system_cpu_is_every_cpus_time_as_dockerd_sums_it(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  100 2 30 4000 5 6 7 8 9 10\ncpu0 50 1 15 2000 2 3 3 4 4 5\n")
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert stats.system_cpu_ns(tmp_path) == (100 + 2 + 30 + 4000 + 5 + 6 + 7) * tick
    real = stats.system_cpu_ns()
    assert real > 0 and stats.system_cpu_ns() >= real


def test_networks_of_the_namespace_but_loopback(tmp_path: Path) -> None:
    (tmp_path / "42" / "net").mkdir(parents=True)
    (tmp_path / "42" / "net" / "dev").write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0\n"
        "  eth0:    9871      61    1    2    0     0          0         0     1234      17    3    4    0     0       0          0\n")
    assert stats.networks(42, tmp_path) == {"eth0": {
        "rx_bytes": 9871, "rx_packets": 61, "rx_errors": 1, "rx_dropped": 2,
        "tx_bytes": 1234, "tx_packets": 17, "tx_errors": 3, "tx_dropped": 4}}
    assert stats.networks(0, tmp_path) == {} and stats.networks(43, tmp_path) == {}


def test_cgroup_files(tmp_path: Path) -> None:
    (tmp_path / "io.stat").write_text("254:16 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=1 wbytes=0\n")
    assert stats.blkio(tmp_path) == [
        {"major": 254, "minor": 16, "op": "read", "value": 4096}, {"major": 254, "minor": 16, "op": "write", "value": 8192},
        {"major": 8, "minor": 0, "op": "read", "value": 1}, {"major": 8, "minor": 0, "op": "write", "value": 0}]
    (tmp_path / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 3\n"
                                       "nr_throttled 1\nthrottled_usec 20\n")
    cpu = stats.cpu_stats(tmp_path, 2)
    assert cpu["cpu_usage"] == {"total_usage": 1_500_000, "usage_in_kernelmode": 500_000, "usage_in_usermode": 1_000_000}
    assert cpu["online_cpus"] == 2 and cpu["throttling_data"] == {"periods": 3, "throttled_periods": 1, "throttled_time": 20_000}
    (tmp_path / "memory.current").write_text("1048576\n")
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.stat").write_text("anon 4096\nfile 8192\ninactive_file 4096\n")
    assert stats.memory_stats(tmp_path, 999) == {"usage": 1048576, "limit": 999,
                                                 "stats": {"anon": 4096, "file": 8192, "inactive_file": 4096}}
    (tmp_path / "memory.max").write_text("33554432\n")
    assert stats.memory_stats(tmp_path, 999)["limit"] == 33554432
    (tmp_path / "pids.current").write_text("3\n")
    (tmp_path / "pids.max").write_text("max\n")
    assert stats.pids_stats(tmp_path) == {"current": 3}
    (tmp_path / "pids.max").write_text("20\n")
    assert stats.pids_stats(tmp_path) == {"current": 3, "limit": 20}


def test_a_cgroup_that_is_gone_reads_as_nothing(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    assert stats.blkio(gone) == [] and stats.pids_stats(gone) == {"current": 0}
    assert stats.memory_stats(gone, 5) == {"usage": 0, "limit": 5, "stats": {}}
    assert stats.cpu_stats(gone, 1)["cpu_usage"]["total_usage"] == 0
