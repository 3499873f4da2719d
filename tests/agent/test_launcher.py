"""cruns started ahead of their containers (agent/launcher.py): a start takes one that waits in
open() on its config pipe, hands it the config and hears its pid; a start with a terminal or
stdin, or one that finds none alive, has one started for it; `close` and an engine's `sweep`
leave no waiting crun and no directory behind.

The stand-in for crun is a real process that does what `crun run` does with what we give it:
it opens ``<bundle>/config.json`` (a named pipe) and waits there, reads the config twice, writes
to its stdout, writes its pid to ``--pid-file`` and exits; with an empty config it logs an
error to ``--log`` and exits 1, as crun does.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import runtime
from agent.launcher import Launcher, let_through

STAND_IN = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
assert args[args.index("--root") + 2].startswith("--log=file:") and "run" in args
bundle = args[args.index("--bundle") + 1]
pid_file = args[args.index("--pid-file") + 1]
log = next(a for a in args if a.startswith("--log=file:"))[len("--log=file:"):]
os.chdir(bundle)
data = open("config.json", "rb").read()
if not data:
    with open(log, "a") as f:
        f.write("error loading config.json: empty\\n")
    sys.exit(1)
config = json.loads(data)
assert open("config.json", "rb").read() == data  # crun 1.8 reads it again, for its state
print("said " + config["say"] + " as " + args[-1], flush=True)
with open(pid_file, "w") as f:
    f.write(str(os.getpid()))
sys.exit(config.get("exit", 0))
"""


@pytest.fixture
def launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    crun = tmp_path / "crun"
    crun.write_text(STAND_IN)
    crun.chmod(0o755)
    monkeypatch.setattr(runtime, "CRUN", str(crun))
    monkeypatch.setattr(runtime, "CRUN_ROOT", str(tmp_path / "state"))
    launcher = Launcher(spares=2, root=tmp_path / "launch")
    yield launcher
    launcher.close()


def _blocked(launch) -> bool:  # type: ignore[no-untyped-def]
    """Alive and waiting in open() on its config pipe (its only way to get past it)."""
    time.sleep(0.3)
    return launch.waiting() and stat.S_ISFIFO(os.stat(launch.dir / "config.json").st_mode)


def test_a_start_takes_a_waiting_crun_and_hands_it_the_config(launcher: Launcher, tmp_path: Path) -> None:
    launcher.fill()
    assert launcher.waiting() == 2
    launch = launcher.take()
    assert launcher.waiting() == 1
    assert _blocked(launch), "a crun started ahead must wait for its config"
    out: list[bytes] = []
    kept = tmp_path / "container" / "config.json"
    kept.parent.mkdir()
    config = json.dumps({"say": "hello"}).encode()
    with launch:
        launch.proc.read_output(lambda stream, data: out.append(data))
        launch.config.serve(config, keep=kept)
        pid = launch.pid_fifo.wait(launch.proc.proc, timeout=20)
    assert pid == launch.proc.proc.pid
    assert launch.proc.proc.wait(20) == 0
    launch.proc.drain(5)
    assert b"".join(out) == f"said hello as {launch.id}\n".encode()
    assert kept.read_bytes() == config  # what `exec` reads later
    assert not [p.name for p in launch.dir.iterdir() if stat.S_ISFIFO(p.lstat().st_mode)]  # no pipe left behind
    assert launch.dir.is_dir()  # (crun's log is there) until the container's exit is cleaned up
    launcher.release(launch.id)
    assert not launch.dir.exists()


def test_a_terminal_or_stdin_start_has_a_crun_started_for_it(launcher: Launcher) -> None:
    launcher.fill(1)
    [waiting] = launcher._waiting
    launch = launcher.take(stdin=True)
    try:
        assert launch is not waiting and launcher.waiting() == 1
        assert launch.proc.stdin_w is not None  # chosen at crun's exec: a waiting one has /dev/null
        assert _blocked(launch)
    finally:
        launch.discard()
    assert not launch.waiting() and not launch.dir.exists()


def test_a_waiting_crun_that_died_is_passed_over(launcher: Launcher, caplog: pytest.LogCaptureFixture) -> None:
    launcher.fill()
    dead, alive = launcher._waiting
    dead.proc.proc.kill()
    dead.proc.proc.wait(10)
    with caplog.at_level(logging.WARNING):
        assert launcher.take() is alive
    assert "had exited" in caplog.text
    assert not dead.dir.exists()
    alive.discard()


def test_fill_stops_when_the_engine_is_busy_and_after_close(launcher: Launcher) -> None:
    launcher.fill(2, while_=lambda: False)
    assert launcher.waiting() == 1  # the first always; the rest only while quiet
    [first] = launcher._waiting
    launcher.close()
    assert not first.waiting() and not first.dir.exists()
    launcher.fill()
    assert launcher.waiting() == 0
    assert list(launcher.root.iterdir()) == []


def test_sweep_lets_an_earlier_engines_waiting_cruns_go(launcher: Launcher, tmp_path: Path) -> None:
    launcher.fill()
    orphans = [launch.proc.proc for launch in launcher._waiting]
    # a new engine, where the one that started them was killed
    Launcher(root=launcher.root).sweep()
    for proc in orphans:
        assert proc.wait(20) == 1  # an empty config: crun refuses it and exits
    assert list(launcher.root.iterdir()) == []


def test_let_through_wakes_only_a_waiting_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    assert not let_through(fifo)  # nobody waits
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    deadline = time.monotonic() + 10
    while not let_through(fifo) and time.monotonic() < deadline:
        time.sleep(0.05)
    reader.join(10)
    assert got == [b""]
    assert not let_through(tmp_path / "missing")
