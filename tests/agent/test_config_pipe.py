"""crun started before its config exists (agent/runtime.py ``ConfigPipe``): every open of
config.json gets the whole config once, a reader still draining its pipe never gets it twice,
nothing waits forever when nobody reads, and afterwards config.json is a regular file.

Readers here are real processes reading the named pipe the way crun 1.8 does (open, read to
end-of-file, close; twice)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from agent.runtime import ConfigPipe

CONFIG = b'{"ociVersion": "1.0.2", "process": {"args": ["true"]}}'


def _read_twice(path: Path, out: Path) -> subprocess.Popen[bytes]:
    """A reader like crun 1.8: it reads config.json to its end twice, a moment apart, and
    holds the first pipe open for a while after its end-of-file (as crun parses it)."""
    script = ("import sys, time\n"
              "p, out = sys.argv[1], sys.argv[2]\n"
              "f = open(p, 'rb'); a = f.read(); time.sleep(0.3)\n"
              "b = open(p, 'rb').read(); f.close()\n"
              "open(out, 'wb').write(a + b'|' + b)\n")
    return subprocess.Popen([sys.executable, "-c", script, str(path), str(out)])


def test_each_open_gets_the_config_once_and_a_regular_file_is_left(tmp_path: Path) -> None:
    out = tmp_path / "read"
    with ConfigPipe(tmp_path) as pipe:
        assert stat.S_ISFIFO(os.stat(pipe.path).st_mode)
        reader = _read_twice(pipe.path, out)  # started first, as crun is: it waits in open()
        time.sleep(0.3)
        assert reader.poll() is None
        pipe.serve(CONFIG)
        assert reader.wait(20) == 0
    # the first pipe was still open when the second open came: it was not served again
    assert out.read_bytes() == CONFIG + b"|" + CONFIG
    assert stat.S_ISREG(os.stat(tmp_path / "config.json").st_mode)
    assert (tmp_path / "config.json").read_bytes() == CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "read"]


def test_a_reader_that_goes_away_mid_read_does_not_stop_the_next(tmp_path: Path) -> None:
    big = b"x" * (1 << 20)  # more than a pipe holds: the writer is still writing when it goes
    with ConfigPipe(tmp_path) as pipe:
        pipe.serve(big)
        with open(pipe.path, "rb") as f:
            assert f.read(4096) == b"x" * 4096
        with open(pipe.path, "rb") as f:
            assert f.read() == big
    assert (tmp_path / "config.json").read_bytes() == big


def test_leaving_without_a_reader_does_not_hang(tmp_path: Path) -> None:
    """crun died before it opened config.json: the writer waiting for a reader is let go."""
    t0 = time.monotonic()
    with ConfigPipe(tmp_path) as pipe:
        pipe.serve(CONFIG)
        time.sleep(0.2)
        assert _threads_in_fifo_open() == 1  # the writer, waiting for a reader
    assert time.monotonic() - t0 < 5
    assert _threads_in_fifo_open() == 0
    assert (tmp_path / "config.json").read_bytes() == CONFIG


def _threads_in_fifo_open() -> int:
    """Threads of this process asleep in the kernel's open() of a named pipe."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            n += (task / "wchan").read_text() == "wait_for_partner"
        except OSError:
            pass
    return n


def test_nothing_served_leaves_no_pipe(tmp_path: Path) -> None:
    """The preparation failed before the config was made: crun is killed, and no pipe stays
    where a later start or `exec` expects a file."""
    with ConfigPipe(tmp_path) as pipe:
        assert pipe.path.exists()
    assert not (tmp_path / "config.json").exists()
    with ConfigPipe(tmp_path) as pipe:  # a start after a failed one makes its pipe again
        pipe.serve(CONFIG)
    assert (tmp_path / "config.json").read_bytes() == CONFIG
