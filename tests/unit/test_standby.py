"""The engine socket's standby (vmkit/standby.py), without a VM: a real process, real docker-py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import docker
import docker.errors
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the standby is for unix sockets")


def _paths(home: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from vmkit.paths import VMPaths

    monkeypatch.setenv("PYDESK_HOME", str(home))
    return VMPaths("default")


def _start(home: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vmkit.standby", "--name", "default"], cwd=ROOT,
                            env={**os.environ, "PYDESK_HOME": str(home)})


def _wait_for(cond, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_answers_not_running_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkit import standby

    paths = _paths(tmp_path / "home", monkeypatch)
    proc = _start(tmp_path / "home")
    try:
        _wait_for(lambda: standby.running_pid(paths) == proc.pid)
        assert os.stat(paths.engine).st_mode & 0o777 == 0o600
        with pytest.raises(docker.errors.DockerException) as exc:
            docker.DockerClient(base_url=f"unix://{paths.engine}", version="auto", timeout=5)
        assert "pydesk VM is not running — start it with `pydesk vm start`" in str(exc.value)
        api = docker.APIClient(base_url=f"unix://{paths.engine}", version="1.41", timeout=5)
        with pytest.raises(docker.errors.APIError) as exc2:
            api.containers()
        assert exc2.value.status_code == 503
        assert standby.stop(paths) is True
        assert proc.wait(10) == 0
        assert not paths.engine.exists() and not paths.standby_pid.exists()
        assert standby.stop(paths) is False
    finally:
        proc.kill()


def test_exits_when_the_socket_is_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkit import standby
    from vmkit.transport import Listener

    paths = _paths(tmp_path / "home", monkeypatch)
    proc = _start(tmp_path / "home")
    try:
        _wait_for(lambda: standby.running_pid(paths) == proc.pid)
        new = Listener(paths.engine)  # what a starting daemon does
        try:
            assert proc.wait(10) == 0
            assert paths.engine.exists()  # the new owner's socket is left alone
        finally:
            new.close()
    finally:
        proc.kill()
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
