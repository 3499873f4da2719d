"""How a start hears from crun (agent/engine.py ``PidFifo``, ``exit_status``): the pid the
moment it is written to the pipe, and crun's status when it fails without writing one, even
while the container's reaper is already waiting on it."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from agent.launcher import PidFifo, exit_status


def test_the_pid_arrives_as_soon_as_it_is_written(tmp_path: Path) -> None:
    with PidFifo(tmp_path / "init.pid") as fifo:
        # as crun does: open the path, write the number, close it; then go on running
        proc = subprocess.Popen(["sh", "-c", f"printf 4242 > {fifo.path}; sleep 30"])
        try:
            t0 = time.monotonic()
            assert fifo.wait(proc, timeout=20) == 4242
            assert time.monotonic() - t0 < 10 and proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
    assert not fifo.path.exists()  # no stale pipe is left where a pid file is expected


def test_a_crun_that_fails_before_writing_gives_no_pid_and_its_status(tmp_path: Path) -> None:
    with PidFifo(tmp_path / "init.pid") as fifo:
        proc = subprocess.Popen(["sh", "-c", "sleep 0.2; exit 1"])
        reaper = threading.Thread(target=proc.wait)  # the engine's reaper waits on crun from the start
        reaper.start()
        t0 = time.monotonic()
        assert fifo.wait(proc, timeout=20) == 0
        assert time.monotonic() - t0 < 10  # it woke on crun's exit, not on the timeout
        assert exit_status(proc) == 1
        reaper.join(5)


def test_a_pid_written_in_pieces_or_garbage(tmp_path: Path) -> None:
    with PidFifo(tmp_path / "init.pid") as fifo:
        proc = subprocess.Popen(["sh", "-c", f"exec 3>{fifo.path}; printf 12 >&3; sleep 0.3; printf 34 >&3; exec 3>&-; sleep 30"])
        try:
            assert fifo.wait(proc, timeout=20) == 1234  # read until crun closes it
        finally:
            proc.kill()
            proc.wait()
    with PidFifo(tmp_path / "init.pid") as fifo:
        proc = subprocess.Popen(["sh", "-c", f"printf oops > {fifo.path}; sleep 30"])
        try:
            assert fifo.wait(proc, timeout=20) == 0
        finally:
            proc.kill()
            proc.wait()


def test_exit_status_of_a_running_process_is_none_after_the_timeout() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert exit_status(proc, timeout=0.2) is None
    finally:
        proc.kill()
        proc.wait()
