"""agent/top.py: `docker top` as dockerd does it: ps with the caller's options, the rows of
the container's PIDs (the real ps of this machine where ps is run)."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent import top

PS_EF = """UID          PID    PPID  C STIME TTY          TIME CMD
root           1       0  0 10:00 ?        00:00:01 /sbin/init
root         812       1  0 10:01 ?        00:00:00 sh -c sleep 600 &&  echo  done
root         813     812  0 10:01 ?        00:00:00 sleep 600
"""


def test_rows_of_the_containers_pids_with_the_command_whole() -> None:
    got = top.parse(PS_EF, {812, 813, 999})
    assert got["Titles"] == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    assert got["Processes"] == [
        ["root", "812", "1", "0", "10:01", "?", "00:00:00", "sh -c sleep 600 && echo done"],
        ["root", "813", "812", "0", "10:01", "?", "00:00:00", "sleep 600"]]
    assert top.parse(PS_EF, set())["Processes"] == []


def test_output_without_a_pid_column_is_an_error() -> None:
    with pytest.raises(top.TopError, match="Couldn't find PID field"):
        top.parse("USER COMMAND\nroot init\n", {1})
    with pytest.raises(top.TopError, match="Couldn't find PID field"):
        top.parse("", {1})


def test_the_real_ps() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        got = top.processes({child.pid})
        assert [r[1] for r in got["Processes"]] == [str(child.pid)] and got["Processes"][0][-1] == "sleep 30"
        custom = top.processes({child.pid, os.getpid()}, "-o pid,comm")
        assert custom["Titles"] == ["PID", "COMMAND"]
        rows = {int(pid): comm for pid, comm in custom["Processes"]}
        assert set(rows) == {child.pid, os.getpid()} and rows[child.pid] == "sleep"
        with pytest.raises(top.TopError, match="ps: "):
            top.processes({child.pid}, "--no-such-option")
        with pytest.raises(top.TopError, match="invalid ps options"):
            top.processes({child.pid}, "-o 'pid")
    finally:
        child.kill()
        child.wait()
