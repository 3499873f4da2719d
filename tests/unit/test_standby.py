"""The engine endpoint's standby (vmkit/standby.py), without a VM: a real process and real
docker-py on the unix socket; the Windows named pipe path with the fake Win32 calls."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
import docker.errors
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

unix_only = pytest.mark.skipif(sys.platform == "win32", reason="unix sockets")


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


@unix_only
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


@unix_only
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


def test_answers_on_the_named_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.fake_pipes import FakePipes
    from vmkit import standby

    paths = _paths(tmp_path / "home", monkeypatch)
    fake = FakePipes()
    stopping = threading.Event()
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(standby.serve("default", platform="win32", api=fake,
                                                                  stopping=stopping)), daemon=True)
    t.start()
    _wait_for(lambda: "connect" in fake.names())
    assert int(paths.standby_pid.read_text()) == os.getpid()
    creates = [c for c in fake.calls if c[0] == "create_pipe"]
    assert creates[0][1] == paths.engine_pipe and creates[0][7].startswith("D:P(")  # same name, same ACL
    for _ in range(2):
        client = fake.client(paths.engine_pipe)
        client.send(b"GET /v1.41/containers/json HTTP/1.1\r\nHost: docker\r\n\r\n")
        reply = client.read_to_eof()
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert reply.endswith(b'{"message": "pydesk VM is not running \\u2014 start it with `pydesk vm start`"}')
    stopping.set()
    t.join(10)
    assert done == [0]
    assert not paths.standby_pid.exists()
    _wait_for(lambda: fake.open_handles() == set())  # the listener and every answered connection


def test_pipe_standby_leaves_when_standby_pid_is_not_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.fake_pipes import FakePipes
    from vmkit import standby

    monkeypatch.setattr(standby, "CHECK_EVERY", 0.05)
    paths = _paths(tmp_path / "home", monkeypatch)
    fake = FakePipes()
    t = threading.Thread(target=standby.serve, args=("default",), kwargs={"platform": "win32", "api": fake},
                         daemon=True)
    t.start()
    _wait_for(lambda: "connect" in fake.names())
    paths.standby_pid.unlink()  # what `pydesk vm stop --quit` / a starting daemon leave behind
    t.join(10)
    assert not t.is_alive() and fake.open_handles() == set()
