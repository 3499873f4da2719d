"""A container start waits for crun's terminal only once crun has its config
(agent/containers.py ``Process(connect=False)``, ``connect``, ``kill``).

The stand-in for crun is a real process that does what crun does with ``--console-socket``:
it makes a pty, sends the master over the socket with SCM_RIGHTS, and writes to the slave."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from agent import containers
from agent.containers import Process

FAKE_CRUN = """
import array, os, pty, socket, sys, time
args = sys.argv[1:]
sock = args[args.index("--console-socket") + 1]
if "hang" in args:
    time.sleep(60)
if "fail" in args:  # as crun when the container cannot start: it says why and exits
    sys.stderr.write("executable file `nope` not found in $PATH\\n")
    sys.exit(1)
if "fail-connected" in args:  # or it connects, sends nothing, and exits a moment later
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.close()
    time.sleep(0.5)
    sys.stderr.write("cannot open `/nope`\\n")
    sys.exit(1)
master, slave = pty.openpty()
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]))])
s.close()
os.close(master)
os.write(slave, b"hello from the container\\r\\n")
time.sleep(0.5)
"""


@pytest.fixture(autouse=True)
def console_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "console"
    monkeypatch.setattr(containers, "CONSOLE_DIR", d)
    return d


def _process(tmp_path: Path, *extra: str) -> tuple[Process, list[bytes]]:
    out: list[bytes] = []
    proc = Process([sys.executable, "-c", FAKE_CRUN, "run", *extra], tty=True, stdin=False,
                   console_dir=tmp_path, on_output=lambda _s, data: out.append(data), connect=False)
    return proc, out


def test_the_terminal_is_taken_when_connect_is_called(tmp_path: Path, console_dir: Path) -> None:
    proc, out = _process(tmp_path)
    assert proc.master is None  # not waited for yet: the start is still preparing
    proc.connect()
    assert proc.master is not None
    assert proc.proc.wait(20) == 0
    proc.drain(5)
    assert b"hello from the container" in b"".join(out)
    assert list(console_dir.iterdir()) == []  # the socket is gone once the terminal came


def test_input_and_resizes_after_the_terminal_is_closed_touch_nothing(tmp_path: Path) -> None:
    # an attach's input or a resize that comes as the process ends must not use the
    # terminal's fd number after its close: by then it may be another file's
    proc, _ = _process(tmp_path)
    proc.connect()
    number = proc.master
    proc.resize(30, 100)
    assert proc.proc.wait(20) == 0
    proc.drain(5)
    other = tmp_path / "other"
    fd = os.open(other, os.O_RDWR | os.O_CREAT)
    assert number is not None
    os.dup2(fd, number)  # another file now has the terminal's number
    try:
        proc.write_stdin(b"typed late")
        proc.resize(40, 120)
        assert other.read_bytes() == b""
    finally:
        os.close(number)
        os.close(fd)


def test_kill_before_connect_leaves_no_socket_and_no_waiting_worker(tmp_path: Path, console_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    proc, _ = _process(tmp_path, "hang")
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.kill()
    assert time.monotonic() - t0 < 5
    assert proc.proc.returncode is not None
    assert list(console_dir.iterdir()) == []
    # the worker that waited for the terminal gives up now, not after its 30 s timeout
    while "no terminal from crun" not in caplog.text and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert "no terminal from crun" in caplog.text


@pytest.mark.parametrize("how", ["fail", "fail-connected"])
def test_a_crun_that_fails_before_handing_over_a_terminal_is_not_waited_for(
        tmp_path: Path, console_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr(containers, "CONSOLE_WAIT", 60.0)  # its timeout would fail the test's bound
    proc, _ = _process(tmp_path, how)
    t0 = time.monotonic()
    with pytest.raises(containers.runtime.RuntimeError_, match="not found in|cannot open"):
        proc.connect()
    assert time.monotonic() - t0 < 10
    assert proc.proc.returncode == 1
    assert list(console_dir.iterdir()) == []
